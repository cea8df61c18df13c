"""Command line: ``adaptive-tokenizer {convert,encode,tokenize,decode,reconstruct,evaluate,info,models,push,bench}``.

``encode`` writes and ``decode`` reads token files (format: :mod:`adaptive_tokenizer.serialization`).

User errors (bad arguments, missing files, bad token files, anything the library rejects with ValueError,
FileNotFoundError or TypeError) print one line ``adaptive-tokenizer: error: ...`` and exit with status 2.
``tokenize`` exits with status 3 when the job completed but skipped inputs it could not read.
Outputs are all-or-nothing: every file goes through :func:`~adaptive_tokenizer.io_utils.write_atomic`, ``decode``
fills a staged directory, a failed command leaves no new file or directory, and an output that is also an input
is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from .bench import add_arguments as add_bench_arguments
from .bench import run_benchmark
from .convert import convert_checkpoint
from .evaluation import evaluate_folder, format_table, parse_thresholds
from .hub import MODEL_FILES, ModelInfo, file_entry, list_pretrained, load_manifest, resolve
from .image_io import labelled_strip, list_image_files, load_images, to_pil
from .io_utils import png_bytes, refuse_inputs_as_outputs, staged_directory, write_atomic
from .length_rules import LENGTH_RULES
from .serialization import load_token_file, save_token_file
from .tokenizer import AdaptiveTokenizer, EncodeResult

PROG = "adaptive-tokenizer"
USER_ERROR = 2


class UsageError(Exception):
    """A mistake of the user's (bad argument, missing or malformed file): reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (one line, no usage dump) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---- helpers -------------------------------------------------------------------------------------------------
def collect_images(inputs: Sequence[str]) -> list[str]:
    """Image files given directly, plus the image files inside each folder given (sorted by name)."""
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = list_image_files(item)
            if not found:
                raise UsageError(f"no image files in folder {item}")
            paths += [str(p) for p in found]
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"no such image file or folder: {item}")
    return paths


def load_tokenizer(args: argparse.Namespace) -> AdaptiveTokenizer:
    """The model of ``--model`` (anything ``from_pretrained`` takes) on ``--device`` in ``--dtype``."""
    return AdaptiveTokenizer.from_pretrained(args.model, device=parse_device(args.device), dtype=args.dtype)


def model_label(args: argparse.Namespace) -> str:
    """How messages name the model of ``--model``."""
    return args.model if args.model is not None else "the embedded default model"


def parse_device(name: str) -> torch.device:
    """``--device`` value -> torch device, refusing backends this machine lacks."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"invalid device {name!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r} requested but MPS is not available")
    return device


def output_names(sources: Sequence[str], suffix: str = ".png") -> list[str]:
    """One file name per source, ``<stem><suffix>``; repeated stems get ``_1``, ``_2``, ... appended."""
    names, taken = [], set()
    for index, source in enumerate(sources):
        stem = Path(source).stem
        stem = stem if stem not in ("", ".", "..") else f"image_{index}"
        name, count = f"{stem}{suffix}", 0
        while name.casefold() in taken:  # casefold: case-insensitive file systems
            count += 1
            name = f"{stem}_{count}{suffix}"
        taken.add(name.casefold())
        names.append(name)
    return names


def encode_paths(tok: AdaptiveTokenizer, paths: Sequence[str], batch_size: int, *, max_tokens: int | None,
                 halt_threshold: float | None, length_rule: str | None = None) -> EncodeResult:
    """``tok.encode`` over ``paths`` in batches (so only a batch of images is in memory), with a progress bar."""
    parts: list[EncodeResult] = []
    # disable=None: the bar shows only when stderr is a terminal (no clutter in logs or captured output)
    with tqdm(total=len(paths), unit="img", desc="encoding", file=sys.stderr, disable=None) as bar:
        for start in range(0, len(paths), batch_size):
            batch = list(paths[start : start + batch_size])
            parts.append(tok.encode(batch, max_tokens=max_tokens, halt_threshold=halt_threshold,
                                    length_rule=length_rule))
            bar.update(len(batch))
    errors = [part.errors for part in parts if part.errors is not None]
    predicted = [part.predicted_errors for part in parts if part.predicted_errors is not None]
    return EncodeResult(tokens=[t for part in parts for t in part.tokens],
                        num_tokens=torch.cat([part.num_tokens for part in parts]),
                        errors=torch.cat(errors) if errors else None,
                        predicted_errors=torch.cat(predicted) if predicted else None)


# ---- subcommands ---------------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    """Convert an authors' checkpoint into a model directory."""
    refuse_inputs_as_outputs([Path(args.out_dir) / name for name in MODEL_FILES], [args.checkpoint])
    with staged_directory(args.out_dir) as staging:  # config and weights appear together, or not at all
        config = convert_checkpoint(args.checkpoint, staging, encoder_heads=args.encoder_heads,
                                    decoder_heads=args.decoder_heads, dynamic_halting=not args.no_dynamic_halting,
                                    dynamic_halting_confidence=args.halting_confidence)
    latent = (f"quantized ({config.codebook_size} codes, {config.token_dim}-d)" if config.quantized
              else f"continuous ({config.latent_dim}-d vectors)")
    halting = f"on (p >= {config.dynamic_halting_confidence})" if config.dynamic_halting else "off"
    print(f"converted {args.checkpoint} -> {args.out_dir}: {latent} latents, {config.image_size}px images, "
          f"encoder {config.encoder_width}x{config.encoder_layers}, decoder {config.decoder_width}x"
          f"{config.decoder_layers}, {config.tokens_per_iteration}-{config.max_tokens} tokens "
          f"(steps of {config.tokens_per_iteration}), dynamic halting {halting}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode images into one token file."""
    sources = collect_images(args.inputs)
    refuse_inputs_as_outputs([args.output], sources)
    tok = load_tokenizer(args)
    tok.batch_size = args.batch_size
    result = encode_paths(tok, sources, args.batch_size, max_tokens=args.max_tokens,
                          halt_threshold=args.halt_threshold, length_rule=args.length_rule)
    save_token_file(args.output, result, sources, tok.config.latent_kind)
    lengths = result.num_tokens.float()
    error = f", mean L1 {result.errors.mean():.4f}" if result.errors is not None else ""
    print(f"encoded {len(sources)} images: mean {lengths.mean():.1f} tokens (min {int(lengths.min())}, "
          f"max {int(lengths.max())}){error} -> {args.output}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Tokenize a dataset into resumable Parquet shards (adaptive_tokenizer/tokenize_dataset.py)."""
    try:
        from .tokenize_dataset import tokenize_dataset
    except ImportError as err:
        raise UsageError(str(err)) from None
    encode_kwargs = {"max_tokens": args.max_tokens, "halt_threshold": args.halt_threshold,
                     "length_rule": args.length_rule}
    summary = tokenize_dataset(args.source, args.output_dir, model=args.model, encode_kwargs=encode_kwargs,
                               shard_size=args.shard_size, batch_size=args.batch_size, engine=args.engine,
                               workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                               gpus_per_worker=args.gpus_per_worker, device=parse_device(args.device))
    print(summary.line())
    if summary.num_failed:
        print(f"{summary.num_failed} inputs could not be read: see {Path(args.output_dir) / 'errors.jsonl'}",
              file=sys.stderr)
    return summary.exit_status


def cmd_decode(args: argparse.Namespace) -> int:
    """Decode a token file into one PNG per image."""
    sequences, sources = load_token_file(args.tokens)
    tok = load_tokenizer(args)
    file_kind = "quantized" if sequences[0].dim() == 1 else "continuous"
    if file_kind != tok.config.latent_kind:
        raise UsageError(f"{args.tokens} holds {file_kind} tokens but the model {model_label(args)} is "
                         f"{tok.config.latent_kind}")
    try:
        sequences = tok.check_tokens(sequences)  # every sequence, before any image is written
    except (ValueError, TypeError) as err:
        raise ValueError(f"{args.tokens}: {err} (counting the file's images from 0)") from None
    out_dir = Path(args.output)
    names = output_names(sources)
    refuse_inputs_as_outputs([out_dir, *(out_dir / name for name in names)], [args.tokens])
    with staged_directory(out_dir) as staging, \
            tqdm(total=len(sequences), unit="img", desc="decoding", file=sys.stderr, disable=None) as bar:
        for start in range(0, len(sequences), args.batch_size):
            pixels = tok.decode(sequences[start : start + args.batch_size])
            for offset, image in enumerate(pixels):
                write_atomic(staging / names[start + offset], png_bytes(to_pil(image)))
            bar.update(len(pixels))
    print(f"decoded {len(sequences)} images -> {out_dir}")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Write a strip: the preprocessed input, then the reconstruction at every budget."""
    refuse_inputs_as_outputs([args.output], [args.image])
    tok = load_tokenizer(args)
    image = load_images(args.image, tok.config.image_size)  # [1, 3, R, R], what the model sees
    pixels, errors = tok.reconstructions(image, max_tokens=args.max_tokens)
    budgets = [tok.tokens_per_iteration * (i + 1) for i in range(pixels.shape[1])]
    labels = ["input"] + [f"{n} tok  L1 {e:.3f}" for n, e in zip(budgets, errors[0].tolist())]
    strip = labelled_strip([to_pil(image[0])] + [to_pil(p) for p in pixels[0]], labels)
    write_atomic(args.output, png_bytes(strip), parents=True)
    for label in labels[1:]:
        print(label)
    print(f"wrote {args.output} ({strip.width}x{strip.height})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Quality per budget, adaptive length and complexity on a folder: OUT_DIR/report.json + PNG figures."""

    if not os.path.isdir(args.folder):
        raise FileNotFoundError(f"no such folder: {args.folder}")
    refuse_inputs_as_outputs([args.output], [args.folder])
    thresholds = parse_thresholds(args.thresholds) if args.thresholds is not None else None
    tok = load_tokenizer(args)
    tok.batch_size = args.batch_size
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


def cmd_info(args: argparse.Namespace) -> int:
    """Print the model's config (JSON) and its parameter counts."""
    tok = load_tokenizer(args)
    print(json.dumps(tok.config.to_dict(), indent=2))
    print("parameters:")
    for part, count in tok.model.num_parameters().items():
        print(f"  {part:<16}{count:>14,}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the pretrained models of the weights manifest."""
    manifest = load_manifest(args.manifest) if args.manifest else load_manifest()
    entries = list_pretrained(manifest)
    if not entries:
        print(f"no pretrained models in this version's manifest ({manifest.path}); --model also takes a Hub repo "
              "id org/name[@revision] or a directory holding config.json + model.safetensors")
        return 0
    rows = [("NAME", "TOKENS", "LATENT", "WHERE", "DESCRIPTION")]
    rows += [(e.name, f"{e.tokens_min}-{e.tokens_max} (step {e.tokens_step})", e.latent_kind,
              e.where + (" (default)" if e.name == manifest.default else ""), e.description) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Publish a model to a Hub repo with a model card, download it back, print its manifest location and files."""
    tok = AdaptiveTokenizer.from_pretrained(args.model)
    card = {"description": args.description, "license": args.license, "training_data": args.training_data,
            "recipe": args.recipe}
    info = dataclasses.replace(tok.info or ModelInfo(), **{k: v for k, v in card.items() if v is not None})
    commit = tok.push_to_hub(args.repo_id, revision=args.revision, private=args.private or None,
                             commit_message=args.message, info=info)
    pushed = resolve(f"{args.repo_id}@{commit.oid}").directory
    files = {name: dataclasses.asdict(file_entry(pushed / name)) for name in MODEL_FILES}
    print(f"pushed {args.model} -> {args.repo_id} at commit {commit.oid} ({commit.commit_url})")
    print("manifest location and files (downloaded back from the Hub):")
    print(json.dumps({"location": {"repo_id": args.repo_id, "revision": commit.oid}, "files": files}, indent=2))
    return 0


def cmd_fit_length_predictor(args: argparse.Namespace) -> int:
    """Fit a length predictor for a model on a set of photos and write the model with it."""
    from .fit_length_predictor import fit_length_predictor

    sources = collect_images(args.inputs)
    tok = load_tokenizer(args)
    with tqdm(total=len(sources), unit="img", desc="measuring", file=sys.stderr, disable=None) as bar:
        report = fit_length_predictor(tok, sources, args.output, crops=args.crops, val_fraction=args.val_fraction,
                                      seed=args.seed, measurements=args.measurements, steps=args.fit_steps,
                                      progress=bar.update)
    chosen = report["candidates"][[(c["features"], c["hidden"]) for c in report["candidates"]].index(
        (report["selected"]["features"], report["selected"]["hidden"]))]
    print(f"fitted a length predictor on {report['num_train_views']} views; held out {report['num_val_images']} "
          f"images: lengths within one iteration of the exact rule {chosen['within_one']:.1%}, same "
          f"{chosen['same']:.1%}, MAE {chosen['mae']:.4f}; safety margin {report['selected']['margin']:g} -> {args.output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Speed benchmark (see adaptive_tokenizer/bench.py); the last output line is a JSON summary."""
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        raise UsageError(f"--budgets takes comma-separated token counts, got {args.budgets!r}") from None
    parse_device(args.device)
    if args.rules:
        from .bench import run_rules_benchmark

        tok = AdaptiveTokenizer.from_pretrained(args.model, device=args.device, dtype=args.dtype)
        paths = list_image_files(args.images)
        if not paths:
            raise UsageError(f"no image files in {args.images}")
        pixels = load_images([str(p) for p in paths[: args.batch]], tok.config.image_size)
        run_rules_benchmark(tok, pixels, args.threads, args.target_tokens, args.repeats)
        return 0
    run_benchmark(args.size, args.batch, args.threads, args.device, args.dtype, args.repeats, args.target_tokens,
                  budgets, per_image_check=not args.no_per_image_check)
    return 0


# ---- parser --------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    """argparse type for sizes such as ``--batch-size``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


_MODEL_HELP = ("a model name (see `adaptive-tokenizer models`), a Hub repo id org/name[@revision], or a directory "
               "holding config.json + model.safetensors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="ALIT adaptive-length image tokenizer: images <-> variable-length tokens.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("convert", help="convert an authors' .pth checkpoint into a model directory")
    p.add_argument("checkpoint", metavar="CKPT.pth")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--encoder-heads", type=int, metavar="N", help="encoder attention heads (default: from preset)")
    p.add_argument("--decoder-heads", type=int, metavar="N", help="decoder attention heads (default: from preset)")
    p.add_argument("--no-dynamic-halting", action="store_true", help="never mask confidently predicted 2D tokens")
    p.add_argument("--halting-confidence", type=float, default=0.55, metavar="P",
                   help="dynamic halting probability threshold (default: 0.55)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("encode", help="encode images (files or folders) into one token file")
    _model_options(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-tokens", type=int, metavar="N", help="tokens per image, at most (default: model max)")
    length.add_argument("--budget", type=int, dest="max_tokens", metavar="N", help="alias of --max-tokens")
    p.add_argument("--halt-threshold", type=float, metavar="E",
                   help="target error: each image gets the fewest tokens whose mean absolute pixel error is <= E")
    p.add_argument("--length-rule", choices=LENGTH_RULES, default=None,
                   help="how --halt-threshold lengths are found: exact (default; decode every length up to the "
                        "answer), search (decode around the predicted length), predicted (the model's length "
                        "predictor alone, no decoding)")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="images per batch (default: 16)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("tokenize", help="tokenize a dataset (folder or list of images) into resumable Parquet shards; "
                                        "exit status 3 when some inputs could not be read")
    p.add_argument("source", metavar="SOURCE", help="folder of images (searched recursively) or a text file listing "
                                                    "image paths, one per line")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="Parquet shards, index.json and errors.jsonl; rerun the "
                                                            "same command to resume")
    p.add_argument("--model", metavar="MODEL", help=_MODEL_HELP + " (default: the embedded default model)")
    p.add_argument("--device", default="cpu", help="torch device of the local engine (default: cpu)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-tokens", type=int, metavar="N", help="tokens per image, at most (default: model max)")
    length.add_argument("--budget", type=int, dest="max_tokens", metavar="N", help="alias of --max-tokens")
    p.add_argument("--halt-threshold", type=float, metavar="E", help="per-image length, as for `encode`")
    p.add_argument("--length-rule", choices=LENGTH_RULES, default=None, help="as for `encode`")
    p.add_argument("--shard-size", type=_positive_int, default=10_000, metavar="ROWS",
                   help="inputs per Parquet shard (default: 10000)")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="images per batch (default: 16)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process, images decoded by threads; ray: Ray Data actors on the cluster of "
                        "RAY_ADDRESS or a local Ray (pip install 'adaptive-tokenizer[ray]')")
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help="local: image-decoding threads (default: 2); ray: model actors (default: 1)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, metavar="C",
                   help="ray: CPUs reserved per actor, fractions allowed (default: 0.5)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="ray: GPUs per actor (default: 0, CPU actors); > 0 runs the model on CUDA")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("decode", help="decode a token file into PNG images")
    _model_options(p)
    p.add_argument("tokens", metavar="TOKENS.safetensors")
    p.add_argument("-o", "--output", required=True, metavar="OUT_FOLDER")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="images per batch (default: 16)")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("reconstruct", help="PNG strip of an image's reconstruction at every token budget")
    _model_options(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, metavar="STRIP.png")
    p.add_argument("--max-tokens", type=int, metavar="N", help="largest budget shown (default: model max)")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("evaluate", help="quality per token budget and adaptive length on a folder of images: "
                                        "report.json + PNG figures")
    _model_options(p)
    p.add_argument("folder", metavar="FOLDER", help="folder of images (files directly inside it)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    p.add_argument("--max-images", type=_positive_int, metavar="N", help="only the first N images (by name)")
    p.add_argument("--thresholds", metavar="E1,E2,...",
                   help="adaptive halt thresholds (default: chosen so mean lengths span the range, one near 128)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="largest budget evaluated (default: model max)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="images per batch (default: 8)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="print a model's config and parameter counts")
    _model_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list the pretrained models of the weights manifest")
    p.add_argument("--manifest", metavar="MANIFEST.json", help="another manifest (default: the shipped one)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("push", help="publish a model to a Hub repo (config, weights, model card)")
    p.add_argument("--model", required=True, metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("repo_id", metavar="ORG/NAME")
    p.add_argument("--revision", metavar="BRANCH", help="branch to commit to, created if needed (default: main)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", default="Upload ALIT model", help="commit message")
    for flag in ("description", "license", "training-data", "recipe"):
        p.add_argument(f"--{flag}", metavar="TEXT",
                       help=f"model card {flag.replace('-', ' ')} (default: from the manifest entry)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("fit-length-predictor", help="fit a length predictor (length_rule='predicted') for a "
                       "model on photos; writes the model with it")
    _model_options(p)
    p.add_argument("inputs", nargs="+", metavar="PHOTOS", help="image files or folders of images")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the model with its predictor")
    p.add_argument("--crops", type=int, default=0, metavar="N",
                   help="random crops per image, beside the centre crop and its mirror image (default: 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of the images held out to select the predictor (default: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-steps", type=_positive_int, default=1500, metavar="N",
                   help="optimizer steps per candidate head (default: 1500)")
    p.add_argument("--measurements", metavar="FILE.safetensors",
                   help="cache of the measured errors: written after measuring, read instead of measuring again")
    p.set_defaults(func=cmd_fit_length_predictor)

    p = sub.add_parser("bench", help="speed benchmark: the authors' encode algorithm vs ours, same run")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="MODEL", help=_MODEL_HELP + " (default: the embedded default model)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default=None, metavar="DTYPE",
                        help="float32 (default), bfloat16, or float16 (CUDA only)")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for user errors)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except (UsageError, ValueError, FileNotFoundError, TypeError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
