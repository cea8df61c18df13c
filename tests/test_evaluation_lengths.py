"""``adaptive_tokenizer.evaluation.lengths``: the rule the evaluation replays, automatic thresholds, the best
allocation, the paired comparison with a fixed budget, ``--thresholds`` parsing."""

from __future__ import annotations

import itertools

import pytest
import torch

from adaptive_tokenizer.evaluation.lengths import auto_thresholds, best_allocation, paired_difference, parse_thresholds
from adaptive_tokenizer.length_rules import choose_iterations


def test_choose_iterations_rule():
    errors = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.6, 0.4], [0.1, 0.05, 0.01]])
    chosen = choose_iterations(errors, [0.0, 0.3, 0.45])
    assert chosen.tolist() == [[2, 0, 2],   # nothing meets 0.0: lowest error (first on ties: image 1 -> 0)
                               [1, 0, 0],   # 0.3 meets float32(0.3), as in the rollout's float32 comparison
                               [1, 0, 0]]


def test_auto_thresholds_span_and_target():
    generator = torch.Generator().manual_seed(1)
    errors = (torch.rand(40, 8, generator=generator) * 0.2 + torch.linspace(0.1, 0, 8)).float()
    budgets = [32 * (i + 1) for i in range(8)]
    thresholds = auto_thresholds(errors, budgets)
    assert thresholds == sorted(thresholds) and 3 <= len(thresholds) <= 6
    means = (torch.tensor(budgets, dtype=torch.float64)[choose_iterations(errors, thresholds)]).mean(1).tolist()
    # the extremes of what any threshold can give: everything at 32, and every image at its lowest error
    lowest = torch.tensor(budgets, dtype=torch.float64)[errors.argmin(1)].mean().item()
    assert min(means) == 32 and max(means) == pytest.approx(lowest)
    # the ~128 level is as close to 128 as any threshold can get (a fine sweep finds nothing closer)
    sweep = torch.linspace(0, 0.35, 3501)
    all_means = torch.tensor(budgets, dtype=torch.float64)[choose_iterations(errors, sweep)].mean(1)
    assert min(abs(m - 128) for m in means) <= (all_means - 128).abs().min().item() + 1e-9
    # thresholds are short decimals, not float noise
    assert all(len(repr(t)) <= 8 for t in thresholds)


def test_best_allocation_is_exact():
    """Against brute force over every allocation: the least summed error with at most the given mean length."""
    generator = torch.Generator().manual_seed(3)
    errors = torch.rand(5, 4, generator=generator) + torch.linspace(0.6, 0, 4)  # [5 images, 4 lengths]
    for units_per_image in (1, 1.4, 2, 2.5, 4):
        chosen = best_allocation(errors, units_per_image)
        assert (chosen + 1).sum() <= units_per_image * 5
        best = min(sum(errors[i, k].item() for i, k in enumerate(ks))
                   for ks in itertools.product(range(4), repeat=5) if sum(ks) + 5 <= units_per_image * 5)
        assert errors[torch.arange(5), chosen].sum().item() == pytest.approx(best)
    # a fixed length is one of the allocations considered: never worse than it
    assert errors[torch.arange(5), best_allocation(errors, 2)].mean() <= errors[:, 1].mean()
    # more lengths than the whole budget allows: the longest never fit
    assert best_allocation(errors[:1], 2).item() == int(errors[0, :2].argmin())
    with pytest.raises(ValueError, match="at least 1"):
        best_allocation(errors, 0.5)


def test_paired_difference_counts_and_interval():
    differences = torch.tensor([-0.02, -0.01, 0.0, 0.005, -0.03])
    pair = paired_difference(differences, resamples=2000)
    assert (pair.better, pair.worse, pair.same) == (3, 1, 1)
    assert pair.mean == pytest.approx(-0.011) and pair.resamples == 2000
    low, high = pair.bootstrap_95
    assert -0.03 <= low < pair.mean < high <= 0.005
    assert paired_difference(differences, resamples=2000) == pair  # seeded


def test_parse_thresholds():
    assert parse_thresholds("0.1,0.05,0.1") == [0.05, 0.1]
    for bad in ("", "a", "0.1,-1", "nan", "0.1,,0.2"):
        with pytest.raises(ValueError, match="--thresholds"):
            parse_thresholds(bad)
