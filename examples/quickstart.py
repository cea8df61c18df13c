"""Quickstart: one image at several token budgets, and adaptively, with a labelled PNG strip.

    python examples/quickstart.py IMAGE [--model MODEL] [-o quickstart_strip.png] [--halt-threshold 0.06]

Without ``--model`` it uses the default model embedded in the package (``AdaptiveTokenizer.from_pretrained()``,
no download); ``--model`` takes anything ``from_pretrained`` takes (a name, ``org/name``, a directory).
"""

from __future__ import annotations

import argparse

from PIL import Image

from adaptive_tokenizer import AdaptiveTokenizer
from adaptive_tokenizer.image_io import labelled_strip, load_images, to_pil

BUDGETS = (32, 64, 128, 256)
PANEL_SIZE = 256  # smaller models' images are shown enlarged (nearest neighbour), so that the labels fit


def panel(pixels) -> Image.Image:
    image = to_pil(pixels)
    return image if image.width >= PANEL_SIZE else image.resize((PANEL_SIZE, PANEL_SIZE), Image.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("-o", "--output", default="quickstart_strip.png")
    parser.add_argument("--halt-threshold", type=float, default=0.06,
                        help="adaptive length: fewest tokens whose mean absolute pixel error is <= this")
    args = parser.parse_args()

    tok = AdaptiveTokenizer.from_pretrained(args.model)
    image = load_images(args.image, tok.config.image_size)  # [1, 3, R, R] in [0, 1]: what the model sees
    panels, labels = [panel(image[0])], ["input"]

    for budget in (b for b in BUDGETS if b <= tok.max_tokens):
        result = tok.encode(image, budget=budget)  # exactly `budget` tokens
        pixels = tok.decode(result)
        error = (pixels - image).abs().mean().item()
        print(f"budget {budget:>3}: {int(result.num_tokens[0])} tokens, L1 {error:.4f}")
        panels.append(panel(pixels[0]))
        labels.append(f"{budget} tok  L1 {error:.3f}")

    result = tok.encode(image, halt_threshold=args.halt_threshold)  # the image picks its own length
    pixels = tok.decode(result)
    count, error = int(result.num_tokens[0]), (pixels - image).abs().mean().item()
    print(f"adaptive (target {args.halt_threshold}): {count} tokens, L1 {error:.4f} "
          f"(unclamped error the choice compared: {float(result.errors[0]):.4f})")
    panels.append(panel(pixels[0]))
    labels.append(f"adaptive {count} tok  L1 {error:.3f}")

    labelled_strip(panels, labels).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
