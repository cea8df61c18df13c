"""Throughput of ``tokenize_dataset`` (reading and decoding image files included) against ``tok.encode`` on
tensors already in memory, the same images, batches and settings, both measured in one run:

    python -m adaptive_tokenizer.tokenize_bench FOLDER [--limit 200] [--budget 64 | --halt-threshold E]

Each side runs ``--repeats`` times, alternating, after one warm-up batch; the medians and their ratio are printed,
then a JSON summary line. The model is loaded once, before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .dataset_source import open_source
from .image_io import load_images
from .tokenize_dataset import tokenize_dataset
from .tokenizer import AdaptiveTokenizer


def preloaded_rate(tok: AdaptiveTokenizer, pixels: torch.Tensor, batch_size: int, encode_kwargs: dict) -> float:
    """Images per second of ``tok.encode`` over ``pixels`` (already decoded, resized and in memory)."""
    start = time.perf_counter()
    for first in range(0, len(pixels), batch_size):
        tok.encode(pixels[first : first + batch_size], batch_size=batch_size, **encode_kwargs)
    return len(pixels) / (time.perf_counter() - start)


def pipeline_rate(tok: AdaptiveTokenizer, list_file: Path, batch_size: int, workers: int, encode_kwargs: dict) -> float:
    """Images per second of ``tokenize_dataset`` (local engine) from image files to Parquet shards."""
    with tempfile.TemporaryDirectory() as out:
        summary = tokenize_dataset(list_file, out, model=tok, encode_kwargs=encode_kwargs, batch_size=batch_size,
                                   workers=workers, progress=False)
    return summary.images_per_second


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--limit", type=int, default=200, help="first N images of the folder (default: 200)")
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--halt-threshold", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads of the local engine (default: 2)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    encode_kwargs = {k: v for k, v in {"max_tokens": args.max_tokens or args.budget,
                                       "halt_threshold": args.halt_threshold}.items() if v is not None}
    tok = AdaptiveTokenizer.from_pretrained(args.model)
    source = open_source(args.folder)
    paths = [source.image(i) for i in range(min(args.limit, len(source)))]
    pixels = load_images(paths, tok.config.image_size)  # pre-loaded side: decoding not timed
    tok.encode(pixels[: args.batch_size], **encode_kwargs)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        list_file = Path(tmp) / "images.txt"
        list_file.write_text("\n".join(str(p) for p in paths) + "\n")
        preloaded, pipeline = [], []
        for _ in range(args.repeats):
            preloaded.append(preloaded_rate(tok, pixels, args.batch_size, encode_kwargs))
            pipeline.append(pipeline_rate(tok, list_file, args.batch_size, args.workers, encode_kwargs))
    result = {"images": len(paths), "encode_kwargs": encode_kwargs, "batch_size": args.batch_size,
              "workers": args.workers, "torch_threads": torch.get_num_threads(),
              "preloaded_images_per_s": round(statistics.median(preloaded), 2),
              "tokenize_images_per_s": round(statistics.median(pipeline), 2)}
    result["ratio"] = round(result["tokenize_images_per_s"] / result["preloaded_images_per_s"], 3)
    print(f"{len(paths)} images, {encode_kwargs}, batch {args.batch_size}, {torch.get_num_threads()} torch threads")
    print(f"tok.encode on pre-loaded tensors: {result['preloaded_images_per_s']:.2f} images/s "
          f"(runs: {', '.join(f'{r:.2f}' for r in preloaded)})")
    print(f"tokenize from image files:        {result['tokenize_images_per_s']:.2f} images/s "
          f"(runs: {', '.join(f'{r:.2f}' for r in pipeline)})")
    print(f"ratio tokenize / pre-loaded: {result['ratio']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
