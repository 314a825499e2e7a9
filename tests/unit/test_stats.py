"""Paired tests, Holm adjustment, effect sizes and bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from fedmira.common.stats import (
    bootstrap_ci,
    compare_paired,
    holm_bonferroni,
    mean_ci,
    mean_difference_ci,
    paired_randomization_test,
    rank_biserial,
    wilcoxon_test,
)

A = [0.61, 0.42, 0.55, 0.70, 0.38, 0.66, 0.59, 0.47, 0.52, 0.73, 0.44, 0.58]
B = [0.50, 0.40, 0.57, 0.61, 0.30, 0.60, 0.51, 0.49, 0.41, 0.65, 0.45, 0.50]


def test_holm_hand_computed() -> None:
    # sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max 0.06)
    result = holm_bonferroni([0.03, 0.01, 0.04, 0.02], alpha=0.05)
    assert result["adjusted"] == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert result["reject"] == [False, True, False, False]


def test_holm_caps_at_one_and_handles_empty() -> None:
    assert holm_bonferroni([0.5, 0.9])["adjusted"] == pytest.approx([1.0, 1.0])
    assert holm_bonferroni([]) == {"adjusted": [], "reject": []}


def test_wilcoxon_equals_scipy() -> None:
    ours = wilcoxon_test(A, B)
    ref = sps.wilcoxon(A, B)
    assert ours["statistic"] == pytest.approx(ref.statistic)
    assert ours["p_value"] == pytest.approx(ref.pvalue)
    assert ours["n"] == 12


def test_wilcoxon_all_equal_is_not_significant() -> None:
    assert wilcoxon_test([1, 2, 3], [1, 2, 3])["p_value"] == 1.0


def test_rank_biserial_hand_computed() -> None:
    # differences 1, -2, 3, 4: ranks 1, 2, 3, 4; W+ = 8, W- = 2 -> r = 6 / 10
    assert rank_biserial([2, 0, 3, 4], [1, 2, 0, 0]) == pytest.approx(0.6)
    assert rank_biserial([1, 2], [0, 1]) == 1.0


def test_randomization_matches_exact_on_tiny_sample() -> None:
    a, b = [0.9, 0.7, 0.8, 0.6, 0.75, 0.5, 0.65], [0.6, 0.65, 0.7, 0.62, 0.5, 0.55, 0.4]
    exact = paired_randomization_test(a, b, exact=True)
    # hand check: d = .3 .05 .1 -.02 .25 -.05 .25; 128 sign patterns
    assert exact["n_resamples"] == 128
    approx = paired_randomization_test(a, b, n_resamples=20000, seed=3)
    assert abs(approx["p_value"] - exact["p_value"]) < 0.01
    assert approx["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))


def test_randomization_exact_hand_computed() -> None:
    # d = (1, 2): sign patterns give means 1.5, -0.5, 0.5, -1.5; |.| >= 1.5 twice -> p = 0.5
    assert paired_randomization_test([1, 2], [0, 0], exact=True)["p_value"] == 0.5
    greater = paired_randomization_test([1, 2], [0, 0], exact=True, alternative="greater")
    assert greater["p_value"] == 0.25


def test_randomization_is_seeded() -> None:
    p1 = paired_randomization_test(A, B, n_resamples=2000, seed=7)["p_value"]
    p2 = paired_randomization_test(A, B, n_resamples=2000, seed=7)["p_value"]
    assert p1 == p2 and 0 < p1 <= 1


def test_bootstrap_mean_ci_contains_mean_and_is_seeded() -> None:
    values = list(np.linspace(0, 1, 50))
    ci = mean_ci(values, seed=1)
    assert ci["lo"] < ci["mean"] < ci["hi"] and ci["n"] == 50
    assert mean_ci(values, seed=1) == ci
    assert mean_ci([None, 0.5, float("nan")])["mean"] == 0.5
    assert mean_ci([]) == {"mean": None, "lo": None, "hi": None, "n": 0}


def test_bootstrap_ci_of_constant_is_degenerate() -> None:
    lo, hi = bootstrap_ci([[0.3] * 10], lambda x: x.mean(axis=1), n_resamples=200)
    assert lo == pytest.approx(0.3) and hi == pytest.approx(0.3)
    assert all(math.isnan(v) for v in bootstrap_ci([[]], lambda x: x.mean(axis=1)))


def test_mean_difference_ci_and_comparison() -> None:
    diff = mean_difference_ci(A, B, seed=0)
    assert diff["mean_diff"] == pytest.approx(np.mean(np.subtract(A, B)))
    assert diff["lo"] < diff["mean_diff"] < diff["hi"]
    result = compare_paired({"m1": A, "m2": B}, {"m1": B, "m2": B}, ["m1", "m2"], n_permutations=2000)
    assert result["m2"]["wilcoxon"]["p_value"] == 1.0
    m1 = result["m1"]["wilcoxon"]
    assert m1["p_holm"] == pytest.approx(min(1.0, 2 * m1["p_value"]))
