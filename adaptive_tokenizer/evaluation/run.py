"""``evaluate_folder``: measure a model on a folder of images, build the report, write it with the figures."""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..image_io import list_image_files, load_images
from ..length_report import rules_report
from ..tokenizer import AdaptiveTokenizer
from .figures import GridRow, grid_figure, write_figures
from .lengths import TARGET_TOKENS, adaptive_section, complexity_section
from .measure import Measurements, base_pixels, budget_rows, grid_panels, image_records, measure_images
from .report import (METRIC_NOTES, REPORT_FORMAT, EvaluationReport, LengthRules, Metadata, ModelSummary,
                     TokenRange, build, plain, write_report)


def evaluate_folder(tok: AdaptiveTokenizer, folder: str | os.PathLike, out_dir: str | os.PathLike, *,
                    max_images: int | None = None, thresholds: Sequence[float] | None = None,
                    batch_size: int = 8, max_tokens: int | None = None, target_tokens: int = TARGET_TOKENS,
                    grid_images: int = 4, model_name: str | None = None, command: Sequence[str] | None = None,
                    progress: bool | None = None) -> dict:
    """Evaluate ``tok`` on the image files directly inside ``folder`` (sorted by name; the first ``max_images``).

    Writes ``out_dir/report.json`` and the figures (:mod:`.figures`; without matplotlib only ``grid.png``, with a
    warning); returns the report as written (:meth:`EvaluationReport.to_dict`: a JSON-ready dict, NaN
    correlations as ``None``; :meth:`EvaluationReport.from_dict` gives the typed form). ``thresholds``: adaptive
    thresholds (default: chosen automatically). ``max_tokens``: the largest budget evaluated (default: the model's
    maximum). ``progress``: tqdm bar (None: when stderr is a terminal). The definitions: the package docstring.
    """
    started = time.perf_counter()
    folder, out_dir = Path(folder), Path(out_dir)
    paths, thresholds = _check_arguments(folder, max_images, thresholds, batch_size)
    measured = measure_images(tok, paths, batch_size=batch_size, max_tokens=max_tokens,
                              keep_panels=len(paths) <= grid_images, progress=progress)
    report = build_report(measured, [path.name for path in paths], thresholds,
                          _metadata(tok, measured.errors.shape[1], model_name, folder, len(paths), command),
                          tokens_per_iteration=tok.tokens_per_iteration, grid_tokens=tok.config.base.grid_size ** 2,
                          margin=tok.model.length_predictor.margin if measured.predicted is not None else 0.0,
                          target_tokens=target_tokens)
    grid_indices = _grid_indices(measured.complexity, grid_images)
    report.grid_images = [paths[i].name for i in grid_indices]
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = grid_figure(_grid_rows(tok, paths, measured, grid_indices, max_tokens), report.budgets)
    report.figures = write_figures(report, grid, out_dir)
    report.metadata.elapsed_s = round(time.perf_counter() - started, 3)
    write_report(report, out_dir)
    return report.to_dict()


def build_report(measured: Measurements, names: Sequence[str], thresholds: Sequence[float] | None,
                 metadata: Metadata, *, tokens_per_iteration: int, grid_tokens: int, margin: float = 0.0,
                 target_tokens: int = TARGET_TOKENS) -> EvaluationReport:
    """Every section of the report from the tables of one pass over the images ``names`` (``figures``,
    ``grid_images`` and ``metadata.elapsed_s`` left to fill). ``grid_tokens``: the base tokenizer's codes per image;
    ``margin``: the length predictor's (the predicted rule)."""
    budgets = [tokens_per_iteration * (i + 1) for i in range(measured.errors.shape[1])]
    fixed, ceiling = budget_rows(measured, budgets, grid_tokens)
    adaptive, chosen = adaptive_section(measured.errors, measured.l1, budgets, fixed, thresholds, measured.complexity,
                                        target_tokens=target_tokens, tokens_per_iteration=tokens_per_iteration)
    target_lengths = torch.tensor(budgets, dtype=torch.float64)[chosen[adaptive.target_level]].numpy()
    rules = rules_report(measured.errors, measured.l1, measured.predicted, measured.complexity, budgets,
                         target_tokens, margin)
    return EvaluationReport(
        format=REPORT_FORMAT, metadata=metadata, budgets=budgets, fixed=fixed, base_ceiling=ceiling,
        adaptive=adaptive, complexity=complexity_section(measured.complexity, target_lengths, measured.l1, budgets,
                                                         adaptive, metadata.model_summary.image_size),
        length_rules=build(LengthRules, plain(rules)), images=image_records(measured, names, budgets, chosen),
        figures={}, grid_images=[])


def _check_arguments(folder: Path, max_images: int | None, thresholds: Sequence[float] | None,
                     batch_size: int) -> tuple[list[Path], list[float] | None]:
    """The image files to evaluate and the thresholds (sorted, distinct); ValueError for a bad argument."""
    paths = list_image_files(folder)  # FileNotFoundError when not a folder
    if not paths:
        raise InputError(f"no image files in folder {folder}")
    if max_images is not None:
        if max_images < 1:
            raise InputError(f"max_images must be at least 1, got {max_images}")
        paths = paths[:max_images]
    if thresholds is not None:
        thresholds = sorted({float(t) for t in thresholds})
        if not thresholds or not all(math.isfinite(t) and t >= 0 for t in thresholds):
            raise InputError(f"thresholds must be non-negative numbers, got {thresholds}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    return paths, thresholds


def _metadata(tok: AdaptiveTokenizer, iterations: int, model_name: str | None, folder: Path, num_images: int,
              command: Sequence[str] | None) -> Metadata:
    """Where the report comes from: the model (summary and config), the folder, the command, the environment."""
    config, step = tok.config, tok.tokens_per_iteration
    summary = ModelSummary(
        image_size=config.image_size, latent_kind=config.latent_kind, rollout=config.rollout,
        tokens=TokenRange(min=step, max=step * iterations, step=step, model_max=tok.max_tokens),
        dynamic_halting=config.dynamic_halting, dynamic_halting_confidence=config.dynamic_halting_confidence,
        length_predictor=config.length_predictor is not None,
        encoder=f"{config.encoder_width}x{config.encoder_layers}",
        decoder=f"{config.decoder_width}x{config.decoder_layers}",
        codebook_size=config.codebook_size if config.quantized else None, parameters=tok.model.num_parameters(),
        description=tok.info.description if tok.info is not None else None)
    return Metadata(model=model_name, folder=str(folder), num_images=num_images,
                    command=list(command) if command is not None else None, elapsed_s=None, model_summary=summary,
                    config=config.to_dict(), device=str(tok.device), dtype=str(tok.dtype).replace("torch.", ""),
                    torch=torch.__version__, python=platform.python_version(), metric_notes=dict(METRIC_NOTES))


def _grid_indices(complexity: np.ndarray, grid_images: int) -> list[int]:
    """Up to ``grid_images`` images spread over complexity, least to most complex."""
    order = np.argsort(complexity, kind="stable")
    picks = [int(order[round(k)]) for k in np.linspace(0, len(complexity) - 1, min(grid_images, len(complexity)))]
    return list(dict.fromkeys(picks))


def _grid_rows(tok: AdaptiveTokenizer, paths: Sequence[Path], measured: Measurements, indices: Sequence[int],
               max_tokens: int | None) -> list[GridRow]:
    """The grid's rows; images whose panels the pass did not keep are reconstructed again."""
    panels = dict(measured.panels)
    missing = [i for i in indices if i not in panels]
    if missing:
        inputs = load_images([str(paths[i]) for i in missing], tok.config.image_size)
        pixels, _ = tok.reconstructions(inputs, max_tokens=max_tokens, batch_size=len(inputs))
        base = base_pixels(tok, inputs)
        panels.update({i: grid_panels(inputs[k], pixels[k], base[k]) for k, i in enumerate(missing)})
    return [(paths[i].name, float(measured.complexity[i]), panels[i], measured.l1[i].tolist(),
             float(measured.base[i, 0])) for i in indices]
