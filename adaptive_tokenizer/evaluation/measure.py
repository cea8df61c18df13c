"""One pass over the images: every metric of every image at every budget, and of the base tokenizer's own
reconstruction; then the report's per-budget rows and per-image records from these tables.

Every image is preprocessed as the model sees it (resized, centre-cropped to its resolution). Per budget, from one
rollout per image (``AdaptiveTokenizer.reconstructions``): L1, PSNR and SSIM of the reconstruction clamped to
[0, 1] (:mod:`adaptive_tokenizer.metrics`), and the errors ``reconstructions`` returns (``error_unclamped``, L1
before clamping, what ``halt_threshold`` is a target for); the same metrics for the base tokenizer's own
reconstruction (:func:`adaptive_tokenizer.model.base_reconstruction`); sharpness and colour
(:mod:`adaptive_tokenizer.metrics`) per budget and for the base; the image's complexity (:func:`jpeg_complexity`).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from .. import metrics
from ..image_io import load_images, to_pil
from ..metrics import l1_error, psnr, ssim
from ..model import base_reconstruction
from ..tokenizer import AdaptiveTokenizer
from .report import BaseScores, BudgetRow, CeilingRow, Fidelity, ImageRecord

JPEG_QUALITY = 90


def jpeg_complexity(image: Tensor, quality: int = JPEG_QUALITY) -> float:
    """JPEG bytes per pixel of ``[3, H, W]`` in [0, 1], encoded in memory by PIL at ``quality`` (default 4:2:0
    chroma subsampling)."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / (image.shape[-1] * image.shape[-2])


def base_pixels(tok: AdaptiveTokenizer, inputs: Tensor) -> Tensor:
    """:func:`~adaptive_tokenizer.model.base_reconstruction` of ``inputs`` on ``tok``'s device and dtype, clamped to
    [0, 1], float32 on the CPU."""
    with torch.inference_mode():
        return base_reconstruction(tok.model.base, inputs.to(device=tok.device, dtype=tok.dtype)).cpu()


def grid_panels(image: Tensor, reconstructions: Tensor, base: Tensor) -> list[Image.Image]:
    """One row of ``grid.png``: the input, its reconstruction at every budget, the base's reconstruction."""
    return [to_pil(image)] + [to_pil(p) for p in reconstructions] + [to_pil(base)]


@dataclass
class Measurements:
    """The tables of one pass: ``[N, I]`` per budget, ``[N, I + 1]`` per budget then the base, ``[N]`` per image."""
    errors: Tensor  # [N, I] unclamped L1 (the rollout's errors)
    predicted: Tensor | None  # [N, I] the length predictor's estimates of errors (None without a predictor)
    l1: Tensor  # [N, I], clamped reconstruction (so are psnr and ssim)
    psnr: Tensor
    ssim: Tensor
    base: Tensor  # [N, 3]: l1, psnr, ssim of the base's reconstruction
    complexity: np.ndarray  # [N] JPEG bytes per pixel
    gradient: Tensor  # [N, I + 1] mean grey gradient magnitude of the clamped reconstructions
    offset: Tensor  # [N, I + 1] colour offset
    chroma: Tensor  # [N, I + 1]
    input_gradient: Tensor  # [N]
    greyscale: Tensor  # [N] bool
    panels: dict[int, list[Image.Image]] = field(default_factory=dict)  # grid rows kept during the pass


def measure_batch(tok: AdaptiveTokenizer, inputs: Tensor, max_tokens: int | None) -> tuple[dict[str, Tensor],
                                                                                           Tensor, Tensor]:
    """The tables of :class:`Measurements` for one batch ``[n, 3, R, R]``, with the reconstructions ``[n, I, 3, R,
    R]`` and the base's ``[n, 3, R, R]``."""
    # [n, I, 3, R, R], [n, I]
    pixels, errors = tok.reconstructions(inputs, max_tokens=max_tokens, batch_size=len(inputs))
    n, iterations = errors.shape
    flat = pixels.flatten(0, 1)
    targets = inputs[:, None].expand_as(pixels).flatten(0, 1)
    base = base_pixels(tok, inputs)
    with_base = torch.cat([pixels.float(), base[:, None]], 1).flatten(0, 1)  # every budget, then the base
    references = inputs[:, None].expand(n, iterations + 1, *inputs.shape[1:]).flatten(0, 1)
    tables = {"errors": errors.float(), "l1": l1_error(flat, targets).view(n, iterations),
              "psnr": psnr(flat, targets).view(n, iterations), "ssim": ssim(flat, targets).view(n, iterations),
              "base": torch.stack([l1_error(base, inputs), psnr(base, inputs), ssim(base, inputs)], 1),
              "complexity": torch.tensor([jpeg_complexity(image) for image in inputs], dtype=torch.float64),
              "gradient": metrics.gradient_magnitude(with_base).view(n, -1),
              "offset": metrics.colour_offset(with_base, references).view(n, -1),
              "chroma": metrics.chroma(with_base).view(n, -1),
              "input_gradient": metrics.gradient_magnitude(inputs), "greyscale": metrics.is_greyscale(inputs)}
    if tok.model.length_predictor is not None:
        tables["predicted"] = tok.predict_errors(inputs, batch_size=len(inputs))[:, :iterations]
    return tables, pixels, base


def measure_images(tok: AdaptiveTokenizer, paths: Sequence[str | os.PathLike], *, batch_size: int,
                   max_tokens: int | None, keep_panels: bool, progress: bool | None) -> Measurements:
    """Measure every image of ``paths`` in batches (``keep_panels``: also keep their grid rows); ``progress``: a tqdm
    bar on stderr (None: when stderr is a terminal)."""
    tables: dict[str, list[Tensor]] = {}
    panels: dict[int, list[Image.Image]] = {}
    with tqdm(total=len(paths), unit="img", desc="evaluating", file=sys.stderr,
              disable=None if progress is None else not progress) as bar:
        for start in range(0, len(paths), batch_size):
            inputs = load_images([str(p) for p in paths[start : start + batch_size]], tok.config.image_size)
            batch, pixels, base = measure_batch(tok, inputs, max_tokens)
            for key, value in batch.items():
                tables.setdefault(key, []).append(value)
            if keep_panels:
                panels.update({start + row: grid_panels(inputs[row], pixels[row], base[row])
                               for row in range(len(inputs))})
            bar.update(len(inputs))
    joined = {key: torch.cat(values) for key, values in tables.items()}
    joined["complexity"] = joined["complexity"].numpy()
    joined.setdefault("predicted", None)
    return Measurements(**joined, panels=panels)


def fidelity_row(measured: Measurements, column: int) -> Fidelity:
    """Sharpness (a ratio of means over the images), colour offset and greyscale chroma of one column of the
    ``[N, I + 1]`` tables (the last: the base)."""
    greyscale = measured.greyscale
    grey_chroma = float(measured.chroma[greyscale, column].mean()) if greyscale.any() else None
    sharpness = measured.gradient[:, column].sum() / measured.input_gradient.sum().clamp_min(1e-12)
    return Fidelity(sharpness=float(sharpness), colour_offset=float(measured.offset[:, column].mean()),
                    greyscale_chroma=grey_chroma, greyscale_images=int(greyscale.sum()))


def budget_rows(measured: Measurements, budgets: Sequence[int], grid_tokens: int) -> tuple[list[BudgetRow],
                                                                                            CeilingRow]:
    """The ``fixed`` rows (means over the images per budget) and the ``base_ceiling`` row."""
    fixed = [BudgetRow(budget=b, l1=float(measured.l1[:, i].mean()), psnr=float(measured.psnr[:, i].mean()),
                       ssim=float(measured.ssim[:, i].mean()), error_unclamped=float(measured.errors[:, i].mean()),
                       fidelity=fidelity_row(measured, i)) for i, b in enumerate(budgets)]
    base = measured.base
    ceiling = CeilingRow(l1=float(base[:, 0].mean()), psnr=float(base[:, 1].mean()), ssim=float(base[:, 2].mean()),
                         grid_tokens=grid_tokens, fidelity=fidelity_row(measured, len(budgets)))
    return fixed, ceiling


def image_records(measured: Measurements, names: Sequence[str], budgets: Sequence[int],
                  chosen: Tensor) -> list[ImageRecord]:
    """One record per image; ``chosen`` ``[T, N]``: the iteration chosen at each adaptive threshold."""
    m, records = measured, []
    for i, name in enumerate(names):
        records.append(ImageRecord(
            file=name, complexity=float(m.complexity[i]), l1=m.l1[i].tolist(), error_unclamped=m.errors[i].tolist(),
            predicted_error=m.predicted[i].tolist() if m.predicted is not None else None,
            psnr=m.psnr[i].tolist(), ssim=m.ssim[i].tolist(),
            base=BaseScores(l1=float(m.base[i, 0]), psnr=float(m.base[i, 1]), ssim=float(m.base[i, 2])),
            sharpness=(m.gradient[i] / m.input_gradient[i].clamp_min(1e-12)).tolist(),
            colour_offset=m.offset[i].tolist(), chroma=m.chroma[i].tolist(), greyscale=bool(m.greyscale[i]),
            chosen_tokens=[budgets[int(chosen[t, i])] for t in range(len(chosen))]))
    return records
