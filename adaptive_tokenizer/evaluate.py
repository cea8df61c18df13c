"""Evaluation on a folder of images: reconstruction quality per token budget, adaptive length, image complexity.

``adaptive-tokenizer evaluate FOLDER --model MODEL -o OUT_DIR`` (or :func:`evaluate_folder`) writes
``OUT_DIR/report.json`` and four PNG figures (``grid.png``, ``l1_vs_tokens.png``, ``lengths_histogram.png``,
``length_vs_complexity.png``) and prints a compact table.

What is measured (every image preprocessed as the model sees it: resized, centre-cropped to its resolution):

* **Fixed budgets** 32, 64, ..., max: mean L1, PSNR and SSIM of the reconstruction *clamped to [0, 1]* against the
  preprocessed input, from one rollout per image (``AdaptiveTokenizer.reconstructions``). ``error_unclamped`` is
  the mean of the errors ``reconstructions`` returns (L1 before clamping), what ``halt_threshold`` is a target for.
* **Base ceiling**: the VQGAN's own reconstruction (encode -> nearest codes -> ``decode_ids``), same metrics.
* **Sharpness and colour** (:mod:`adaptive_tokenizer.metrics`), per budget and for the ceiling: ``sharpness``, the
  mean grey gradient magnitude (Rec. 601 luma, forward differences) of the clamped reconstructions over the
  inputs' (a ratio of means over the images; 1 = as sharp as the input); ``colour_offset``, the mean over images
  and channels of |channel mean of the reconstruction - of the input|; ``greyscale_chroma``, over the greyscale
  inputs only (no pixel's channels more than 2/255 from their mean), the mean |channel - mean of the channels| of
  the reconstruction (``null`` without greyscale inputs).
* **Adaptive length** at several thresholds: each image's length is the first budget whose error is
  ``<=`` the threshold, else the budget with the lowest error (first on ties): exactly the exact rule of
  ``encode(halt_threshold=...)`` (the tests check they agree). Reported: mean tokens, mean L1 of the chosen
  (clamped) reconstruction, a histogram of lengths. The threshold whose mean length is closest to
  ``target_tokens`` (128) is compared with a fixed budget of 128 for every image and with the **best allocation**
  (:func:`best_allocation`): the lengths, at most ``target_tokens`` on average, that minimise the mean L1 knowing
  every image's errors, the bound on what any halting rule could reach on these images. ``per_image``
  (:func:`paired_difference`): images better / worse / the same than at the fixed budget, and a seeded bootstrap
  95% interval of the mean difference.
* **Complexity**: JPEG bytes per pixel of the model-resolution input (PIL, quality 90, default 4:2:0 chroma
  subsampling, in memory); Spearman correlations of complexity with the chosen length (at the ~128 threshold) and
  with the L1 error at each fixed budget.

Metric conventions: pixels in [0, 1]. PSNR = ``10 log10(1 / MSE)`` per image, then averaged over images; identical
images would give infinity, so PSNR is **capped at** :data:`PSNR_CAP_DB` (100 dB: MSE floored at 1e-10), which keeps
``report.json`` valid JSON. SSIM is Wang et al. (2004): Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, data
range 1, "valid" filtering (no padding), the SSIM map averaged per channel, then over the three RGB channels (no
downsampling: at 256 px Wang's reference code would not downsample either), filtered in float32.
``ssim(x, x) == 1`` exactly.

* **Length rules** (``length_rules`` in the report, :mod:`~adaptive_tokenizer.length_report`): the exact, search
  and predicted rules (the last with a model that has a length predictor, whose estimates are made for every
  image) at the target whose mean length is closest to ``target_tokens``: mean tokens and L1, the share of images
  reaching the target, the smallest fixed budget reaching the same share, Spearman with complexity, decodes per
  image, and for the predicted rule its agreement with the exact rule and its mean absolute error.

Automatic thresholds: the per-image choice only changes at the observed errors, so every distinct
outcome is reached by a threshold between two consecutive distinct errors. For target mean lengths evenly
spread from the shortest to the longest achievable mean (and ``target_tokens``), the candidate whose mean length is
closest is kept; each kept threshold is a short decimal inside the middle half of its gap, so tiny numeric
differences between batched rollouts cannot change a choice.

Figures (PIL only, drawn by the small :class:`Plot` helper): ``grid.png``, up to 4 images spread over complexity
(least to most complex; their rollouts are re-run after the pass when the folder has more images), each row the
input, every budget and the VQGAN ceiling, labelled with L1; ``l1_vs_tokens.png``, mean L1 per budget, the ceiling
as a dashed line and the adaptive levels at their mean lengths; ``lengths_histogram.png``, chosen lengths per
threshold; ``length_vs_complexity.png``, chosen length at the ~128 threshold against complexity, Spearman in the
title. ``metadata.elapsed_s`` is the evaluation's wall time (model loading excluded).
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from tqdm import tqdm

from . import metrics
from .image_io import labelled_strip, list_image_files, load_images, to_pil
from .io_utils import png_bytes, write_atomic
from .length_report import rules_report, threshold_candidates
from .length_rules import choose_iterations
from .stats import pearson, rankdata, spearman  # noqa: F401  (re-exported: evaluate's public helpers)
from .tokenizer import AdaptiveTokenizer

REPORT_FORMAT = "adaptive-tokenizer-evaluation/1"
PSNR_CAP_DB = 100.0
JPEG_QUALITY = 90
TARGET_TOKENS = 128
FIGURES = {"grid": "grid.png", "l1_vs_tokens": "l1_vs_tokens.png", "lengths_histogram": "lengths_histogram.png",
           "length_vs_complexity": "length_vs_complexity.png"}


# ---- metrics -------------------------------------------------------------------------------------------------
def l1_error(x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute difference per image: ``[N, C, H, W]`` x2 -> ``[N]`` (float64)."""
    return (x.double() - y.double()).abs().mean(dim=(1, 2, 3))


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR in dB per image, ``[N]``; identical images give :data:`PSNR_CAP_DB` (MSE floored at 1e-10)."""
    mse = (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3))
    floor = data_range ** 2 * 10 ** (-PSNR_CAP_DB / 10)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(floor))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """Normalised 1-D Gaussian, float64 ``[size]``."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return window / window.sum()


def ssim(x: Tensor, y: Tensor, *, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """SSIM (Wang et al. 2004) per image, ``[N, C, H, W]`` x2 -> ``[N]`` float64: the SSIM map (Gaussian window,
    "valid" filtering) averaged per channel, then over channels. The filtering runs in float32 (17x faster than
    float64 on CPU; results differ by < 1e-6); ``ssim(x, x)`` is exactly 1."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two [N, C, H, W] tensors of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim needs images of at least {window_size}x{window_size} pixels, got {tuple(x.shape)}")
    x, y = x.float(), y.float()
    channels = x.shape[1]
    groups = 5 * channels
    window = gaussian_window(window_size, sigma).to(device=x.device, dtype=torch.float32)
    kernel_h = window.view(1, 1, 1, -1).expand(groups, 1, 1, window_size)
    kernel_v = window.view(1, 1, -1, 1).expand(groups, 1, window_size, 1)
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    blurred = F.conv2d(F.conv2d(stacked, kernel_h, groups=groups), kernel_v, groups=groups)
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = blurred.split(channels, dim=1)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    sigma_x, sigma_y = mean_xx - mu_x * mu_x, mean_yy - mu_y * mu_y
    sigma_xy = mean_xy - mu_x * mu_y
    ssim_map = (((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2))
                / ((mu_x * mu_x + mu_y * mu_y + c1) * (sigma_x + sigma_y + c2)))
    return ssim_map.double().mean(dim=(2, 3)).mean(dim=1)


def jpeg_complexity(image: Tensor, quality: int = JPEG_QUALITY) -> float:
    """JPEG bytes per pixel of ``[3, H, W]`` in [0, 1], encoded in memory by PIL at ``quality``."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / (image.shape[-1] * image.shape[-2])


# ---- adaptive length choice ----------------------------------------------------------------------------------
def paired_difference(differences: Tensor, *, resamples: int = 10000, seed: int = 0) -> dict:
    """Per-image L1 differences (adaptive minus fixed, ``[N]``): how many images are better / worse / the same,
    and a seeded percentile-bootstrap 95% interval of their mean (images resampled with replacement)."""
    values = differences.double().numpy()
    generator = np.random.default_rng(seed)
    means = values[generator.integers(len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"better": int((values < 0).sum()), "worse": int((values > 0).sum()), "same": int((values == 0).sum()),
            "mean": float(values.mean()), "bootstrap_95": [float(low), float(high)], "resamples": resamples}


def best_allocation(errors: Tensor, units_per_image: float) -> Tensor:
    """The per-image lengths that minimise the summed error for a mean length of at most ``units_per_image``
    iterations, knowing every image's error at every length: ``errors [N, I]`` -> iteration indices ``[N]``
    (0-based; index ``k`` costs ``k + 1`` iterations).

    Exact (a multiple-choice knapsack solved by dynamic programming over the images, ``O(N^2 I^2)`` work). No
    length rule can beat it on these errors, so it bounds what any halting criterion could gain over a fixed
    budget (which is one of the allocations it considers when ``units_per_image`` is a whole number).
    """
    num_images, iterations = errors.shape
    capacity = int(math.floor(units_per_image * num_images + 1e-9))
    if capacity < num_images:
        raise ValueError(f"units_per_image must be at least 1 (every image takes one iteration), "
                         f"got {units_per_image}")
    values = errors.double().numpy()
    best = np.zeros(capacity + 1)  # best[u]: least summed error of the images so far using at most u iterations
    choices = np.zeros((num_images, capacity + 1), dtype=np.int16)
    for image in range(num_images):
        options = np.full((iterations, capacity + 1), np.inf)
        for index in range(min(iterations, capacity)):  # lengths longer than the whole budget never fit
            cost = index + 1
            options[index, cost:] = best[: capacity + 1 - cost] + values[image, index]
        choices[image] = options.argmin(axis=0)  # the shortest length on ties
        best = options.min(axis=0)
    chosen = np.zeros(num_images, dtype=np.int64)
    units = capacity
    for image in reversed(range(num_images)):
        chosen[image] = choices[image, units]
        units -= int(chosen[image]) + 1
    return torch.from_numpy(chosen)


def auto_thresholds(errors: Tensor, budgets: Sequence[int], *, target_tokens: int = TARGET_TOKENS,
                    count: int = 5) -> list[float]:
    """Thresholds whose mean chosen lengths spread over the achievable range, including the one whose mean length
    is closest to ``target_tokens`` (see the module docstring). ``errors`` ``[N, I]``. Sorted ascending, distinct
    outcomes, non-negative."""
    candidates = threshold_candidates(errors)
    chosen = torch.cat([choose_iterations(errors, candidates[i : i + 64]) for i in range(0, len(candidates), 64)])
    lengths = torch.as_tensor(budgets, dtype=torch.float64)[chosen].mean(dim=1).numpy()
    spread = np.linspace(lengths.min(), lengths.max(), count)
    spacing = (lengths.max() - lengths.min()) / max(count - 1, 1)
    # the target_tokens level replaces the spread level nearest to it
    targets = [t for t in spread.tolist() if abs(t - target_tokens) >= spacing / 2] + [float(target_tokens)]
    picked = {int(np.argmin(np.abs(lengths - target))) for target in targets}  # argmin: the first on ties
    # drop thresholds that repeat another's choices for every image
    kept: dict[tuple[int, ...], float] = {}
    for index in sorted(picked):
        kept.setdefault(tuple(chosen[index].tolist()), candidates[index])
    return sorted(kept.values())


def parse_thresholds(text: str) -> list[float]:
    """``"0.05,0.1"`` -> ``[0.05, 0.1]``; ValueError unless every item is a finite number >= 0."""
    try:
        values = [float(item) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"--thresholds takes comma-separated non-negative numbers (target errors: mean absolute "
                         f"pixel error in [0, 1] units, see halt_threshold), e.g. 0.05,0.07, got {text!r}")
    return sorted(set(values))


# ---- plotting (PIL only) -------------------------------------------------------------------------------------
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError, AttributeError):
        return ImageFont.load_default()


def nice_ticks(low: float, high: float, count: int = 6) -> tuple[list[float], float]:
    """Round tick values covering [low, high] (steps of 1, 2, 2.5 or 5 times a power of ten) and the step."""
    if not high > low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.ceil(low / step - 1e-9)
    ticks = []
    index = first
    while index * step <= high + step * 1e-9:
        ticks.append(round(index * step, 12))
        index += 1
    return ticks, step


def format_tick(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-12))
    if decimals and not math.isclose(round(step, decimals), step, rel_tol=1e-9):
        decimals += 1  # steps such as 0.25
    return f"{value:.{decimals}f}"


def padded_range(values: Sequence[float], pad: float = 0.06, include_zero: bool = False) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if include_zero:
        low = min(low, 0.0)
    span = high - low if high > low else (abs(high) or 1.0)
    return (low if include_zero and low == 0 else low - pad * span), high + pad * span


class Plot:
    """A tiny PIL chart: one axes box with ticks, grid lines, axis labels, a title and a legend.

    Draw in data coordinates (``line``, ``scatter``, ``hline``, ``bar``, ``text``), then ``finish()`` returns the
    RGB image. Limits are fixed at construction; callers choose them to contain the data.
    """

    def __init__(self, title: str, xlabel: str, ylabel: str, xlim: tuple[float, float], ylim: tuple[float, float],
                 *, size: tuple[int, int] = (800, 520), xticks: Sequence[float] | None = None,
                 yticks: Sequence[float] | None = None):
        self.image = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font, self.small, self.title_font = _font(14), _font(12), _font(16)
        width, height = size
        self.box = (84, 48, width - 24, height - 64)  # left, top, right, bottom (pixels)
        self.xlim, self.ylim = xlim, ylim
        self.legend: list[tuple[str, str, str]] = []  # (label, colour, kind)
        self.occupied: list[tuple[float, float]] = []  # pixels holding data, to place the legend away from them
        self.labels: list[tuple[float, float, float, float]] = []  # boxes of the annotations drawn so far
        self._axes(title, xlabel, ylabel, xticks, yticks)

    def px(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    def _axes(self, title: str, xlabel: str, ylabel: str, xticks: Sequence[float] | None,
              yticks: Sequence[float] | None) -> None:
        left, top, right, bottom = self.box
        draw = self.draw
        for axis, given in (("x", xticks), ("y", yticks)):
            low, high = self.xlim if axis == "x" else self.ylim
            ticks, step = (list(given), 0.0) if given is not None else nice_ticks(low, high)
            for value in ticks:
                if not low - 1e-12 <= value <= high + 1e-12:
                    continue
                label = format_tick(value, step) if step else f"{value:g}"
                if axis == "x":
                    x, _ = self.px(value, self.ylim[0])
                    draw.line([(x, top), (x, bottom)], fill="#e6e6e6")
                    draw.line([(x, bottom), (x, bottom + 5)], fill="black")
                    draw.text((x, bottom + 8), label, fill="black", font=self.small, anchor="ma")
                else:
                    _, y = self.px(self.xlim[0], value)
                    draw.line([(left, y), (right, y)], fill="#e6e6e6")
                    draw.line([(left - 5, y), (left, y)], fill="black")
                    draw.text((left - 8, y), label, fill="black", font=self.small, anchor="rm")
        draw.text(((left + right) / 2, 16), title, fill="black", font=self.title_font, anchor="mm")
        draw.text(((left + right) / 2, self.image.height - 14), xlabel, fill="black", font=self.font, anchor="md")
        text_box = draw.textbbox((0, 0), ylabel, font=self.font)
        label = Image.new("RGB", (text_box[2] - text_box[0] + 4, text_box[3] - text_box[1] + 6), "white")
        ImageDraw.Draw(label).text((2 - text_box[0], 3 - text_box[1]), ylabel, fill="black", font=self.font)
        label = label.rotate(90, expand=True)
        self.image.paste(label, (6, int((top + bottom - label.height) / 2)))

    def _dashed(self, points: list[tuple[float, float]], color: str, width: int, dash: float = 8) -> None:
        for (xa, ya), (xb, yb) in zip(points[:-1], points[1:]):
            length = math.hypot(xb - xa, yb - ya)
            steps = max(int(length // dash), 1)
            for k in range(0, steps, 2):
                t0, t1 = k / steps, min((k + 1) / steps, 1.0)
                self.draw.line([(xa + (xb - xa) * t0, ya + (yb - ya) * t0), (xa + (xb - xa) * t1,
                                                                              ya + (yb - ya) * t1)],
                               fill=color, width=width)

    def line(self, xs: Sequence[float], ys: Sequence[float], color: str, *, label: str | None = None,
             width: int = 2, dashed: bool = False, markers: bool = True) -> None:
        points = [self.px(x, y) for x, y in zip(xs, ys)]
        for (xa, ya), (xb, yb) in zip(points[:-1], points[1:]):
            self.occupied += [(xa + (xb - xa) * k / 20, ya + (yb - ya) * k / 20) for k in range(21)]
        self.occupied += points
        if dashed:
            self._dashed(points, color, width)
        elif len(points) > 1:
            self.draw.line(points, fill=color, width=width, joint="curve")
        if markers:
            for x, y in points:
                self.draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=color)
        if label:
            self.legend.append((label, color, "dashed" if dashed else "line"))

    def hline(self, y: float, color: str, *, label: str | None = None, dashed: bool = True) -> None:
        self.line(list(self.xlim), [y, y], color, label=label, dashed=dashed, markers=False)

    def scatter(self, xs: Sequence[float], ys: Sequence[float], color: str, *, label: str | None = None,
                radius: float = 4.5, filled: bool = False) -> None:
        for x, y in (self.px(x, y) for x, y in zip(xs, ys)):
            self.occupied.append((x, y))
            box = [x - radius, y - radius, x + radius, y + radius]
            self.draw.ellipse(box, fill=color if filled else None, outline=color, width=2)
        if label:
            self.legend.append((label, color, "filled" if filled else "point"))

    def bar(self, x: float, height: float, width: float, color: str, *, label: str | None = None) -> None:
        x0, y0 = self.px(x - width / 2, 0.0 if self.ylim[0] <= 0 else self.ylim[0])
        x1, y1 = self.px(x + width / 2, height)
        self.draw.rectangle([x0, min(y0, y1), x1, max(y0, y1)], fill=color, outline="black")
        self.occupied += [(x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * j / 8) for i in range(5) for j in range(9)]
        if label:
            self.legend.append((label, color, "bar"))

    def text(self, x: float, y: float, text: str, color: str = "black", offset: tuple[int, int] = (6, -6)) -> bool:
        """Annotate a data point; skipped (returns False) where it would overlap an earlier annotation."""
        px, py = self.px(x, y)
        box = self.draw.textbbox((px + offset[0], py + offset[1]), text, font=self.small, anchor="ld")
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in self.labels):
            return False
        self.labels.append(box)
        self.draw.text((px + offset[0], py + offset[1]), text, fill=color, font=self.small, anchor="ld")
        self.occupied += [(box[0], box[1]), (box[2], box[1]), (box[0], box[3]), (box[2], box[3])]
        return True

    def finish(self) -> Image.Image:
        """Draw the axes box and the legend (in the corner holding the least data) and return the image."""
        left, top, right, bottom = self.box
        self.draw.rectangle([left, top, right, bottom], outline="black")
        if self.legend:
            row = 18
            width = max(self.draw.textlength(label, font=self.small) for label, _, _ in self.legend) + 44
            height = row * len(self.legend) + 8
            corners = [(right - width - 8, top + 8), (left + 8, top + 8), (right - width - 8, bottom - height - 8),
                       (left + 8, bottom - height - 8)]
            x0, y0 = min(corners, key=lambda c: sum(c[0] - 4 <= x <= c[0] + width + 4 and c[1] - 4 <= y
                                                    <= c[1] + height + 4 for x, y in self.occupied))
            self.draw.rectangle([x0, y0, x0 + width, y0 + height], fill="white", outline="#999999")
            for index, (label, color, kind) in enumerate(self.legend):
                y = y0 + 4 + row * index + row / 2
                if kind == "line":
                    self.draw.line([(x0 + 6, y), (x0 + 30, y)], fill=color, width=2)
                elif kind == "dashed":
                    self._dashed([(x0 + 6, y), (x0 + 30, y)], color, 2, dash=5)
                elif kind == "bar":
                    self.draw.rectangle([x0 + 10, y - 5, x0 + 26, y + 5], fill=color, outline="black")
                else:
                    self.draw.ellipse([x0 + 13, y - 4.5, x0 + 22, y + 4.5], fill=color if kind == "filled" else None,
                                      outline=color, width=2)
                self.draw.text((x0 + 36, y), label, fill="black", font=self.small, anchor="lm")
        return self.image


# ---- the evaluation ------------------------------------------------------------------------------------------
def evaluate_folder(tok: AdaptiveTokenizer, folder: str | os.PathLike, out_dir: str | os.PathLike, *,
                    max_images: int | None = None, thresholds: Sequence[float] | None = None,
                    batch_size: int = 8, max_tokens: int | None = None, target_tokens: int = TARGET_TOKENS,
                    grid_images: int = 4, model_name: str | None = None, command: Sequence[str] | None = None,
                    progress: bool | None = None) -> dict:
    """Evaluate ``tok`` on the image files directly inside ``folder`` (sorted by name; the first ``max_images``).

    Writes ``out_dir/report.json`` and the figures of :data:`FIGURES`; returns the report (a JSON-ready dict; NaN
    correlations become ``null``). ``thresholds``: adaptive thresholds (default: chosen automatically). ``max_tokens``:
    the largest budget evaluated (default: the model's maximum). ``progress``: tqdm bar (None: when stderr is a
    terminal). See the module docstring for the definitions.
    """
    started = time.perf_counter()
    folder = Path(folder)
    paths = list_image_files(folder)  # FileNotFoundError when not a folder
    if not paths:
        raise ValueError(f"no image files in folder {folder}")
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        paths = paths[:max_images]
    if thresholds is not None:
        thresholds = sorted({float(t) for t in thresholds})
        if not thresholds or not all(math.isfinite(t) and t >= 0 for t in thresholds):
            raise ValueError(f"thresholds must be non-negative numbers, got {thresholds}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out_dir = Path(out_dir)
    size = tok.config.image_size

    per_image: dict[str, list] = {key: [] for key in ("error", "predicted", "l1", "psnr", "ssim", "base", "complexity")}
    fidelity: dict[str, list] = {key: [] for key in ("gradient", "offset", "chroma", "input_gradient", "greyscale")}
    keep_panels = len(paths) <= grid_images  # else the grid's images are re-run once their complexity is known
    panels: dict[int, list[Image.Image]] = {}
    with tqdm(total=len(paths), unit="img", desc="evaluating", file=sys.stderr,
              disable=None if progress is None else not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch_paths = paths[start : start + batch_size]
            inputs = load_images([str(p) for p in batch_paths], size)  # [n, 3, R, R], what the model sees
            pixels, errors = tok.reconstructions(inputs, max_tokens=max_tokens)  # [n, I, 3, R, R], [n, I]
            n, iterations = errors.shape
            flat = pixels.flatten(0, 1)
            targets = inputs[:, None].expand_as(pixels).flatten(0, 1)
            per_image["error"].append(errors.float())
            if tok.model.length_predictor is not None:
                per_image["predicted"].append(tok.predict_errors(inputs)[:, :iterations])
            per_image["l1"].append(l1_error(flat, targets).view(n, iterations))
            per_image["psnr"].append(psnr(flat, targets).view(n, iterations))
            per_image["ssim"].append(ssim(flat, targets).view(n, iterations))
            base = base_reconstruction(tok, inputs)
            per_image["base"].append(torch.stack([l1_error(base, inputs), psnr(base, inputs), ssim(base, inputs)], 1))
            per_image["complexity"].append(torch.tensor([jpeg_complexity(image) for image in inputs],
                                                        dtype=torch.float64))
            with_base = torch.cat([pixels.float(), base[:, None]], 1).flatten(0, 1)  # every budget, then the base
            references = inputs[:, None].expand(n, iterations + 1, *inputs.shape[1:]).flatten(0, 1)
            fidelity["gradient"].append(metrics.gradient_magnitude(with_base).view(n, -1))
            fidelity["offset"].append(metrics.colour_offset(with_base, references).view(n, -1))
            fidelity["chroma"].append(metrics.chroma(with_base).view(n, -1))
            fidelity["input_gradient"].append(metrics.gradient_magnitude(inputs))
            fidelity["greyscale"].append(metrics.is_greyscale(inputs))
            if keep_panels:
                panels.update({start + row: _panels(inputs[row], pixels[row], base[row]) for row in range(n)})
            bar.update(n)

    errors = torch.cat(per_image["error"])  # [N, I] unclamped
    predicted = torch.cat(per_image["predicted"]) if per_image["predicted"] else None  # [N, I] estimates
    l1 = torch.cat(per_image["l1"])  # [N, I] clamped
    psnrs, ssims = torch.cat(per_image["psnr"]), torch.cat(per_image["ssim"])
    base = torch.cat(per_image["base"])  # [N, 3]: l1, psnr, ssim
    complexity = torch.cat(per_image["complexity"]).numpy()
    num_images, iterations = errors.shape
    budgets = [tok.tokens_per_iteration * (i + 1) for i in range(iterations)]

    fixed = [{"budget": b, "l1": float(l1[:, i].mean()), "psnr": float(psnrs[:, i].mean()),
              "ssim": float(ssims[:, i].mean()), "error_unclamped": float(errors[:, i].mean())}
             for i, b in enumerate(budgets)]
    ceiling = {"l1": float(base[:, 0].mean()), "psnr": float(base[:, 1].mean()), "ssim": float(base[:, 2].mean()),
               "grid_tokens": tok.config.base.grid_size ** 2}
    fidelity = {key: torch.cat(values) for key, values in fidelity.items()}  # [N, I + 1] (last: the base) or [N]
    for column, row in enumerate([*fixed, ceiling]):
        row.update(_fidelity_row(fidelity, column))

    source = "given" if thresholds is not None else "auto"
    if thresholds is None:
        thresholds = auto_thresholds(errors, budgets, target_tokens=target_tokens)
    chosen = choose_iterations(errors, thresholds)  # [T, N] iteration indices
    budget_tensor = torch.tensor(budgets, dtype=torch.float64)
    rows = torch.arange(num_images)
    levels = []
    for index, threshold in enumerate(thresholds):
        pick = chosen[index]
        lengths = budget_tensor[pick]
        levels.append({"threshold": threshold, "mean_tokens": float(lengths.mean()),
                       "mean_l1": float(l1[rows, pick].mean()),
                       "mean_error_unclamped": float(errors[rows, pick].mean()),
                       "met_threshold": float((errors[rows, pick] <= threshold).double().mean()),
                       "histogram": torch.bincount(pick, minlength=iterations).tolist()})
    target_index = int(np.argmin([abs(level["mean_tokens"] - target_tokens) for level in levels]))
    fixed_index = int(np.argmin([abs(b - target_tokens) for b in budgets]))
    target_level = levels[target_index]
    comparison = {"target_tokens": target_tokens, "threshold": target_level["threshold"],
                  "adaptive_mean_tokens": target_level["mean_tokens"], "adaptive_mean_l1": target_level["mean_l1"],
                  "fixed_budget": budgets[fixed_index], "fixed_mean_l1": fixed[fixed_index]["l1"],
                  "l1_difference": target_level["mean_l1"] - fixed[fixed_index]["l1"],
                  "per_image": paired_difference(l1[rows, chosen[target_index]] - l1[:, fixed_index])}
    best = best_allocation(l1, target_tokens / tok.tokens_per_iteration)  # the bound on any length rule
    best_lengths = budget_tensor[best].numpy()
    comparison["best_allocation"] = {"mean_tokens": float(best_lengths.mean()),
                                     "mean_l1": float(l1[rows, best].mean()),
                                     "spearman_length_vs_complexity": spearman(best_lengths, complexity),
                                     "histogram": torch.bincount(best, minlength=iterations).tolist()}

    target_lengths = budget_tensor[chosen[target_index]].numpy()
    complexity_stats = {
        "measure": f"JPEG bytes per pixel (PIL, quality {JPEG_QUALITY}) of the {size}px model input",
        "mean": float(complexity.mean()), "min": float(complexity.min()), "max": float(complexity.max()),
        "spearman_length_vs_complexity": spearman(target_lengths, complexity),
        "length_threshold": target_level["threshold"],
        "spearman_l1_vs_complexity": {str(b): spearman(l1[:, i].numpy(), complexity) for i, b in enumerate(budgets)},
        "fixed_budget": budgets[fixed_index],
        "spearman_l1_at_fixed_budget_vs_complexity": spearman(l1[:, fixed_index].numpy(), complexity),
    }

    images = [{"file": path.name, "complexity": float(complexity[i]),
               "l1": l1[i].tolist(), "error_unclamped": errors[i].tolist(),
               "predicted_error": predicted[i].tolist() if predicted is not None else None,
               "psnr": psnrs[i].tolist(), "ssim": ssims[i].tolist(),
               "base": {"l1": float(base[i, 0]), "psnr": float(base[i, 1]), "ssim": float(base[i, 2])},
               "sharpness": (fidelity["gradient"][i] / fidelity["input_gradient"][i].clamp_min(1e-12)).tolist(),
               "colour_offset": fidelity["offset"][i].tolist(), "chroma": fidelity["chroma"][i].tolist(),
               "greyscale": bool(fidelity["greyscale"][i]),
               "chosen_tokens": [budgets[int(chosen[t, i])] for t in range(len(thresholds))]}
              for i, path in enumerate(paths)]

    out_dir.mkdir(parents=True, exist_ok=True)
    # the grid: images spread over complexity (lowest to highest), each row labelled with its L1 per budget
    order = np.argsort(complexity, kind="stable")
    grid_indices = [int(order[round(k)]) for k in np.linspace(0, num_images - 1, min(grid_images, num_images))]
    grid_indices = list(dict.fromkeys(grid_indices))
    missing = [i for i in grid_indices if i not in panels]
    if missing:
        inputs = load_images([str(paths[i]) for i in missing], size)
        pixels, _ = tok.reconstructions(inputs, max_tokens=max_tokens)
        base_pixels = base_reconstruction(tok, inputs)
        panels.update({i: _panels(inputs[k], pixels[k], base_pixels[k]) for k, i in enumerate(missing)})
    grid_rows = [(paths[i].name, complexity[i], panels[i], l1[i].tolist(), float(base[i, 0])) for i in grid_indices]
    figures = {"grid": _grid_figure(grid_rows, budgets),
               "l1_vs_tokens": _l1_figure(fixed, ceiling, levels, target_index, budgets, target_tokens),
               "lengths_histogram": _histogram_figure(levels, target_index, budgets),
               "length_vs_complexity": _complexity_figure(complexity, target_lengths, target_level,
                                                          complexity_stats["spearman_length_vs_complexity"], budgets)}
    for key, figure in figures.items():
        write_atomic(out_dir / FIGURES[key], png_bytes(figure))

    config = tok.config
    report = {
        "format": REPORT_FORMAT,
        "metadata": {
            "model": model_name, "folder": str(folder), "num_images": num_images,
            "command": list(command) if command is not None else None,
            "elapsed_s": None,  # filled below
            "model_summary": {"image_size": config.image_size, "latent_kind": config.latent_kind,
                              "rollout": config.rollout, "tokens": {"min": budgets[0], "max": budgets[-1],
                                                                    "step": tok.tokens_per_iteration,
                                                                    "model_max": tok.max_tokens},
                              "dynamic_halting": config.dynamic_halting,
                              "dynamic_halting_threshold": config.dynamic_halting_threshold,
                              "length_predictor": config.length_predictor is not None,
                              "encoder": f"{config.encoder_width}x{config.encoder_layers}",
                              "decoder": f"{config.decoder_width}x{config.decoder_layers}",
                              "codebook_size": config.codebook_size if config.quantized else None,
                              "parameters": tok.model.num_parameters(),
                              "description": tok.info.description if tok.info is not None else None},
            "config": config.to_dict(), "device": str(tok.device), "dtype": str(tok.dtype).replace("torch.", ""),
            "torch": torch.__version__, "python": platform.python_version(),
            "metric_notes": {"pixels": "[0, 1]; inputs resized and centre-cropped to the model resolution",
                             "l1_psnr_ssim": "of the reconstruction clamped to [0, 1]",
                             "error_unclamped": "mean |reconstruction - input| before clamping",
                             "predicted_error": "the length predictor's estimate of error_unclamped (null "
                                                "without a predictor)",
                             "psnr": f"per image, capped at {PSNR_CAP_DB:g} dB, then averaged",
                             "ssim": "Wang et al.: gaussian 11 / sigma 1.5, K1 0.01, K2 0.03, valid filtering, mean "
                                     "over the map and the RGB channels",
                             "sharpness": "mean grey (Rec. 601) forward-difference gradient magnitude of the "
                                          "clamped reconstructions / of the inputs, a ratio of means over images",
                             "colour_offset": "mean over images and RGB channels of |channel mean of the "
                                              "reconstruction - of the input|",
                             "greyscale_chroma": "over greyscale inputs (all channels within 2/255 of their mean): "
                                                 "mean |channel - mean of channels| of the reconstruction",
                             "per_image_fidelity": "sharpness, colour_offset, chroma: per budget, then the base",
                             "per_image_lists": "l1, error_unclamped, predicted_error, psnr, ssim are aligned with "
                                                "budgets; chosen_tokens with adaptive.levels; histogram with budgets"},
        },
        "budgets": budgets,
        "fixed": fixed,
        "base_ceiling": ceiling,
        "adaptive": {"thresholds_source": source, "levels": levels, "target_level": target_index,
                     "comparison": comparison},
        "complexity": complexity_stats,
        "length_rules": rules_report(errors, l1, predicted, complexity, budgets, target_tokens,
                                     tok.model.length_predictor.margin if predicted is not None else 0.0),
        "images": images,
        "figures": dict(FIGURES),
        "grid_images": [paths[i].name for i in grid_indices],
    }
    report["metadata"]["elapsed_s"] = round(time.perf_counter() - started, 3)
    report = _json_ready(report)
    text = json.dumps(report, indent=1, allow_nan=False)
    write_atomic(out_dir / "report.json", (text + "\n").encode())
    return report


def _fidelity_row(fidelity: dict[str, Tensor], column: int) -> dict:
    """Sharpness, colour offset and greyscale chroma of one budget (column of ``fidelity``; the last: the base)."""
    greyscale = fidelity["greyscale"]
    grey_chroma = float(fidelity["chroma"][greyscale, column].mean()) if greyscale.any() else None
    sharpness = fidelity["gradient"][:, column].sum() / fidelity["input_gradient"].sum().clamp_min(1e-12)
    return {"sharpness": float(sharpness),
            "colour_offset": float(fidelity["offset"][:, column].mean()),
            "greyscale_chroma": grey_chroma, "greyscale_images": int(greyscale.sum())}


def base_reconstruction(tok: AdaptiveTokenizer, inputs: Tensor) -> Tensor:
    """The VQGAN's own reconstruction (encode -> nearest codes -> decode_ids), clamped to [0, 1], on the CPU."""
    base = tok.model.base
    with torch.inference_mode():
        features = base.encode(inputs.to(device=tok.device, dtype=tok.dtype))
        pixels = base.decode_ids(base.code_ids(features))
    return pixels.float().clamp(0, 1).cpu()


def _json_ready(value):
    """NaN and infinities -> None, tuples -> lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def format_table(report: dict) -> str:
    """The compact stdout summary of a report."""
    lines = [f"{report['metadata']['num_images']} images from {report['metadata']['folder']}",
             f"{'budget':>8}  {'L1':>7}  {'PSNR':>6}  {'SSIM':>6}"]
    for row in report["fixed"]:
        lines.append(f"{row['budget']:>8}  {row['l1']:7.4f}  {row['psnr']:6.2f}  {row['ssim']:6.4f}")
    ceiling = report["base_ceiling"]
    lines.append(f"{'VQGAN':>8}  {ceiling['l1']:7.4f}  {ceiling['psnr']:6.2f}  {ceiling['ssim']:6.4f}  "
                 f"(base ceiling, {ceiling['grid_tokens']} codes)")
    adaptive = report["adaptive"]
    lines.append(f"adaptive ({adaptive['thresholds_source']} thresholds):")
    lines.append(f"{'threshold':>11}  {'tokens':>7}  {'L1':>7}  lengths " + "/".join(str(b) for b in report["budgets"]))
    for index, level in enumerate(adaptive["levels"]):
        mark = f"  <- closest to {adaptive['comparison']['target_tokens']}" if index == adaptive["target_level"] else ""
        lines.append(f"{fmt_threshold(level['threshold']):>11}  {level['mean_tokens']:7.1f}  {level['mean_l1']:7.4f}  "
                     + "/".join(str(c) for c in level["histogram"]) + mark)
    comp = report["adaptive"]["comparison"]
    lines.append(f"adaptive t={fmt_threshold(comp['threshold'])}: L1 {comp['adaptive_mean_l1']:.4f} at "
                 f"{comp['adaptive_mean_tokens']:.1f} tokens on average; fixed {comp['fixed_budget']}: "
                 f"L1 {comp['fixed_mean_l1']:.4f}")
    pair = comp["per_image"]
    lines.append(f"  per image: better {pair['better']}, worse {pair['worse']}, same {pair['same']}; mean difference "
                 f"{pair['mean']:+.4f}, bootstrap 95% [{pair['bootstrap_95'][0]:+.4f}, {pair['bootstrap_95'][1]:+.4f}]")
    best = comp["best_allocation"]
    lines.append(f"best allocation knowing every image's errors (no rule can do better): L1 {best['mean_l1']:.4f} at "
                 f"{best['mean_tokens']:.1f} tokens on average, Spearman(length, complexity) "
                 f"{_fmt(best['spearman_length_vs_complexity'])}")
    cx = report["complexity"]
    lines.append(f"Spearman vs JPEG complexity: chosen length {_fmt(cx['spearman_length_vs_complexity'])}, "
                 f"L1 at {cx['fixed_budget']} tokens {_fmt(cx['spearman_l1_at_fixed_budget_vs_complexity'])}")
    return "\n".join(lines + _fidelity_lines(report) + format_rules(report["length_rules"]))


def format_rules(rules: dict) -> list[str]:
    """The length rules' block of the printed summary."""
    lines = [f"length rules at the target whose mean length is closest to {rules['target_tokens']} tokens:",
             f"{'rule':>10}  {'target E':>9}  {'tokens':>7}  {'L1':>7}  {'reach E':>7}  {'fixed for same':>14}  "
             f"{'Spearman':>8}  {'decodes':>7}"]
    for name in ("exact", "search", "predicted"):
        if name not in rules:
            continue
        row = rules[name]
        fixed = row["fixed_budget_for_same_share"]
        decodes = row.get("decodes_per_image", 0.0)
        lines.append(f"{name:>10}  {fmt_threshold(row['threshold']):>9}  {row['mean_tokens']:7.1f}  "
                     f"{row['mean_l1']:7.4f}  {row['share_meeting_target']:7.1%}  "
                     f"{fixed if fixed is not None else 'none':>14}  {_fmt(row['spearman_length_vs_complexity']):>8}  "
                     f"{decodes:7.2f}")
    if "search" in rules:
        lines.append(f"  search: same length as exact for {rules['search']['same_length_as_exact']:.1%} of images")
    if "predicted" in rules:
        p = rules["predicted"]
        lines.append(f"  predicted: within one iteration of exact {p['within_one_of_exact']:.1%}, same "
                     f"{p['same_length_as_exact']:.1%}; fixed {p['fixed_budget']} reaches its E for "
                     f"{p['fixed_share_meeting_target']:.1%}; predictor MAE {p['predictor_mean_absolute_error']:.4f}")
    return lines


def _fidelity_lines(report: dict) -> list[str]:
    """Sharpness and colour per budget (reports written before these measures have none: no lines)."""
    if "sharpness" not in report["base_ceiling"]:
        return []
    greys = report["base_ceiling"]["greyscale_images"]
    lines = [f"{'budget':>8}  {'sharpness':>9}  {'colour offset':>13}  grey chroma x255 ({greys} greyscale)"]
    for name, row in [*((str(row["budget"]), row) for row in report["fixed"]), ("VQGAN", report["base_ceiling"])]:
        chroma = "n/a" if row["greyscale_chroma"] is None else f"{255 * row['greyscale_chroma']:.2f}"
        lines.append(f"{name:>8}  {row['sharpness']:9.3f}  {row['colour_offset']:13.4f}  {chroma:>6}")
    return lines


def fmt_threshold(value: float) -> str:
    """The shortest decimal that reads back as ``value`` (auto thresholds are chosen to be short)."""
    return repr(float(value))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.3f}"


# ---- figures -------------------------------------------------------------------------------------------------
def _panels(image: Tensor, reconstructions: Tensor, base: Tensor) -> list[Image.Image]:
    return [to_pil(image)] + [to_pil(p) for p in reconstructions] + [to_pil(base)]


def _grid_figure(rows: list, budgets: Sequence[int]) -> Image.Image:

    strips = []
    for name, complexity, panels, l1_row, base_l1 in rows:
        suffix = f" {complexity:.2f}B/px"
        room = max(panels[0].width // 5 - len(suffix), 6)  # the default font is about 5 px per character
        stem = Path(name).stem
        short = stem if len(stem) <= room else stem[: room - 2] + ".."
        labels = ([short + suffix] + [f"{b} tok  L1 {e:.3f}" for b, e in zip(budgets, l1_row)]
                  + [f"VQGAN  L1 {base_l1:.3f}"])
        strips.append(labelled_strip(panels, labels))
    gap = 6
    grid = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips) + gap * (len(strips) - 1)),
                     "white")
    y = 0
    for strip in strips:
        grid.paste(strip, (0, y))
        y += strip.height + gap
    return grid


def _budget_axis(budgets: Sequence[int]) -> tuple[tuple[float, float], list[int]]:
    step = budgets[1] - budgets[0] if len(budgets) > 1 else budgets[0]
    ticks = list(budgets) if len(budgets) <= 12 else list(budgets[::2])
    return (budgets[0] - step * 0.6, budgets[-1] + step * 0.6), ticks


def _l1_figure(fixed: list[dict], ceiling: dict, levels: list[dict], target_index: int, budgets: Sequence[int],
               target_tokens: int) -> Image.Image:
    xlim, xticks = _budget_axis(budgets)
    values = [row["l1"] for row in fixed] + [ceiling["l1"]] + [level["mean_l1"] for level in levels]
    plot = Plot("Mean L1 error vs tokens", "tokens per image (adaptive: mean)", "mean L1 (clamped, [0, 1] pixels)",
                xlim, padded_range(values, include_zero=True), xticks=xticks)
    plot.line([row["budget"] for row in fixed], [row["l1"] for row in fixed], PALETTE[0], label="fixed budget")
    plot.hline(ceiling["l1"], PALETTE[2], label=f"VQGAN ceiling (L1 {ceiling['l1']:.4f})")
    xs, ys = [level["mean_tokens"] for level in levels], [level["mean_l1"] for level in levels]
    plot.scatter(xs, ys, PALETTE[1], label=f"adaptive, threshold t (* mean closest to {target_tokens})", filled=True,
                 radius=5)
    for index in [target_index] + [i for i in range(len(levels)) if i != target_index]:  # the ~128 one first
        level = levels[index]
        marker = " *" if index == target_index else ""
        plot.text(level["mean_tokens"], level["mean_l1"], f"t={fmt_threshold(level['threshold'])}{marker}", PALETTE[1])
    return plot.finish()


def _histogram_figure(levels: list[dict], target_index: int, budgets: Sequence[int]) -> Image.Image:
    xlim, xticks = _budget_axis(budgets)
    step = budgets[1] - budgets[0] if len(budgets) > 1 else budgets[0]
    top = max(max(level["histogram"]) for level in levels)
    ylim = (0, top * 1.3 + 0.5)
    yticks, tick_step = nice_ticks(*ylim)
    yticks = list(range(0, int(ylim[1]) + 1)) if tick_step < 1 else [int(t) for t in yticks]
    plot = Plot("Chosen lengths per threshold", "tokens", "images", ylim=ylim, xlim=xlim, xticks=xticks,
                yticks=yticks)
    width = step * 0.8 / len(levels)
    for index, level in enumerate(levels):
        color = PALETTE[index % len(PALETTE)]
        offset = (index - (len(levels) - 1) / 2) * width
        marker = " *" if index == target_index else ""
        label = f"t={fmt_threshold(level['threshold'])}: mean {level['mean_tokens']:.1f}{marker}"
        for budget, count in zip(budgets, level["histogram"]):
            if count:
                plot.bar(budget + offset, count, width, color)
        plot.legend.append((label, color, "bar"))
    return plot.finish()


def _complexity_figure(complexity: np.ndarray, lengths: np.ndarray, level: dict, rho: float,
                       budgets: Sequence[int]) -> Image.Image:
    step = budgets[1] - budgets[0] if len(budgets) > 1 else budgets[0]
    plot = Plot(f"Chosen length (t={fmt_threshold(level['threshold'])}) vs complexity: Spearman {_fmt(rho)}",
                f"image complexity: JPEG q{JPEG_QUALITY} bytes per pixel", "chosen tokens",
                padded_range(complexity.tolist()), (budgets[0] - step * 0.6, budgets[-1] + step * 0.6),
                yticks=budgets)
    plot.scatter(complexity.tolist(), lengths.tolist(), PALETTE[0])
    return plot.finish()
