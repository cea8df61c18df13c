"""Peak memory of ``tok.encode`` over many image paths: does it grow with their number?

    python scripts/encode_memory.py [--counts 50,5000] [--budget 32] [--batch-size 16]

Each count runs in a fresh Python process (``resource.getrusage`` peak RSS of that process), encoding the
evaluation photos repeated to ``count`` paths with the embedded default model. Prints one line per count and one
JSON line with the peaks and their difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import resource, sys, torch
from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.image_io import list_image_files
count, budget, batch_size = (int(v) for v in sys.argv[1:4])
photos = [str(p) for p in list_image_files("evaluation/photos")]
paths = [photos[i % len(photos)] for i in range(count)]
torch.set_num_threads(2)
result = AdaptiveTokenizer.from_pretrained().encode(paths, budget=budget, batch_size=batch_size)
assert len(result) == count
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="50,5000")
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    peaks = {}
    for count in [int(c) for c in args.counts.split(",")]:
        out = subprocess.run([sys.executable, "-c", CHILD, str(count), str(args.budget), str(args.batch_size)],
                             capture_output=True, text=True, check=True)
        peaks[count] = int(out.stdout.split()[-1])
        print(f"{count:6d} paths: peak RSS {peaks[count] / 2**20:.0f} MiB")
    counts = sorted(peaks)
    print(json.dumps({"budget": args.budget, "batch_size": args.batch_size,
                      "peak_rss_mib": {c: round(peaks[c] / 2**20, 1) for c in counts},
                      "difference_mib": round((peaks[counts[-1]] - peaks[counts[0]]) / 2**20, 1)}))


if __name__ == "__main__":
    main()
