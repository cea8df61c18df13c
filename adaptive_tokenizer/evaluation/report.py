"""The evaluation report as typed dataclasses; ``report.json`` is written from them and read back into them.

:class:`EvaluationReport` holds every section of ``report.json`` (same keys, same order): the field names are the
JSON keys. :meth:`EvaluationReport.to_dict` gives the strict JSON form (NaN and infinities become ``null``, tuples
lists; a field marked ``OMIT_IF_NONE`` is left out rather than written as ``null``, one marked ``INLINE`` has its
keys written into its parent's object) and :meth:`EvaluationReport.from_dict` builds the dataclasses back from it,
so that ``EvaluationReport.from_dict(report.to_dict()) == report``. :func:`write_report` / :func:`read_report` do
the same through the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io_utils import write_atomic
from ..metrics import PSNR_CAP_DB

REPORT_FORMAT = "adaptive-tokenizer-evaluation/1"
REPORT_FILE = "report.json"
FIGURES = {"grid": "grid.png", "l1_vs_tokens": "l1_vs_tokens.png", "lengths_histogram": "lengths_histogram.png",
           "length_vs_complexity": "length_vs_complexity.png", "target_frontier": "target_frontier.png"}
METRIC_NOTES = {
    "pixels": "[0, 1]; inputs resized and centre-cropped to the model resolution",
    "l1_psnr_ssim": "of the reconstruction clamped to [0, 1]",
    "error_unclamped": "mean |reconstruction - input| before clamping",
    "predicted_error": "the length predictor's estimate of error_unclamped (null without a predictor)",
    "psnr": f"per image, capped at {PSNR_CAP_DB:g} dB, then averaged",
    "ssim": "Wang et al.: gaussian 11 / sigma 1.5, K1 0.01, K2 0.03, valid filtering, mean over the map and the RGB "
            "channels",
    "sharpness": "mean grey (Rec. 601) forward-difference gradient magnitude of the clamped reconstructions / of the "
                 "inputs, a ratio of means over images",
    "colour_offset": "mean over images and RGB channels of |channel mean of the reconstruction - of the input|",
    "greyscale_chroma": "over greyscale inputs (all channels within 2/255 of their mean): mean |channel - mean of "
                        "channels| of the reconstruction",
    "per_image_fidelity": "sharpness, colour_offset, chroma: per budget, then the base",
    "per_image_lists": "l1, error_unclamped, predicted_error, psnr, ssim are aligned with budgets; chosen_tokens "
                       "with adaptive.levels; histogram with budgets",
}
OMIT_IF_NONE = {"omit_if_none": True}  # field metadata: a None value is left out of the JSON
INLINE = {"inline": True}  # field metadata: a dataclass whose keys are written into its parent's JSON object


# ---- metadata ------------------------------------------------------------------------------------------------
@dataclass
class TokenRange:
    min: int
    max: int
    step: int
    model_max: int


@dataclass
class ModelSummary:
    image_size: int
    latent_kind: str
    rollout: str
    tokens: TokenRange
    dynamic_halting: bool
    dynamic_halting_confidence: float
    length_predictor: bool
    encoder: str  # width x layers
    decoder: str
    codebook_size: int | None  # None for continuous latents
    parameters: dict[str, int]
    description: str | None


@dataclass
class Metadata:
    model: str | None
    folder: str
    num_images: int
    command: list[str] | None
    elapsed_s: float | None  # the evaluation's wall time, model loading excluded
    model_summary: ModelSummary
    config: dict[str, Any]  # ModelConfig.to_dict()
    device: str
    dtype: str
    torch: str
    python: str
    metric_notes: dict[str, str]


# ---- quality per budget --------------------------------------------------------------------------------------
@dataclass
class Fidelity:
    """Sharpness and colour over the images (``measure.fidelity_row``); written inline in its row's JSON object,
    after the other keys. None in reports written before these measures."""
    sharpness: float | None = None
    colour_offset: float | None = None
    greyscale_chroma: float | None = None  # None without greyscale inputs
    greyscale_images: int | None = None


@dataclass
class BudgetRow:
    """``fixed``: one token budget, means over the images."""
    budget: int
    l1: float
    psnr: float
    ssim: float
    error_unclamped: float
    fidelity: Fidelity = field(default_factory=Fidelity, metadata=INLINE)


@dataclass
class CeilingRow:
    """``base_ceiling``: the base tokenizer's own reconstruction, means over the images."""
    l1: float
    psnr: float
    ssim: float
    grid_tokens: int
    fidelity: Fidelity = field(default_factory=Fidelity, metadata=INLINE)


# ---- adaptive length -----------------------------------------------------------------------------------------
@dataclass
class Level:
    """One adaptive threshold: every image at its chosen length."""
    threshold: float
    mean_tokens: float
    mean_l1: float
    mean_error_unclamped: float
    met_threshold: float  # share of the images whose error at their length is <= threshold
    histogram: list[int]  # aligned with budgets


@dataclass
class PairedDifference:
    better: int
    worse: int
    same: int
    mean: float
    bootstrap_95: list[float]
    resamples: int


@dataclass
class BestAllocation:
    mean_tokens: float
    mean_l1: float
    spearman_length_vs_complexity: float | None
    histogram: list[int]


@dataclass
class Comparison:
    """The level closest to ``target_tokens`` against the fixed budget closest to it and the best allocation."""
    target_tokens: int
    threshold: float
    adaptive_mean_tokens: float
    adaptive_mean_l1: float
    fixed_budget: int
    fixed_mean_l1: float
    l1_difference: float
    per_image: PairedDifference
    best_allocation: BestAllocation


@dataclass
class Adaptive:
    thresholds_source: str  # "auto" or "given"
    levels: list[Level]
    target_level: int  # index into levels
    comparison: Comparison


@dataclass
class ComplexityStats:
    measure: str
    mean: float
    min: float
    max: float
    spearman_length_vs_complexity: float | None
    target_error: float
    spearman_l1_vs_complexity: dict[str, float | None]  # budget -> Spearman
    fixed_budget: int
    spearman_l1_at_fixed_budget_vs_complexity: float | None


# ---- length rules (length_report.rules_report) ---------------------------------------------------------------
@dataclass
class RuleSummary:
    threshold: float
    mean_tokens: float
    mean_l1: float
    share_meeting_target: float
    fixed_budget_for_same_share: int | None
    spearman_length_vs_complexity: float | None
    histogram: list[int]


@dataclass
class ExactRule(RuleSummary):
    decodes_per_image: float


@dataclass
class SearchRule(ExactRule):
    same_length_as_exact: float


@dataclass
class Agreement:
    same_length_as_exact: float
    within_one_of_exact: float


@dataclass
class PredictedRule(RuleSummary):
    margin: float
    fixed_budget: int
    fixed_share_meeting_target: float
    same_length_as_exact: float
    within_one_of_exact: float
    at_exact_threshold: Agreement
    predictor_mean_absolute_error: float


@dataclass
class AtExactTarget:
    mean_tokens: float
    share_meeting_target: float
    decodes_per_image: float
    same_length_as_exact: float


@dataclass
class VerifiedRule(ExactRule):
    start_margin: float
    fixed_budget: int
    fixed_share_meeting_target: float
    at_exact_threshold: AtExactTarget


@dataclass
class FrontierPoint:
    mean_tokens: float
    share_meeting_target: float
    decodes_per_image: float


@dataclass
class Frontier:
    """Every rule and every fixed budget at one quality target (the exact rule's for ``target_tokens``)."""
    threshold: float
    fixed_budgets: list[int]
    fixed_share_meeting_target: list[float]
    rules: dict[str, FrontierPoint]


@dataclass
class LengthRules:
    target_tokens: int
    exact: ExactRule
    search: SearchRule
    predicted: PredictedRule | None = field(default=None, metadata=OMIT_IF_NONE)  # with a length predictor
    verified: VerifiedRule | None = field(default=None, metadata=OMIT_IF_NONE)  # with a length predictor
    frontier: Frontier | None = field(default=None, metadata=OMIT_IF_NONE)  # reports written before it have none


# ---- per image -----------------------------------------------------------------------------------------------
@dataclass
class BaseScores:
    l1: float
    psnr: float
    ssim: float


@dataclass
class ImageRecord:
    """One image; the lists are aligned with ``budgets`` (``chosen_tokens`` with ``adaptive.levels``; the fidelity
    lists have one more entry, the base)."""
    file: str
    complexity: float
    l1: list[float]
    error_unclamped: list[float]
    predicted_error: list[float] | None
    psnr: list[float]
    ssim: list[float]
    base: BaseScores
    sharpness: list[float]
    colour_offset: list[float]
    chroma: list[float]
    greyscale: bool
    chosen_tokens: list[int]


# ---- the report ----------------------------------------------------------------------------------------------
@dataclass
class EvaluationReport:
    format: str
    metadata: Metadata
    budgets: list[int]
    fixed: list[BudgetRow]
    base_ceiling: CeilingRow
    adaptive: Adaptive
    complexity: ComplexityStats
    length_rules: LengthRules
    images: list[ImageRecord]
    figures: dict[str, str]  # figure -> file name in the output folder (the figures written)
    grid_images: list[str]

    def to_dict(self) -> dict:
        """The strict JSON form (what ``report.json`` holds)."""
        return plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvaluationReport:
        return build(cls, data)


def write_report(report: EvaluationReport, out_dir: str | os.PathLike) -> Path:
    """``out_dir/report.json`` (indent 1, strict JSON), written atomically; returns its path."""
    path = Path(out_dir) / REPORT_FILE
    write_atomic(path, (json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n").encode())
    return path


def read_report(path: str | os.PathLike) -> EvaluationReport:
    """A ``report.json`` file (or the folder holding it) as an :class:`EvaluationReport`."""
    path = Path(path)
    return EvaluationReport.from_dict(json.loads((path / REPORT_FILE if path.is_dir() else path).read_text()))


def finite(value: float) -> float | None:
    """``value``, or None where it is NaN or infinite (what JSON can hold)."""
    return value if math.isfinite(value) else None


def plain(value: Any) -> Any:
    """Dataclasses -> dicts (in field order), NaN and infinities -> None, tuples -> lists (strict JSON)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.metadata.get("inline"):
                out.update(plain(item))
            elif not (f.metadata.get("omit_if_none") and item is None):
                out[f.name] = plain(item)
        return out
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def build(kind: Any, data: Any) -> Any:
    """JSON values -> the annotated type ``kind`` (dataclasses, ``list[...]``, ``dict[str, ...]``, ``X | None``);
    a dataclass field missing from ``data`` takes its default; an ``INLINE`` one is built from ``data`` itself."""
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: build(hints[f.name], data if f.metadata.get("inline") else data[f.name])
                       for f in dataclasses.fields(kind) if f.metadata.get("inline") or f.name in data})
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return None if data is None else build(next(a for a in args if a is not type(None)), data)
    if origin is list:
        return [build(args[0], item) for item in data]
    if origin is dict:
        return {key: build(args[1], item) for key, item in data.items()}
    return data
