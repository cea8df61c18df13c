"""What each length rule gives on a set of images, from a table of every image's error at every length.

Used by ``evaluate`` (the ``length_rules`` section of ``report.json``) and by the bench's agreement checks. The
rules are replayed on the table (the tests check that the replay equals ``encode``): ``exact`` and ``search`` on
the measured errors, ``predicted`` on the length predictor's estimates (its lengths then judged on the measured
errors), ``verified`` from the estimates' start on the measured errors. For a target ``E`` the measures are: mean
tokens, mean L1, the share of images whose error at their length is ``<= E``, the smallest fixed budget that
brings at least the same share of images to ``E`` (None when none does), and the Spearman correlation of the
lengths with image complexity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .length_rules import (VERIFIED_START_MARGIN, LengthSearch, choose_iterations, predicted_choice, search_starts,
                           verified_iterations)
from .stats import spearman


def search_choices(errors: Tensor, starts: Sequence[int], threshold: float, *, bisect: bool) -> tuple[Tensor, Tensor]:
    """The search rule replayed on errors ``[N, I]`` from ``starts``: (chosen indices ``[N]``, decodes ``[N]``)."""
    chosen, decodes = [], []
    for row, start in zip(errors.tolist(), starts):
        search = LengthSearch(int(start), len(row), threshold, bisect=bisect)
        while probes := search.next_probes():
            search.errors.update({probe: row[probe] for probe in probes})
        chosen.append(search.chosen())
        decodes.append(len(search.errors))
    return torch.tensor(chosen), torch.tensor(decodes)


def fixed_budget_for_share(errors: Tensor, threshold: float, share: float) -> int | None:
    """Smallest iteration index at which a fixed budget brings at least ``share`` of the images to ``threshold``."""
    reached = (errors <= torch.tensor(threshold, dtype=errors.dtype)).double().mean(dim=0)  # [I]
    hits = (reached >= share - 1e-12).nonzero()
    return int(hits[0]) if len(hits) else None


def rule_summary(chosen: Tensor, errors: Tensor, l1: Tensor, threshold: float, complexity: np.ndarray,
                 budgets: Sequence[int]) -> dict:
    """The measures of the module docstring for chosen iteration indices ``[N]``."""
    rows = torch.arange(len(chosen))
    lengths = torch.tensor(budgets, dtype=torch.float64)[chosen]
    share = float((errors[rows, chosen] <= torch.tensor(threshold, dtype=errors.dtype)).double().mean())
    fixed = fixed_budget_for_share(errors, threshold, share)
    return {"threshold": threshold, "mean_tokens": float(lengths.mean()), "mean_l1": float(l1[rows, chosen].mean()),
            "share_meeting_target": share, "fixed_budget_for_same_share": budgets[fixed] if fixed is not None else None,
            "spearman_length_vs_complexity": spearman(lengths.numpy(), complexity),
            "histogram": torch.bincount(chosen, minlength=len(budgets)).tolist()}


def _short_decimal(low: float, high: float) -> float:
    """A short decimal strictly inside the middle half of (low, high)."""
    middle = (low + high) / 2
    quarter = (high - low) / 4
    for digits in range(1, 12):
        value = float(f"{middle:.{digits}g}")
        if low + quarter <= value <= high - quarter:
            return value
    return middle


def threshold_candidates(table: Tensor, max_candidates: int = 2000) -> list[float]:
    """Every distinct outcome of the length rule on ``table`` ``[N, I]`` (errors or estimates): a short decimal
    inside each gap between consecutive distinct values (negative values count as 0), and one above them all;
    at most ``max_candidates``, at evenly spaced ranks (always the first and the last). Short decimals in the middle
    of their gaps keep tiny numeric differences between batched rollouts from changing a choice."""
    values = np.unique(table.numpy().ravel().clip(min=0)).astype(np.float64)
    edges = [0.0, *values.tolist(), float(values[-1]) * 1.5 + 1e-3]
    gaps = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    if len(gaps) > max_candidates:
        gaps = [gaps[i] for i in sorted(set(np.linspace(0, len(gaps) - 1, max_candidates).round().astype(int)))]
    return [_short_decimal(lo, hi) for lo, hi in gaps]


def threshold_for_mean_length(table: Tensor, budgets: Sequence[int], target_tokens: float,
                              choose: Callable[[Tensor], Tensor] | None = None) -> float:
    """The candidate threshold (:func:`threshold_candidates`) whose rule lengths on ``table`` ``[N, I]`` have the
    mean closest to ``target_tokens`` (the first such on ties). ``choose``: thresholds ``[T]`` -> iteration indices
    ``[T, N]`` of another rule (default the exact rule on ``table``); ``table`` then holds every value at which its
    choices can change."""
    choose = choose if choose is not None else (lambda part: choose_iterations(table, part))
    candidates = torch.tensor(threshold_candidates(table), dtype=torch.float64)
    budget_tensor = torch.tensor(budgets, dtype=torch.float64)
    best, best_gap = float(candidates[0]), float("inf")
    for start in range(0, len(candidates), 256):
        part = candidates[start : start + 256]
        means = budget_tensor[choose(part)].mean(dim=1)
        gaps = (means - target_tokens).abs()
        index = int(gaps.argmin())
        if float(gaps[index]) < best_gap:
            best, best_gap = float(part[index]), float(gaps[index])
    return best


def predicted_rule_at_mean_length(predicted: Tensor, errors: Tensor, budgets: Sequence[int], target_tokens: int,
                                  margin: float) -> dict:
    """The predicted rule (estimates ``[N, I]`` with ``margin``) at its own target for ``target_tokens`` mean
    tokens, judged on the measured ``errors``: its target, choices, the share of images reaching it, the share a fixed
    budget of ``target_tokens`` reaches at that target, and its agreement with the exact rule at that target."""
    scaled = predicted * (1 + margin)
    threshold = threshold_for_mean_length(scaled, budgets, target_tokens)
    guess = choose_iterations(scaled, [threshold])[0]
    exact = choose_iterations(errors, [threshold])[0]
    fixed_index = int(np.argmin([abs(b - target_tokens) for b in budgets]))
    limit = torch.tensor(threshold, dtype=errors.dtype)
    return {"threshold": threshold, "chosen": guess, "fixed_budget": budgets[fixed_index],
            "share": float((errors[torch.arange(len(guess)), guess] <= limit).double().mean()),
            "fixed_share": float((errors[:, fixed_index] <= limit).double().mean()),
            "same_length_as_exact": float((guess == exact).double().mean()),
            "within_one_of_exact": float(((guess - exact).abs() <= 1).double().mean())}


def verified_choices(errors: Tensor, predicted: Tensor, thresholds: Sequence[float] | Tensor,
                     margin: float = VERIFIED_START_MARGIN) -> tuple[Tensor, Tensor]:
    """The verified rule replayed on measured errors ``[N, I]`` from the estimates ``[N, I]`` (start margin
    ``margin``): (chosen iteration indices ``[T, N]``, decodes ``[T, N]``) for thresholds ``[T]``."""
    starts = choose_iterations(predicted * (1 + margin), thresholds)
    return verified_iterations(errors, starts, thresholds)


def verified_threshold(errors: Tensor, predicted: Tensor, budgets: Sequence[int], target_tokens: float,
                       margin: float = VERIFIED_START_MARGIN) -> float:
    """The verified rule's own target for ``target_tokens`` mean tokens (:func:`threshold_for_mean_length`)."""
    table = torch.cat([errors, predicted * (1 + margin)], dim=1)  # its choices change at these values
    return threshold_for_mean_length(table, budgets, target_tokens,
                                     choose=lambda part: verified_choices(errors, predicted, part, margin)[0])


def verified_report(errors: Tensor, l1: Tensor, predicted: Tensor, complexity: np.ndarray, budgets: Sequence[int],
                    target_tokens: int, exact_threshold: float, exact: Tensor) -> dict:
    """The verified rule at its own target for ``target_tokens`` mean tokens, and at the exact rule's target
    ``exact_threshold`` (where ``exact`` are the exact rule's choices): tokens, share, decodes, agreement."""
    threshold = verified_threshold(errors, predicted, budgets, target_tokens)
    chosen, decodes = (t[0] for t in verified_choices(errors, predicted, [threshold]))
    fixed_index = int(np.argmin([abs(b - target_tokens) for b in budgets]))
    at_exact, at_exact_decodes = (t[0] for t in verified_choices(errors, predicted, [exact_threshold]))
    rows, limit = torch.arange(len(errors)), torch.tensor(exact_threshold, dtype=errors.dtype)
    return {**rule_summary(chosen, errors, l1, threshold, complexity, budgets),
            "decodes_per_image": float(decodes.double().mean()), "start_margin": VERIFIED_START_MARGIN,
            "fixed_budget": budgets[fixed_index],
            "fixed_share_meeting_target": float((errors[:, fixed_index] <= torch.tensor(threshold, dtype=errors.dtype))
                                                .double().mean()),
            "at_exact_threshold": {
                "mean_tokens": float(torch.tensor(budgets, dtype=torch.float64)[at_exact].mean()),
                "share_meeting_target": float((errors[rows, at_exact] <= limit).double().mean()),
                "decodes_per_image": float(at_exact_decodes.double().mean()),
                "same_length_as_exact": float((at_exact == exact).double().mean())}}


def frontier(errors: Tensor, budgets: Sequence[int], threshold: float, choices: dict[str, Tensor],
             decodes: dict[str, Tensor]) -> dict:
    """What a quality target ``threshold`` costs: the share of images meeting it at every fixed budget (a curve) and
    for each rule's choices ``[N]`` (a point: mean tokens, share, decodes per image)."""
    limit = torch.tensor(threshold, dtype=errors.dtype)
    meets = errors <= limit  # [N, I]
    budget_tensor = torch.tensor(budgets, dtype=torch.float64)
    rows = torch.arange(len(errors))
    return {"threshold": threshold, "fixed_budgets": list(budgets),
            "fixed_share_meeting_target": meets.double().mean(dim=0).tolist(),
            "rules": {name: {"mean_tokens": float(budget_tensor[chosen].mean()),
                             "share_meeting_target": float(meets[rows, chosen].double().mean()),
                             "decodes_per_image": float(decodes[name].double().mean())}
                      for name, chosen in choices.items()}}


def rules_report(errors: Tensor, l1: Tensor, predicted: Tensor | None, complexity: np.ndarray,
                 budgets: Sequence[int], target_tokens: int, margin: float = 0.0) -> dict:
    """Each rule at the target whose mean length is closest to ``target_tokens`` (its own target for the
    predicted rule), with the comparison a quality target asks for (share reaching it, fixed budget for the same
    share) and, for the predicted rule, how close its lengths and estimates are to the exact rule's; and the
    ``frontier`` at the exact rule's target: every rule and every fixed budget at one quality target."""
    exact_threshold = threshold_for_mean_length(errors, budgets, target_tokens)
    exact = choose_iterations(errors, [exact_threshold])[0]
    report = {"target_tokens": target_tokens, "exact": rule_summary(exact, errors, l1, exact_threshold, complexity,
                                                                    budgets)}
    # every length up to the first meeting the target; all of them when none does (the lowest error needs them)
    reached = (errors <= torch.tensor(exact_threshold, dtype=errors.dtype)).any(dim=1)
    exact_decodes = torch.where(reached, exact + 1, torch.full_like(exact, len(budgets)))
    report["exact"]["decodes_per_image"] = float(exact_decodes.double().mean())
    starts = search_starts(predicted, exact_threshold, len(errors), len(budgets))
    search, decodes = search_choices(errors, starts, exact_threshold, bisect=predicted is None)
    report["search"] = {**rule_summary(search, errors, l1, exact_threshold, complexity, budgets),
                        "decodes_per_image": float(decodes.double().mean()),
                        "same_length_as_exact": float((search == exact).double().mean())}
    if predicted is not None:
        own = predicted_rule_at_mean_length(predicted, errors, budgets, target_tokens, margin)
        at_exact = predicted_choice(predicted, exact_threshold, margin)
        report["predicted"] = {
            **rule_summary(own["chosen"], errors, l1, own["threshold"], complexity, budgets),
            "margin": margin, "fixed_budget": own["fixed_budget"], "fixed_share_meeting_target": own["fixed_share"],
            "same_length_as_exact": own["same_length_as_exact"], "within_one_of_exact": own["within_one_of_exact"],
            "at_exact_threshold": {"same_length_as_exact": float((at_exact == exact).double().mean()),
                                   "within_one_of_exact": float(((at_exact - exact).abs() <= 1).double().mean())},
            "predictor_mean_absolute_error": float((predicted - errors).abs().mean()),
        }
        report["verified"] = verified_report(errors, l1, predicted, complexity, budgets, target_tokens,
                                             exact_threshold, exact)
    choices, counts = {"exact": exact, "search": search}, {"exact": exact_decodes, "search": decodes}
    if predicted is not None:
        choices["verified"], counts["verified"] = (t[0] for t in verified_choices(errors, predicted, [exact_threshold]))
        choices["predicted"], counts["predicted"] = at_exact, torch.zeros_like(at_exact)
    report["frontier"] = frontier(errors, budgets, exact_threshold, choices, counts)
    return report
