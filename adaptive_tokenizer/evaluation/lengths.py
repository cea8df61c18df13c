"""Adaptive length in the evaluation: the thresholds, each threshold's lengths, the comparison with a fixed budget
and with the best allocation, and how lengths follow image complexity.

Each image's length at a threshold is the first budget whose (unclamped) error is ``<=`` the threshold, else the
budget with the lowest error (first on ties): the exact rule of ``encode(halt_threshold=...)``
(:func:`~adaptive_tokenizer.length_rules.choose_iterations`; the tests check they agree).

Automatic thresholds: the per-image choice only changes at the observed errors, so every distinct outcome is
reached by a threshold between two consecutive distinct errors. For target mean lengths evenly spread from the
shortest to the longest achievable mean (and ``target_tokens``), the candidate whose mean length is closest is kept;
each kept threshold is a short decimal inside the middle half of its gap, so tiny numeric differences between
batched rollouts cannot change a choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..length_report import threshold_candidates
from ..length_rules import choose_iterations
from ..stats import spearman
from .measure import JPEG_QUALITY
from .report import Adaptive, BestAllocation, BudgetRow, Comparison, ComplexityStats, Level, PairedDifference, finite

TARGET_TOKENS = 128


def paired_difference(differences: Tensor, *, resamples: int = 10000, seed: int = 0) -> PairedDifference:
    """Per-image L1 differences (adaptive minus fixed, ``[N]``): how many images are better / worse / the same,
    and a seeded percentile-bootstrap 95% interval of their mean (images resampled with replacement)."""
    values = differences.double().numpy()
    generator = np.random.default_rng(seed)
    means = values[generator.integers(len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedDifference(better=int((values < 0).sum()), worse=int((values > 0).sum()),
                            same=int((values == 0).sum()), mean=float(values.mean()),
                            bootstrap_95=[float(low), float(high)], resamples=resamples)


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
        raise InputError(f"units_per_image must be at least 1 (every image takes one iteration), "
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
        raise InputError(f"--thresholds takes comma-separated non-negative numbers (target errors: mean absolute "
                         f"pixel error in [0, 1] units, see halt_threshold), e.g. 0.05,0.07, got {text!r}")
    return sorted(set(values))


def adaptive_section(errors: Tensor, l1: Tensor, budgets: Sequence[int], fixed: Sequence[BudgetRow],
                     thresholds: Sequence[float] | None, complexity: np.ndarray, *, target_tokens: int,
                     tokens_per_iteration: int) -> tuple[Adaptive, Tensor]:
    """The ``adaptive`` section from the unclamped ``errors`` and clamped ``l1`` ``[N, I]``, and the chosen
    iteration indices ``[T, N]``. ``thresholds``: None to choose them (:func:`auto_thresholds`)."""
    source = "given" if thresholds is not None else "auto"
    if thresholds is None:
        thresholds = auto_thresholds(errors, budgets, target_tokens=target_tokens)
    chosen = choose_iterations(errors, thresholds)  # [T, N] iteration indices
    budget_tensor = torch.tensor(budgets, dtype=torch.float64)
    rows = torch.arange(len(errors))
    levels = []
    for index, threshold in enumerate(thresholds):
        pick = chosen[index]
        levels.append(Level(threshold=threshold, mean_tokens=float(budget_tensor[pick].mean()),
                            mean_l1=float(l1[rows, pick].mean()), mean_error_unclamped=float(errors[rows, pick].mean()),
                            met_threshold=float((errors[rows, pick] <= threshold).double().mean()),
                            histogram=torch.bincount(pick, minlength=len(budgets)).tolist()))
    target_index = int(np.argmin([abs(level.mean_tokens - target_tokens) for level in levels]))
    fixed_index = int(np.argmin([abs(b - target_tokens) for b in budgets]))
    target = levels[target_index]
    best = best_allocation(l1, target_tokens / tokens_per_iteration)  # the bound on any length rule
    best_lengths = budget_tensor[best].numpy()
    comparison = Comparison(
        target_tokens=target_tokens, threshold=target.threshold, adaptive_mean_tokens=target.mean_tokens,
        adaptive_mean_l1=target.mean_l1, fixed_budget=budgets[fixed_index], fixed_mean_l1=fixed[fixed_index].l1,
        l1_difference=target.mean_l1 - fixed[fixed_index].l1,
        per_image=paired_difference(l1[rows, chosen[target_index]] - l1[:, fixed_index]),
        best_allocation=BestAllocation(mean_tokens=float(best_lengths.mean()), mean_l1=float(l1[rows, best].mean()),
                                       spearman_length_vs_complexity=finite(spearman(best_lengths, complexity)),
                                       histogram=torch.bincount(best, minlength=len(budgets)).tolist()))
    return Adaptive(thresholds_source=source, levels=levels, target_level=target_index, comparison=comparison), chosen


def complexity_section(complexity: np.ndarray, target_lengths: np.ndarray, l1: Tensor, budgets: Sequence[int],
                       adaptive: Adaptive, image_size: int) -> ComplexityStats:
    """Spearman correlations of JPEG complexity ``[N]`` with the lengths chosen at the target level and with the L1
    ``[N, I]`` at each budget."""
    fixed_budget = adaptive.comparison.fixed_budget
    return ComplexityStats(
        measure=f"JPEG bytes per pixel (PIL, quality {JPEG_QUALITY}) of the {image_size}px model input",
        mean=float(complexity.mean()), min=float(complexity.min()), max=float(complexity.max()),
        spearman_length_vs_complexity=finite(spearman(target_lengths, complexity)),
        target_error=adaptive.levels[adaptive.target_level].threshold,
        spearman_l1_vs_complexity={str(b): finite(spearman(l1[:, i].numpy(), complexity))
                                   for i, b in enumerate(budgets)},
        fixed_budget=fixed_budget,
        spearman_l1_at_fixed_budget_vs_complexity=finite(spearman(l1[:, budgets.index(fixed_budget)].numpy(),
                                                                  complexity)))
