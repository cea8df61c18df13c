"""Evaluate an exported model the way the quality bars are stated: 128 px centre crops (the library's own
preprocessing), mean L1 of the decoded (clamped) reconstruction at every budget, and of the base tokenizer's own
reconstruction, all through the public API (``AdaptiveTokenizer.from_pretrained``); beside L1 the sharpness
(``sharp_*``: mean grey gradient magnitude over the inputs', ``adaptive_tokenizer.metrics``).

    python -m training.evaluate --model ../runs/alit/export --data FOLDER [--split ../runs/alit/split.json]
    python -m training.evaluate --base ../runs/vq/export --data FOLDER --split ../runs/vq/split.json

``--split``: evaluate only the held-out (``val``) files of a run's ``split.json``; otherwise every image in the
folder. ``--base``: a stage-1 export (VQ autoencoder only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adaptive_tokenizer.metrics import gradient_magnitude, l1_error
from adaptive_tokenizer.model import base_reconstruction_error

from .data import list_images, load_val_images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="exported ALIT model folder")
    parser.add_argument("--base", help="stage-1 export folder")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", help="a run's split.json: evaluate its held-out files only")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = json.loads(Path(args.split).read_text())["val"] if args.split else list_images(args.data)
    result: dict = {"images": len(names[: args.limit] if args.limit else names)}
    with torch.inference_mode():
        if args.model:
            from adaptive_tokenizer import AdaptiveTokenizer

            tok = AdaptiveTokenizer.from_pretrained(args.model)
            pixels = load_val_images(args.data, names, tok.config.image_size, args.limit)
            errors, base_errors, gradients, input_gradients = [], [], [], []
            for start in range(0, len(pixels), args.batch_size):
                x = pixels[start : start + args.batch_size]
                recon, _ = tok.reconstructions(x)
                errors.append(l1_error(recon, x[:, None]))
                gradients.append(gradient_magnitude(recon.flatten(0, 1)).view(recon.shape[:2]))
                input_gradients.append(gradient_magnitude(x))
                base_errors.append(base_reconstruction_error(tok.model.base, x))
            errors = torch.cat(errors).mean(0)
            T = tok.tokens_per_iteration
            result.update({f"l1_{T * (i + 1)}": round(e.item(), 5) for i, e in enumerate(errors)})
            sharpness = torch.cat(gradients).sum(0) / torch.cat(input_gradients).sum()
            result.update({f"sharp_{T * (i + 1)}": round(v.item(), 4) for i, v in enumerate(sharpness)})
            result["l1_base"] = round(torch.cat(base_errors).mean().item(), 5)
        if args.base:
            from .vq import evaluate, load_base

            model = load_base(args.base)
            pixels = load_val_images(args.data, names, model.config.resolution, args.limit)
            result["base_only"] = evaluate(model, pixels, args.batch_size)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
