"""Commands that measure: ``evaluate`` (quality and lengths on a folder) and ``bench`` (speed)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..bench import add_arguments as add_bench_arguments
from ..bench import run_benchmark
from ..evaluation import evaluate_folder, format_table, parse_thresholds
from ..image_io import list_image_files, load_images
from ..io_utils import refuse_inputs_as_outputs, staged_directory
from ..tokenizer import AdaptiveTokenizer
from .common import PROG, UsageError, command, load_tokenizer, model_label, model_options, parse_device, positive_int


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    model_options(p)
    p.add_argument("folder", metavar="FOLDER", help="folder of images (files directly inside it)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    p.add_argument("--max-images", type=positive_int, metavar="N", help="only the first N images (by name)")
    p.add_argument("--thresholds", metavar="E1,E2,...",
                   help="adaptive halt thresholds (default: chosen so mean lengths span the range, one near 128)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="largest budget evaluated (default: model max)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="images per batch (default: 8)")


@command("evaluate", "quality per token budget and adaptive length on a folder of images: report.json + PNG figures",
         evaluate_arguments)
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Quality per budget, adaptive length and complexity on a folder: OUT_DIR/report.json + PNG figures."""

    if not os.path.isdir(args.folder):
        raise FileNotFoundError(f"no such folder: {args.folder}")
    refuse_inputs_as_outputs([args.output], [args.folder])
    thresholds = parse_thresholds(args.thresholds) if args.thresholds is not None else None
    tok = load_tokenizer(args)
    command = [PROG, "evaluate", args.folder, "-o", args.output, "--batch-size", str(args.batch_size), "--device",
               args.device]
    for flag, value in (("--model", args.model), ("--max-images", args.max_images), ("--thresholds", args.thresholds),
                        ("--max-tokens", args.max_tokens), ("--dtype", args.dtype)):
        command += [flag, str(value)] if value is not None else []
    with staged_directory(args.output) as staging:  # report.json and the figures appear together, or not at all
        report = evaluate_folder(tok, args.folder, staging, max_images=args.max_images, thresholds=thresholds,
                                 batch_size=args.batch_size, max_tokens=args.max_tokens,
                                 model_name=model_label(args), command=command)
    print(format_table(report))
    print(f"wrote {Path(args.output) / 'report.json'} and {len(report['figures'])} figures "
          f"({report['metadata']['elapsed_s']:.1f} s)")
    return 0


@command("bench", "speed benchmark: the authors' encode algorithm vs ours, same run",
         add_bench_arguments)
def cmd_bench(args: argparse.Namespace) -> int:
    """Speed benchmark (see adaptive_tokenizer/bench.py); the last output line is a JSON summary."""
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        raise UsageError(f"--budgets takes comma-separated token counts, got {args.budgets!r}") from None
    parse_device(args.device)
    for flag, value in (("--batch", args.batch), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive number of images, got {value}")
    if args.rules:
        from ..bench import run_rules_benchmark

        tok = AdaptiveTokenizer.from_pretrained(args.model, device=args.device, dtype=args.dtype)
        paths = list_image_files(args.images)
        if not paths:
            raise UsageError(f"no image files in {args.images}")
        pixels = load_images([str(p) for p in paths[: args.limit]], tok.config.image_size)
        run_rules_benchmark(tok, pixels, args.threads, args.target_tokens, args.repeats, batch=args.batch)
        return 0
    run_benchmark(args.size, args.batch, args.threads, args.device, args.dtype, args.repeats, args.target_tokens,
                  budgets, per_image_check=not args.no_per_image_check)
    return 0
