"""Commands that turn images into tokens and back: ``encode``, ``tokenize``, ``decode``, ``reconstruct``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import InputError
from ..image_io import labelled_strip, load_images, to_pil
from ..io_utils import png_bytes, refuse_inputs_as_outputs, staged_directory, write_atomic
from ..length_rules import LENGTH_RULES
from ..serialization import load_token_file, save_token_file
from ..tokenizer import AdaptiveTokenizer, EncodeResult
from .common import (MODEL_HELP, UsageError, collect_images, command, load_tokenizer, model_label, model_options,
                     output_names, parse_device, positive_int)


def encode_paths(tok: AdaptiveTokenizer, paths: Sequence[str], batch_size: int, *, max_tokens: int | None,
                 halt_threshold: float | None, length_rule: str | None = None) -> EncodeResult:
    """``tok.encode_iter`` over ``paths`` (only two batches of images in memory), with a progress bar."""
    parts: list[EncodeResult] = []
    # disable=None: the bar shows only when stderr is a terminal (no clutter in logs or captured output)
    with tqdm(total=len(paths), unit="img", desc="encoding", file=sys.stderr, disable=None) as bar:
        for part in tok.encode_iter(paths, batch_size=batch_size, max_tokens=max_tokens,
                                    halt_threshold=halt_threshold, length_rule=length_rule):
            parts.append(part)
            bar.update(len(part))
    return EncodeResult.concat(parts)


def encode_arguments(p: argparse.ArgumentParser) -> None:
    model_options(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-tokens", type=int, metavar="N", help="tokens per image, at most (default: model max)")
    length.add_argument("--budget", type=int, dest="max_tokens", metavar="N", help="alias of --max-tokens")
    p.add_argument("--halt-threshold", type=float, metavar="E",
                   help="target error: each image gets the fewest tokens whose mean absolute pixel error is <= E")
    p.add_argument("--length-rule", choices=LENGTH_RULES, default=None,
                   help="how --halt-threshold lengths are found: verified (default with a length predictor: decode "
                        "the predicted length, step up while the target is missed), exact (default without one: "
                        "decode every length up to the answer), search (the exact rule's lengths, fewer decodes), "
                        "predicted (the length predictor alone, no decoding)")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="images per batch (default: 16)")


@command("encode", "encode images (files or folders) into one token file",
         encode_arguments)
def cmd_encode(args: argparse.Namespace) -> int:
    """Encode images into one token file."""
    sources = collect_images(args.inputs)
    refuse_inputs_as_outputs([args.output], sources)
    tok = load_tokenizer(args)
    result = encode_paths(tok, sources, args.batch_size, max_tokens=args.max_tokens,
                          halt_threshold=args.halt_threshold, length_rule=args.length_rule)
    save_token_file(args.output, result, sources, tok.config.latent_kind)
    lengths = result.num_tokens.float()
    error = f", mean L1 {result.errors.mean():.4f}" if result.errors is not None else ""
    print(f"encoded {len(sources)} images: mean {lengths.mean():.1f} tokens (min {int(lengths.min())}, "
          f"max {int(lengths.max())}){error} -> {args.output}")
    return 0


def tokenize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="folder of images (searched recursively) or a text file listing "
                                                    "image paths, one per line")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="Parquet shards, index.json and errors.jsonl; rerun the "
                                                            "same command to resume")
    p.add_argument("--model", metavar="MODEL", help=MODEL_HELP + " (default: the embedded default model)")
    p.add_argument("--device", default="cpu", help="torch device of the local engine (default: cpu)")
    p.add_argument("--dtype", default=None, metavar="DTYPE",
                   help="float32 (default), bfloat16, or float16 (CUDA only); recorded: a job resumes only in it")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-tokens", type=int, metavar="N", help="tokens per image, at most (default: model max)")
    length.add_argument("--budget", type=int, dest="max_tokens", metavar="N", help="alias of --max-tokens")
    p.add_argument("--halt-threshold", type=float, metavar="E", help="per-image length, as for `encode`")
    p.add_argument("--length-rule", choices=LENGTH_RULES, default=None, help="as for `encode`")
    p.add_argument("--shard-size", type=positive_int, default=10_000, metavar="ROWS",
                   help="inputs per Parquet shard (default: 10000)")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="images per batch (default: 16)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process, images decoded by threads; ray: Ray Data actors on the cluster of "
                        "RAY_ADDRESS or a local Ray (pip install 'adaptive-tokenizer[ray]')")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="local: image-decoding threads (default: 2); ray: model actors (default: 1)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, metavar="C",
                   help="ray: CPUs reserved per actor, fractions allowed (default: 0.5)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="ray: GPUs per actor (default: 0, CPU actors); > 0 runs the model on CUDA")


@command("tokenize", "tokenize a dataset (folder or list of images) into resumable Parquet shards; exit status 3 "
                     "when some inputs could not be read",
         tokenize_arguments)
def cmd_tokenize(args: argparse.Namespace) -> int:
    """Tokenize a dataset into resumable Parquet shards (adaptive_tokenizer/tokenize_dataset.py)."""
    try:
        from ..tokenize_dataset import tokenize_dataset
    except ImportError as err:
        raise UsageError(str(err)) from None
    encode_kwargs = {"max_tokens": args.max_tokens, "halt_threshold": args.halt_threshold,
                     "length_rule": args.length_rule}
    summary = tokenize_dataset(args.source, args.output_dir, model=args.model, encode_kwargs=encode_kwargs,
                               shard_size=args.shard_size, batch_size=args.batch_size, engine=args.engine,
                               workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                               gpus_per_worker=args.gpus_per_worker, device=parse_device(args.device),
                               dtype=args.dtype)
    print(summary.line())
    if summary.num_failed:
        print(f"{summary.num_failed} inputs could not be read: see {Path(args.output_dir) / 'errors.jsonl'}",
              file=sys.stderr)
    return summary.exit_status


def decode_arguments(p: argparse.ArgumentParser) -> None:
    model_options(p)
    p.add_argument("tokens", metavar="TOKENS", help="a token file (encode), or a folder or .parquet shard (tokenize)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_FOLDER")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="images per batch (default: 16)")


@command("decode", "decode a token file, or what tokenize wrote, into PNG images",
         decode_arguments)
def cmd_decode(args: argparse.Namespace) -> int:
    """Decode a token file, or a folder or shard written by `tokenize`, into one PNG per image."""
    tok = load_tokenizer(args)
    if os.path.isdir(args.tokens) or args.tokens.endswith(".parquet"):
        from ..serialization import model_identity
        from ..token_dataset import read_tokenized

        sequences, sources, settings = read_tokenized(args.tokens)
        if settings["model"]["weights_sha256"] != model_identity(tok.model)[0]["weights_sha256"]:
            raise UsageError(f"{args.tokens} was tokenized by another model than {model_label(args)} (its weights' "
                             "sha256 differs): decode with the model that tokenized it")
    else:
        sequences, sources = load_token_file(args.tokens)
    file_kind = "quantized" if sequences[0].dim() == 1 else "continuous"
    if file_kind != tok.config.latent_kind:
        raise UsageError(f"{args.tokens} holds {file_kind} tokens but the model {model_label(args)} is "
                         f"{tok.config.latent_kind}")
    try:
        sequences = tok.check_tokens(sequences)  # every sequence, before any image is written
    except (ValueError, TypeError) as err:
        raise InputError(f"{args.tokens}: {err} (counting the file's images from 0)") from None
    out_dir = Path(args.output)
    names = output_names(sources)
    refuse_inputs_as_outputs([out_dir, *(out_dir / name for name in names)], [args.tokens])
    with staged_directory(out_dir) as staging, \
            tqdm(total=len(sequences), unit="img", desc="decoding", file=sys.stderr, disable=None) as bar:
        for start in range(0, len(sequences), args.batch_size):
            pixels = tok.decode(sequences[start : start + args.batch_size], batch_size=args.batch_size)
            for offset, image in enumerate(pixels):
                write_atomic(staging / names[start + offset], png_bytes(to_pil(image)))
            bar.update(len(pixels))
    print(f"decoded {len(sequences)} images -> {out_dir}")
    return 0


def reconstruct_arguments(p: argparse.ArgumentParser) -> None:
    model_options(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, metavar="STRIP.png")
    p.add_argument("--max-tokens", type=int, metavar="N", help="largest budget shown (default: model max)")


@command("reconstruct", "PNG strip of an image's reconstruction at every token budget",
         reconstruct_arguments)
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
