"""Rank statistics used by the evaluation and the length-rule report (no SciPy dependency)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from .errors import InputError


def rankdata(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n (float64), ties given the average of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; NaN when either vector is constant or shorter than 2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"pearson needs two 1-D vectors of the same length, got shapes {a.shape} and {b.shape}")
    if len(a) < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation: Pearson of the tie-averaged ranks; NaN when either vector is constant."""
    return pearson(rankdata(a), rankdata(b))
