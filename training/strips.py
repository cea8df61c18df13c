"""Before / after strips: an image's reconstructions at a few budgets by one or more models, side by side, each
panel labelled with its PSNR and sharpness (and chroma for greyscale inputs).

    python -m training.strips evaluation/photos/chelsea.png evaluation/photos/camera.png \
        --model adaptive_tokenizer/weights/alit-photos-128 --name release --budgets 32,128,256 -o docs/strips.png

One row per (image, model): the preprocessed input, then the clamped reconstruction at each budget.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

from adaptive_tokenizer import AdaptiveTokenizer, metrics
from adaptive_tokenizer.image_io import labelled_strip, load_images, to_pil
from adaptive_tokenizer.metrics import psnr


def strip_rows(image_paths: list[str], models: list[tuple[str, AdaptiveTokenizer]],
               budgets: list[int]) -> list[Image.Image]:
    rows = []
    for path in image_paths:
        for name, tok in models:
            inputs = load_images([path], tok.config.image_size)
            pixels, _ = tok.reconstructions(inputs, max_tokens=max(budgets))
            grey = bool(metrics.is_greyscale(inputs)[0])
            panels, labels = [to_pil(inputs[0])], [path.rsplit("/", 1)[-1]]
            for budget in budgets:
                recon = pixels[:, budget // tok.tokens_per_iteration - 1]
                label = (f"{name} {budget}: {psnr(recon, inputs).item():.1f} dB, "
                         f"sharp {metrics.sharpness_ratio(recon, inputs).item():.2f}")
                if grey:
                    label += f", chroma {255 * metrics.chroma(recon).item():.1f}/255"
                panels.append(to_pil(recon[0]).resize((256, 256), Image.Resampling.NEAREST))
                labels.append(label)
            panels[0] = panels[0].resize((256, 256), Image.Resampling.NEAREST)
            rows.append(labelled_strip(panels, labels))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.strips", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--model", action="append", required=True, help="model folder (repeat for more rows)")
    parser.add_argument("--name", action="append", help="label of each --model (default: its folder name)")
    parser.add_argument("--budgets", default="32,128,256")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    names = args.name or [path.rstrip("/").rsplit("/", 1)[-1] for path in args.model]
    if len(names) != len(args.model):
        parser.error("give one --name per --model")
    models = [(name, AdaptiveTokenizer.from_pretrained(path)) for name, path in zip(names, args.model)]
    with torch.inference_mode():
        rows = strip_rows(args.images, models, [int(b) for b in args.budgets.split(",")])
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    sheet.save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
