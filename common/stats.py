"""Paired statistics for comparing systems on the same reports: pure functions on numbers.

Two systems (e.g. federated vs centralized, or an adapter vs the zero-shot base model) scored on
the same test reports give paired per-sample scores ``a`` and ``b``. This module tests whether
they differ and how much:

* :func:`wilcoxon_test`: Wilcoxon signed-rank test (:func:`scipy.stats.wilcoxon`) with the
  matched-pairs rank-biserial correlation as effect size;
* :func:`paired_randomization_test`: paired approximate randomization (random sign flips of
  the differences, :func:`scipy.stats.permutation_test`; exact enumeration for tiny samples),
  seeded;
* :func:`holm_bonferroni`: Holm's step-down adjustment for several metrics or comparisons;
* :func:`bootstrap_ci`, :func:`mean_ci`, :func:`mean_difference_ci`: percentile bootstrap
  confidence intervals (:func:`scipy.stats.bootstrap`, paired resampling of rows) with a
  seeded :class:`numpy.random.Generator`.

Every random procedure takes a ``seed`` and gives the same answer for the same inputs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Mapping, Sequence, TypedDict, cast

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_PERMUTATIONS = 10000
# Ties in the randomization statistic are decided with this relative tolerance (floating point).
_TIE_RTOL = 1e-9

#: Per-sample scores: a sequence (None for a missing value) or a float array (NaN for one).
Scores = Sequence[float | None] | np.ndarray
#: The alternative hypothesis of a test, as scipy spells it.
Alternative = Literal["two-sided", "greater", "less"]
_ALTERNATIVES = ("two-sided", "greater", "less")


def _alternative(value: str) -> Alternative:
    """``value`` checked to be one of scipy's alternatives."""
    if value not in _ALTERNATIVES:
        raise ValueError("alternative must be two-sided, greater or less")
    return cast(Alternative, value)


def _paired(a: Scores, b: Scores) -> tuple[np.ndarray, np.ndarray]:
    """Aligned float arrays; pairs with a missing value (None/NaN) in either are dropped."""
    x = np.asarray([np.nan if v is None else v for v in a], dtype=float)
    y = np.asarray([np.nan if v is None else v for v in b], dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("a and b must be 1-D sequences of the same length")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def _values(values: Scores) -> np.ndarray:
    """Float array without missing values (None/NaN)."""
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    present: np.ndarray = arr[~np.isnan(arr)]
    return present


# ----------------------------------------------------------------------------- bootstrap
def bootstrap_ci(
    columns: Sequence[Sequence[float] | np.ndarray],
    statistic: Callable[..., np.ndarray],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of one or more aligned columns.

    Parameters
    ----------
    columns : sequence of sequences
        Aligned per-sample columns (resampled together, by row).
    statistic : callable
        Takes the resampled columns, each of shape ``(k, n)``, and returns ``k`` values.
    n_resamples : int
        Bootstrap resamples.
    confidence : float
        Coverage of the interval, e.g. 0.95.
    seed : int
        Seed of the :class:`numpy.random.Generator`.

    Returns
    -------
    tuple of float
        ``(lo, hi)``; ``(nan, nan)`` without samples.
    """
    from scipy.stats import bootstrap

    arrays = [np.asarray(c, dtype=float) for c in columns]
    n = len(arrays[0])
    if n == 0 or n_resamples < 1:
        return math.nan, math.nan
    if n == 1 or all(np.ptp(a) == 0 for a in arrays):  # every resample is the sample itself
        value = float(np.asarray(statistic(*(a[None, :] for a in arrays)), dtype=float)[0])
        return value, value

    def stat(*cols: np.ndarray, axis: int = -1) -> np.ndarray:
        flat = [np.moveaxis(c, axis, -1) for c in cols]
        shape = flat[0].shape[:-1]
        out = statistic(*(c.reshape(-1, n) for c in flat))
        return np.asarray(out, dtype=float).reshape(shape)

    res = bootstrap(tuple(arrays), stat, paired=True, vectorized=True, n_resamples=n_resamples,
                    confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_ci(values: Scores, *, n_resamples: int = DEFAULT_RESAMPLES,
            confidence: float = 0.95, seed: int = 0) -> dict[str, float | int | None]:
    """Mean with a percentile bootstrap confidence interval; missing values are ignored.

    Returns
    -------
    dict
        ``mean``, ``lo``, ``hi`` (None without values) and ``n`` (values used).
    """
    arr = _values(values)
    if arr.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    lo, hi = bootstrap_ci([arr], lambda x: x.mean(axis=1), n_resamples=n_resamples,
                          confidence=confidence, seed=seed)
    return {"mean": float(arr.mean()), "lo": lo, "hi": hi, "n": int(arr.size)}


def mean_difference_ci(a: Scores, b: Scores, *,
                       n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                       seed: int = 0) -> dict[str, float | int | None]:
    """Mean paired difference ``a - b`` with a bootstrap interval (an effect size in units).

    Returns
    -------
    dict
        ``mean_diff``, ``lo``, ``hi`` and ``n`` (complete pairs).
    """
    x, y = _paired(a, b)
    ci = mean_ci(x - y, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {"mean_diff": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "n": ci["n"]}


# ----------------------------------------------------------------------------- Wilcoxon
def rank_biserial(a: Scores, b: Scores) -> float:
    """Matched-pairs rank-biserial correlation of ``a - b`` (Kerby's simple difference).

    ``r = (W+ - W-) / (W+ + W-)`` with ``W+``/``W-`` the rank sums of the positive/negative
    differences (zero differences dropped, ties given mid-ranks). In -1..1; positive when
    ``a`` tends to be larger; 0 when all differences are zero.
    """
    from scipy.stats import rankdata

    x, y = _paired(a, b)
    d = x - y
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    ranks = rankdata(np.abs(d))
    w_plus, w_minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((w_plus - w_minus) / (w_plus + w_minus))


def wilcoxon_test(a: Scores, b: Scores, *,
                  alternative: str = "two-sided") -> dict[str, float | int]:
    """Wilcoxon signed-rank test of paired samples (scipy), with its effect size.

    Zero differences are dropped (``zero_method="wilcox"``); scipy chooses the exact or the
    normal-approximation p-value by sample size and ties.

    Parameters
    ----------
    a, b : sequence of float
        Paired scores; pairs with a missing value are dropped.
    alternative : str
        ``two-sided``, ``greater`` (a > b) or ``less``.

    Returns
    -------
    dict
        ``statistic`` (scipy's), ``p_value``, ``n`` (complete pairs), ``n_nonzero`` and
        ``rank_biserial``. With no non-zero difference: statistic 0, p 1.
    """
    from scipy.stats import wilcoxon

    x, y = _paired(a, b)
    nonzero = int(np.count_nonzero(x - y))
    if nonzero == 0:
        return {"statistic": 0.0, "p_value": 1.0, "n": int(x.size), "n_nonzero": 0,
                "rank_biserial": 0.0}
    res = wilcoxon(x, y, zero_method="wilcox", alternative=_alternative(alternative))
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), "n": int(x.size),
            "n_nonzero": nonzero, "rank_biserial": rank_biserial(x, y)}


# ----------------------------------------------------------------------------- randomization
def _p_from_null(null: np.ndarray, observed: float, alternative: str) -> np.ndarray:
    """Per-draw indicator that the null statistic is at least as extreme as the observed one."""
    tol = _TIE_RTOL * max(1.0, abs(observed))
    hits: np.ndarray
    if alternative == "two-sided":
        hits = np.abs(null) >= abs(observed) - tol
    elif alternative == "greater":
        hits = null >= observed - tol
    elif alternative == "less":
        hits = null <= observed + tol
    else:
        raise ValueError("alternative must be two-sided, greater or less")
    return hits


def _exact_null(d: np.ndarray) -> np.ndarray:
    """Mean difference under all ``2**n`` sign assignments."""
    n = d.size
    signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    means: np.ndarray = (signs * d).mean(axis=1)
    return means


def paired_randomization_test(
    a: Scores, b: Scores, *, n_resamples: int = DEFAULT_PERMUTATIONS,
    seed: int = 0, alternative: str = "two-sided", exact: bool = False,
) -> dict[str, float | int | bool]:
    """Paired approximate randomization test of the mean difference ``a - b``.

    Under the null hypothesis the two systems are exchangeable within each pair, so each
    difference's sign is flipped at random. The p-value is ``(k + 1) / (R + 1)`` with ``k``
    the draws at least as extreme as the observed mean difference (never 0). ``exact=True``
    enumerates all ``2**n`` sign patterns instead (``n <= 20``), p = share at least as extreme.

    Parameters
    ----------
    a, b : sequence of float
        Paired scores; pairs with a missing value are dropped.
    n_resamples : int
        Random sign-flip draws (ignored when ``exact``).
    seed : int
        Seed of the :class:`numpy.random.Generator`.
    alternative : str
        ``two-sided``, ``greater`` (a > b) or ``less``.
    exact : bool
        Enumerate every sign pattern.

    Returns
    -------
    dict
        ``mean_diff``, ``p_value``, ``n`` (complete pairs), ``n_resamples`` (draws used or
        ``2**n``) and ``exact``.
    """
    x, y = _paired(a, b)
    d = x - y
    observed = float(d.mean()) if d.size else math.nan
    if d.size == 0:
        return {"mean_diff": observed, "p_value": 1.0, "n": 0, "n_resamples": 0, "exact": exact}
    if exact:
        if d.size > 20:
            raise ValueError("exact randomization is limited to 20 pairs; use exact=False")
        hits = _p_from_null(_exact_null(d), observed, alternative)
        return {"mean_diff": observed, "p_value": float(hits.mean()), "n": int(d.size),
                "n_resamples": 2**d.size, "exact": True}
    from scipy.stats import permutation_test

    # One sample under permutation_type="samples": scipy flips the sign of each difference.
    res = permutation_test((d,), lambda v, axis=-1: v.mean(axis=axis), permutation_type="samples",
                           vectorized=True, n_resamples=n_resamples, alternative=_alternative(alternative),
                           rng=np.random.default_rng(seed))
    return {"mean_diff": observed, "p_value": float(res.pvalue), "n": int(d.size),
            "n_resamples": n_resamples, "exact": False}


# ----------------------------------------------------------------------------- multiplicity
class HolmResult(TypedDict):
    """Holm-adjusted p-values and rejections, in input order."""

    adjusted: list[float]
    reject: list[bool]


def holm_bonferroni(p_values: Sequence[float], alpha: float = 0.05) -> HolmResult:
    """Holm's step-down adjustment of several p-values (family-wise error rate ``alpha``).

    Hand-written: :func:`scipy.stats.false_discovery_control` offers only Benjamini-Hochberg
    and Benjamini-Yekutieli (false discovery rate), not Holm.

    With ``m`` p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted value is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``; a hypothesis is rejected when its adjusted
    p-value is ``<= alpha``.

    Returns
    -------
    dict
        ``adjusted`` (in input order) and ``reject`` (booleans, input order).
    """
    p = np.asarray(p_values, dtype=float)
    m = p.size
    if m == 0:
        return {"adjusted": [], "reject": []}
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted_sorted = np.maximum.accumulate(scaled)
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return {"adjusted": adjusted.tolist(), "reject": (adjusted <= alpha).tolist()}


def compare_paired(
    a: Mapping[str, Scores], b: Mapping[str, Scores], metrics: Sequence[str], *,
    alpha: float = 0.05, n_resamples: int = DEFAULT_RESAMPLES,
    n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Compare two systems metric by metric; Holm-adjust each test family across metrics.

    Parameters
    ----------
    a, b : dict
        Metric name -> paired per-sample scores of system A and system B.
    metrics : sequence of str
        Metrics to compare (each must be in ``a`` and ``b``).

    Returns
    -------
    dict
        Metric -> ``mean_diff`` (with ``lo``/``hi``), ``wilcoxon`` and ``randomization``
        results, each with ``p_holm`` and ``reject`` added.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for metric in metrics:
        out[metric] = {
            "mean_diff": mean_difference_ci(a[metric], b[metric], n_resamples=n_resamples, seed=seed),
            "wilcoxon": wilcoxon_test(a[metric], b[metric]),
            "randomization": paired_randomization_test(a[metric], b[metric],
                                                       n_resamples=n_permutations, seed=seed),
        }
    for test in ("wilcoxon", "randomization"):
        holm = holm_bonferroni([out[m][test]["p_value"] for m in metrics], alpha)
        for metric, adj, rej in zip(metrics, holm["adjusted"], holm["reject"]):
            out[metric][test].update(p_holm=adj, reject=rej)
    return out
