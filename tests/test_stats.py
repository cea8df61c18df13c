"""``adaptive_tokenizer.stats``: rank statistics of the evaluation and the length-rule report."""

from __future__ import annotations

import math

import pytest

from adaptive_tokenizer.stats import rankdata, spearman


def test_spearman_known_vectors():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rankdata([3, 3, 3]).tolist() == [2.0, 2.0, 2.0]
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 70]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties averaged: ranks a = [1, 2.5, 2.5, 4], b = [1, 2, 3, 4] -> Pearson = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    # ties in both: ranks [1, 2.5, 2.5, 4, 5.5, 5.5] and [3, 1.5, 4, 1.5, 5, 6] -> 9.75 / sqrt(16.5 * 17)
    assert spearman([1, 2, 2, 3, 9, 9], [3, 1, 4, 1, 5, 9]) == pytest.approx(9.75 / math.sqrt(16.5 * 17))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant vector has no rank correlation
    assert math.isnan(spearman([1], [2]))
