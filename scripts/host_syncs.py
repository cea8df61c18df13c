"""Host round trips of the fixed-budget rollout, and its time per iteration, on a device.

    python scripts/host_syncs.py [--device cuda] [--dtype float32] [--batch 16]

For budgets of 1..8 iterations (the default model, random inputs): the host syncs counted by
``bench.HostSyncCounter`` (values read back, ``nonzero``, device-to-host copies) and the rollout's time, best of 5
(CUDA synchronised before and after). Syncs that do not grow with the iterations mean the iterations are queued on the
device without a round trip each; the time per added iteration is then the device's. Prints a table and one JSON
line. ``scripts/gpu_check.sh`` runs it on CUDA.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.bench import HostSyncCounter
from adaptive_tokenizer.rollout import rollout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    tok = AdaptiveTokenizer.from_pretrained(device=args.device, dtype=args.dtype)
    model, device = tok.model, tok.device
    size = tok.config.image_size
    pixels = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    halting = tok.config.dynamic_halting_confidence if tok.config.dynamic_halting else None
    rows = []
    for iterations in range(1, tok.config.max_iterations + 1):
        with torch.no_grad(), HostSyncCounter() as syncs:  # not inference_mode: it hides ops from dispatch modes
            rollout(model, pixels, iterations, halting_confidence=halting)
        times = []
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.inference_mode():
                rollout(model, pixels, iterations, halting_confidence=halting)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        rows.append({"iterations": iterations, "host_syncs": syncs.count, "ms": round(1000 * min(times), 2)})
        print(f"{iterations} iterations: {syncs.count} host syncs {sorted(set(syncs.ops))}, {1000 * min(times):.1f} ms")
    per_iteration = (rows[-1]["ms"] - rows[0]["ms"]) / max(len(rows) - 1, 1)
    print(json.dumps({"device": str(device), "dtype": args.dtype, "batch": args.batch, "rows": rows,
                      "ms_per_added_iteration": round(per_iteration, 2),
                      "syncs_grow_with_iterations": rows[-1]["host_syncs"] > rows[0]["host_syncs"]}))


if __name__ == "__main__":
    main()
