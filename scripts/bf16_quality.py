"""What bfloat16 costs in tokens and quality against float32, on a folder of photos.

    python scripts/bf16_quality.py evaluation/photos [--limit N] [--model M]

For each photo: the tokens at the longest budget in float32 and in bfloat16 (with the cached rollout a budget's
tokens are the prefix of the longest), the share of photos whose bfloat16 tokens equal the float32 ones at each
budget, the mean L1 (clamped reconstruction against the input) at each budget in both dtypes, and whether the
bfloat16 tokens are batch-invariant (each photo alone against the whole folder in one batch). Prints a table and
one JSON line. Speed is not measured here: ``bench --dtype bfloat16`` does that, side by side with float32.
"""

from __future__ import annotations

import argparse
import json

import torch

from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.image_io import list_image_files, load_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    paths = [str(p) for p in list_image_files(args.folder)[: args.limit]]
    results = {}
    for dtype in ("float32", "bfloat16"):
        tok = AdaptiveTokenizer.from_pretrained(args.model, dtype=dtype)
        pixels = load_images(paths, tok.config.image_size)
        tokens = tok.encode(pixels, batch_size=len(paths)).tokens
        alone = [tok.encode(image, batch_size=1).tokens[0] for image in pixels]
        panels, _ = tok.reconstructions(pixels, batch_size=len(paths))  # [N, I, 3, R, R] clamped
        l1 = (panels - pixels[:, None]).abs().mean(dim=(2, 3, 4))  # [N, I]
        results[dtype] = {"tokens": tokens, "alone": alone, "l1": l1}
    per = tok.tokens_per_iteration
    budgets = [per * (i + 1) for i in range(tok.config.max_iterations)]
    fp32, bf16 = results["float32"], results["bfloat16"]
    same = [sum(torch.equal(a[:b], c[:b]) for a, c in zip(fp32["tokens"], bf16["tokens"])) / len(paths)
            for b in budgets]
    ids_same = [float(torch.cat([(a[:b] == c[:b]).float() for a, c in zip(fp32["tokens"], bf16["tokens"])]).mean())
                for b in budgets]
    invariant = {dtype: sum(torch.equal(a, b) for a, b in zip(r["tokens"], r["alone"])) / len(paths)
                 for dtype, r in results.items()}
    print(f"{len(paths)} photos of {args.folder}; batch-invariant tokens: float32 {invariant['float32']:.0%}, "
          f"bfloat16 {invariant['bfloat16']:.0%}")
    print(f"{'budget':>6} {'same tokens':>11} {'same ids':>8} {'L1 fp32':>8} {'L1 bf16':>8}")
    for i, b in enumerate(budgets):
        print(f"{b:>6} {same[i]:>11.1%} {ids_same[i]:>8.1%} {float(fp32['l1'][:, i].mean()):>8.4f} "
              f"{float(bf16['l1'][:, i].mean()):>8.4f}")
    print(json.dumps({"photos": len(paths), "folder": args.folder, "budgets": budgets,
                      "share_same_tokens": [round(v, 4) for v in same],
                      "share_same_ids": [round(v, 4) for v in ids_same],
                      "l1_float32": [round(float(v), 5) for v in fp32["l1"].mean(0)],
                      "l1_bfloat16": [round(float(v), 5) for v in bf16["l1"].mean(0)],
                      "batch_invariant": invariant}))


if __name__ == "__main__":
    main()
