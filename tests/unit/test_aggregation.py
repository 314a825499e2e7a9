"""common.aggregation on hand-built adapters: exact means, robust rules, outliers, exact LoRA sums.

The heterogeneous-rank aggregate is checked against the dense weighted sum of the updates
``(alpha / r_k) B_k @ A_k`` computed in float64, on non-square and square layers, so that a
transposed or swapped factor anywhere in the QR/SVD path cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmira.common.aggregation import (
    adapter_rank,
    combine,
    coordinate_median,
    dense_update,
    hetero_aggregate,
    lora_modules,
    norm_outliers,
    normalized_weights,
    trimmed_mean,
    truncate_adapter,
    update_norms,
    weighted_mean,
)

ALPHA = 16.0
# (out, in) of each adapted layer: a square q_proj and a narrower v_proj (GQA), as in SmolLM2.
LAYERS = {"layers.0.q_proj": (24, 24), "layers.0.v_proj": (8, 24), "layers.1.q_proj": (24, 24)}


def _adapter(rank: int, seed: int, layers: dict[str, tuple[int, int]] = LAYERS,
             dtype: type = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for m, (d, n) in layers.items():
        out[f"{m}.lora_A.weight"] = rng.standard_normal((rank, n)).astype(dtype)
        out[f"{m}.lora_B.weight"] = rng.standard_normal((d, rank)).astype(dtype)
    return out


def _dense_sum(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    dense = [dense_update(s, ALPHA) for s in states]
    return {m: sum(wk * d[m] for wk, d in zip(w, dense)) for m in dense[0]}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _best_rank(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vt[:r]


# ------------------------------------------------------------------------------ same-shape rules
def test_weighted_mean_is_exact() -> None:
    states = [{"x": np.array([1.0, 2.0], np.float32)}, {"x": np.array([3.0, 6.0], np.float32)}]
    out = weighted_mean(states, [1, 3])
    np.testing.assert_array_equal(out["x"], np.array([2.5, 5.0], np.float32))
    assert out["x"].dtype == np.float32


def test_median_and_trimmed_mean_are_exact_and_unweighted() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 100.0]
    states = [{"x": np.array([v, -v], np.float32)} for v in values]
    np.testing.assert_array_equal(coordinate_median(states)["x"], [3.0, -3.0])
    # 5 replies, fraction 0.2: one dropped at each end -> mean of 2, 3, 4
    np.testing.assert_allclose(trimmed_mean(states, 0.2)["x"], [3.0, -3.0])
    # fraction 0.1 trims nothing with 5 replies: the plain (unweighted) mean
    np.testing.assert_allclose(trimmed_mean(states, 0.1)["x"], [22.0, -22.0])
    # weights do not matter to the robust rules
    np.testing.assert_array_equal(combine(states, [100, 1, 1, 1, 1], "median")["x"], [3.0, -3.0])


def test_combine_rejects_unknown_methods_and_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown aggregation"):
        combine([{"x": np.zeros(1)}], [1], "mode")
    with pytest.raises(ValueError, match="no states"):
        combine([], [], "mean")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        trimmed_mean([{"x": np.zeros(1)}], 0.5)


def test_normalized_weights() -> None:
    np.testing.assert_allclose(normalized_weights([1, 3]), [0.25, 0.75])
    np.testing.assert_allclose(normalized_weights([0, 0]), [0.5, 0.5])
    for bad in ([], [-1, 2], [float("nan")]):
        with pytest.raises(ValueError):
            normalized_weights(bad)


# ------------------------------------------------------------------------------ outliers
def test_update_norms_measure_the_update_not_the_weights() -> None:
    ref = {"x": np.array([1.0, 1.0], np.float32)}
    states = [{"x": np.array([4.0, 5.0], np.float32)}, {"x": np.array([1.0, 1.0], np.float32)}]
    assert update_norms(states, [ref, ref]) == [5.0, 0.0]


def test_norm_outliers_use_the_median_of_the_others() -> None:
    assert norm_outliers([1.0, 1.2, 0.9, 50.0], 10) == [False, False, False, True]
    # two replies: the leave-one-out median still catches the huge one
    assert norm_outliers([1.0, 11.0], 10) == [False, True]
    assert norm_outliers([1.0, 9.0], 10) == [False, False]
    assert norm_outliers([1.0, 50.0], 0) == [False, False]  # off
    assert norm_outliers([5.0], 10) == [False]
    assert norm_outliers([0.0, 0.0, 3.0], 10) == [False, False, False]  # no scale to compare with


# ------------------------------------------------------------------------------ LoRA structure
def test_lora_modules_and_rank() -> None:
    state = _adapter(4, 0)
    assert lora_modules(state) == sorted(LAYERS)
    assert adapter_rank(state) == 4
    with pytest.raises(ValueError, match="unpaired or foreign"):
        lora_modules({"layers.0.q_proj.lora_A.weight": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="unpaired or foreign"):
        lora_modules({**state, "layers.0.norm.weight": np.zeros(3)})
    mixed = {**state, "layers.0.q_proj.lora_A.weight": np.zeros((5, 24), np.float32)}
    with pytest.raises(ValueError, match="disagree on the rank"):
        adapter_rank(mixed)


def test_averaging_factors_is_not_averaging_updates_but_a_shared_a_is() -> None:
    """The motivation: mean(B) mean(A) != mean(BA); with A shared (FFA-LoRA) it is exact."""
    s1, s2 = _adapter(4, 1), _adapter(4, 2)
    mean = weighted_mean([s1, s2], [1, 1])
    exact = _dense_sum([s1, s2], [1, 1])
    assert _rel(dense_update(mean, ALPHA)["layers.0.q_proj"], exact["layers.0.q_proj"]) > 0.3
    shared_a = {k: v for k, v in s1.items() if "lora_A" in k}
    f1, f2 = {**s1, **shared_a}, {**s2, **shared_a}
    ffa = weighted_mean([f1, f2], [1, 3])
    for m, dense in _dense_sum([f1, f2], [1, 3]).items():
        assert _rel(dense_update(ffa, ALPHA)[m], dense) < 1e-6


# ------------------------------------------------------------------------------ exact hetero sums
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hetero_aggregate_equals_the_dense_weighted_sum(dtype: type) -> None:
    """Ranks 4/8/16, weights 1/2/3: kept at full rank (28 >= rank of the sum), exact to 1e-5."""
    states = [_adapter(4, 1, dtype=dtype), _adapter(8, 2, dtype=dtype), _adapter(16, 3, dtype=dtype)]
    weights = [1.0, 2.0, 3.0]
    out = hetero_aggregate(states, weights, alpha=ALPHA, rank=28)
    assert adapter_rank(out) == 28 and set(out) == set(states[0])
    assert out["layers.0.v_proj.lora_B.weight"].shape == (8, 28)  # non-square layer keeps (out, in)
    got = dense_update(out, ALPHA)
    for m, dense in _dense_sum(states, weights).items():
        assert _rel(got[m], dense) < 1e-5, m


def test_hetero_aggregate_would_catch_a_transposed_factor() -> None:
    """On square layers (B A)^T has the right shape, so only the values can tell: they do."""
    states = [_adapter(4, 5), _adapter(8, 6)]
    dense = _dense_sum(states, [1, 1])["layers.0.q_proj"]
    assert _rel(dense.T, dense) > 0.5  # the check below has power: M is far from M^T
    got = dense_update(hetero_aggregate(states, [1, 1], alpha=ALPHA, rank=12), ALPHA)["layers.0.q_proj"]
    assert _rel(got, dense) < 1e-5
    # A site whose factors were transposed and swapped (B' = A^T, A' = B^T) applies (B A)^T:
    flipped = {}
    for m in LAYERS:
        if LAYERS[m][0] == LAYERS[m][1]:
            flipped[f"{m}.lora_B.weight"] = states[1][f"{m}.lora_A.weight"].T.copy()
            flipped[f"{m}.lora_A.weight"] = states[1][f"{m}.lora_B.weight"].T.copy()
        else:
            flipped[f"{m}.lora_B.weight"] = states[1][f"{m}.lora_B.weight"]
            flipped[f"{m}.lora_A.weight"] = states[1][f"{m}.lora_A.weight"]
    wrong = dense_update(hetero_aggregate([states[0], flipped], [1, 1], alpha=ALPHA, rank=12),
                         ALPHA)["layers.0.q_proj"]
    assert _rel(wrong, dense) > 0.1


def test_hetero_aggregate_truncates_to_the_best_low_rank_approximation() -> None:
    states = [_adapter(4, 7), _adapter(8, 8), _adapter(16, 9)]
    weights = [3.0, 1.0, 2.0]
    out = hetero_aggregate(states, weights, alpha=ALPHA, rank=8)
    got = dense_update(out, ALPHA)  # a rank-8 adapter, applied with scaling alpha / 8
    for m, dense in _dense_sum(states, weights).items():
        assert _rel(got[m], _best_rank(dense, 8)) < 1e-5, m


def test_truncate_adapter_gives_each_site_its_best_rank_part_with_its_scaling() -> None:
    states = [_adapter(8, 10), _adapter(16, 11)]
    glob = hetero_aggregate(states, [1, 1], alpha=ALPHA, rank=16)
    full = dense_update(glob, ALPHA)
    for r in (4, 8):
        cut = truncate_adapter(glob, r)
        assert adapter_rank(cut) == r
        got = dense_update(cut, ALPHA)  # scaling alpha / r, as the site's PEFT model applies it
        for m in LAYERS:
            assert _rel(got[m], _best_rank(full[m], r)) < 1e-5
    assert truncate_adapter(glob, 16).keys() == glob.keys()
    with pytest.raises(ValueError, match="cannot truncate"):
        truncate_adapter(glob, 17)


def test_a_zero_update_stays_zero_and_keeps_trainable_directions() -> None:
    """Round 1: B = 0 everywhere. The aggregate is a zero update, but A is not zero, or the
    directions could never learn again (each factor's gradient is proportional to the other)."""
    zero_b = [{k: (np.zeros_like(v) if "lora_B" in k else v) for k, v in _adapter(r, r).items()}
              for r in (4, 8)]
    out = hetero_aggregate(zero_b, [1, 1], alpha=ALPHA, rank=8, seed=3)
    for m in LAYERS:
        assert not out[f"{m}.lora_B.weight"].any()
        assert np.abs(out[f"{m}.lora_A.weight"]).min() > 0
    again = hetero_aggregate(zero_b, [1, 1], alpha=ALPHA, rank=8, seed=3)
    assert all(np.array_equal(out[k], again[k]) for k in out)  # seeded


def test_a_low_rank_sum_is_exact_and_pads_the_rest() -> None:
    """Two rank-2 sites summed at rank 8: the 4-dimensional sum is exact, 4 directions padded."""
    states = [_adapter(2, 12), _adapter(2, 13)]
    out = hetero_aggregate(states, [1, 2], alpha=ALPHA, rank=8)
    got = dense_update(out, ALPHA)
    for m, dense in _dense_sum(states, [1, 2]).items():
        assert _rel(got[m], dense) < 1e-5
    assert not out["layers.0.q_proj.lora_B.weight"][:, 4:].any()


def test_equal_ranks_scale_and_weights() -> None:
    """Same factors at rank 4 twice: the sum is that update; weights do not change it."""
    s = _adapter(4, 14)
    out = hetero_aggregate([s, s], [5, 1], alpha=ALPHA, rank=4)
    for m, dense in dense_update(s, ALPHA).items():
        assert _rel(dense_update(out, ALPHA)[m], dense) < 1e-5


def test_the_aggregation_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """simulations/bench/aggregation.py end to end on 3 sites (the numbers are not checked)."""
    from fedmira.simulations.bench.aggregation import main

    main(["--sites", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "bare numpy weighted mean (baseline)" in out and "FedmiraHeteroSVD.aggregate_train" in out
    assert "460,800 params" in out
