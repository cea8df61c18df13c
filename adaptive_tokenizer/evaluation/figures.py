"""The evaluation's figures: ``grid.png`` (an image mosaic, PIL) and four plots drawn from the report alone by
matplotlib (an optional dependency: ``pip install "adaptive-tokenizer[eval]"``, imported only here and only when
a plot is drawn, through its object-oriented API and the Agg canvas: no pyplot, no global backend change).

- ``grid.png``: up to 4 images spread over complexity (least to most complex), each row the input, every budget
  and the base tokenizer's reconstruction (VQGAN), labelled with L1;
- ``l1_vs_tokens.png``: mean L1 per budget, the base ceiling as a dashed line and the adaptive levels at their mean
  lengths (labelled with their thresholds, the one closest to the target marked ``*``);
- ``lengths_histogram.png``: the chosen lengths at each threshold;
- ``length_vs_complexity.png``: the length chosen at the target level against complexity, Spearman in the title;
- ``target_frontier.png``: at the exact rule's target for the target mean length, the share of images meeting it
  against mean tokens: fixed budgets as a curve, each length rule as a point (what the rules are built for; mean
  L1 is not: a rule spends tokens where they bring an image to the target, not where they lower the mean).

Without matplotlib, :func:`write_figures` writes the grid, leaves the plots out and warns once
(:class:`FiguresSkippedWarning`).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..image_io import labelled_strip
from ..io_utils import png_bytes, write_atomic
from .measure import JPEG_QUALITY
from .report import FIGURES, EvaluationReport
from .table import fmt_correlation, fmt_threshold

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
INSTALL_HINT = 'pip install "adaptive-tokenizer[eval]"'
GridRow = tuple[str, float, list[Image.Image], list[float], float]  # file, complexity, panels, L1 per budget, base L1


class FiguresSkippedWarning(UserWarning):
    """The plots were not drawn: matplotlib is not installed."""


def grid_figure(rows: Sequence[GridRow], budgets: Sequence[int]) -> Image.Image:
    """One labelled strip per row (file name and complexity, each budget's L1, the base's), stacked."""
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


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    """A new 800x520 px matplotlib figure on an Agg canvas and its axes; ImportError naming the extra without
    matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"the evaluation's plots need matplotlib: {INSTALL_HINT}") from err
    figure = Figure(figsize=(8, 5.2), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, color="#e6e6e6")
    axes.set_axisbelow(True)
    return figure, axes


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _budget_axis(axes: Any, budgets: Sequence[int], axis: str = "x") -> None:
    """Limits half a step beyond the first and last budget; a tick at every budget (every other beyond 12)."""
    step = budgets[1] - budgets[0] if len(budgets) > 1 else budgets[0]
    limits = (budgets[0] - step * 0.6, budgets[-1] + step * 0.6)
    ticks = list(budgets) if len(budgets) <= 12 else list(budgets[::2])
    (axes.set_xlim if axis == "x" else axes.set_ylim)(*limits)
    (axes.set_xticks if axis == "x" else axes.set_yticks)(ticks)


def _annotate(figure: Any, axes: Any, points: Sequence[tuple[float, float, str]], color: str) -> None:
    """Label data points in order, leaving out a label that would overlap one already placed."""
    renderer = figure.canvas.get_renderer()
    placed = []
    for x, y, text in points:
        label = axes.annotate(text, (x, y), xytext=(6, 6), textcoords="offset points", color=color, fontsize=9)
        box = label.get_window_extent(renderer)
        if any(box.overlaps(other) for other in placed):
            label.remove()
        else:
            placed.append(box)


def l1_figure(report: EvaluationReport) -> bytes:
    """``l1_vs_tokens.png``: mean L1 per budget, the base ceiling, the adaptive levels."""
    figure, axes = _axes("Mean L1 error vs tokens", "tokens per image (adaptive: mean)",
                         "mean L1 (clamped, [0, 1] pixels)")
    fixed, ceiling, adaptive = report.fixed, report.base_ceiling, report.adaptive
    axes.plot([row.budget for row in fixed], [row.l1 for row in fixed], "o-", color=PALETTE[0], label="fixed budget")
    axes.axhline(ceiling.l1, color=PALETTE[2], linestyle="--", label=f"VQGAN ceiling (L1 {ceiling.l1:.4f})")
    levels, target = adaptive.levels, adaptive.target_level
    axes.scatter([level.mean_tokens for level in levels], [level.mean_l1 for level in levels], s=60,
                 color=PALETTE[1], zorder=3,
                 label=f"adaptive, threshold t (* mean closest to {adaptive.comparison.target_tokens})")
    _budget_axis(axes, report.budgets)
    axes.set_ylim(0, max([row.l1 for row in fixed] + [ceiling.l1] + [level.mean_l1 for level in levels]) * 1.12)
    axes.legend(loc="best")
    order = [target] + [i for i in range(len(levels)) if i != target]  # the target level's label first
    _annotate(figure, axes, [(levels[i].mean_tokens, levels[i].mean_l1,
                              f"t={fmt_threshold(levels[i].threshold)}{' *' if i == target else ''}") for i in order],
              PALETTE[1])
    return _png(figure)


def histogram_figure(report: EvaluationReport) -> bytes:
    """``lengths_histogram.png``: how many images each threshold sends to each budget (bars side by side)."""
    figure, axes = _axes("Chosen lengths per threshold", "tokens", "images")
    budgets, levels = report.budgets, report.adaptive.levels
    step = budgets[1] - budgets[0] if len(budgets) > 1 else budgets[0]
    width = step * 0.8 / len(levels)
    for index, level in enumerate(levels):
        offset = (index - (len(levels) - 1) / 2) * width
        marker = " *" if index == report.adaptive.target_level else ""
        bars = [(budget + offset, count) for budget, count in zip(budgets, level.histogram) if count]
        axes.bar(*zip(*bars), width, color=PALETTE[index % len(PALETTE)], edgecolor="black",
                 label=f"t={fmt_threshold(level.threshold)}: mean {level.mean_tokens:.1f}{marker}")
    _budget_axis(axes, budgets)
    axes.set_ylim(0, max(max(level.histogram) for level in levels) * 1.3 + 0.5)
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.legend(loc="best")
    return _png(figure)


def complexity_figure(report: EvaluationReport) -> bytes:
    """``length_vs_complexity.png``: each image's length at the target level against its JPEG complexity."""
    adaptive = report.adaptive
    level = adaptive.levels[adaptive.target_level]
    figure, axes = _axes(f"Chosen length (t={fmt_threshold(level.threshold)}) vs complexity: Spearman "
                         f"{fmt_correlation(report.complexity.spearman_length_vs_complexity)}",
                         f"image complexity: JPEG q{JPEG_QUALITY} bytes per pixel", "chosen tokens")
    axes.scatter([image.complexity for image in report.images],
                 [image.chosen_tokens[adaptive.target_level] for image in report.images], s=60,
                 facecolors="none", edgecolors=PALETTE[0], linewidths=2)
    _budget_axis(axes, report.budgets, axis="y")
    return _png(figure)


RULE_MARKERS = {"exact": "s", "search": "x", "verified": "D", "predicted": "^"}


def frontier_figure(report: EvaluationReport) -> bytes:
    """``target_frontier.png``: at one quality target (the exact rule's for the target mean length), the share of
    images meeting it against mean tokens: fixed budgets as a curve, each length rule as a point."""
    frontier = report.length_rules.frontier
    figure, axes = _axes(f"Share of images meeting the target E={fmt_threshold(frontier.threshold)} vs tokens",
                         "tokens per image (rules: mean)", "images meeting the target")
    axes.plot(frontier.fixed_budgets, [100 * s for s in frontier.fixed_share_meeting_target], "o-", color=PALETTE[0],
              label="fixed budget")
    for index, (name, point) in enumerate(frontier.rules.items()):
        axes.scatter([point.mean_tokens], [100 * point.share_meeting_target], s=90, zorder=3,
                     marker=RULE_MARKERS.get(name, "o"), color=PALETTE[(index + 1) % len(PALETTE)],
                     label=f"{name}: {point.mean_tokens:.0f} tokens, {point.share_meeting_target:.0%}, "
                           f"{point.decodes_per_image:.2f} decodes/image")
    _budget_axis(axes, frontier.fixed_budgets)
    axes.set_ylim(0, 105)
    axes.yaxis.set_major_formatter("{x:.0f}%")
    axes.legend(loc="lower right")
    return _png(figure)


PLOTS = {"l1_vs_tokens": l1_figure, "lengths_histogram": histogram_figure, "length_vs_complexity": complexity_figure,
         "target_frontier": frontier_figure}


def write_figures(report: EvaluationReport, grid: Image.Image, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``grid`` and the plots of ``report`` into ``out_dir`` (file names: :data:`FIGURES`); returns the figures
    written (name -> file). Without matplotlib only the grid, and one :class:`FiguresSkippedWarning`."""
    write_atomic(Path(out_dir) / FIGURES["grid"], png_bytes(grid))
    written = {"grid": FIGURES["grid"]}
    try:
        plots = {name: draw(report) for name, draw in PLOTS.items()}
    except ImportError as err:
        warnings.warn(f"{err} (without it: report.json and {FIGURES['grid']}, not "
                      f"{', '.join(FIGURES[name] for name in PLOTS)})", FiguresSkippedWarning, stacklevel=3)
        return written
    for name, data in plots.items():
        write_atomic(Path(out_dir) / FIGURES[name], data)
        written[name] = FIGURES[name]
    return {name: written[name] for name in FIGURES if name in written}
