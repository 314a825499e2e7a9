"""DP properties of common/privacy.py: equivalence, clipping bounds, accounting, budgets, ledgers.

Tiny random model, fixed seeds, and expected numbers from Opacus' own accountant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant

from fedmira.common.adapters import get_adapter_state
from fedmira.common.config import DataConfig, LoraConfig, PrivacyConfig, TrainConfig
from fedmira.common.engine import encode_reports, train_steps
from fedmira.common.errors import DataError
from fedmira.common.model import LoadedModel
from fedmira.common.privacy import (
    AccountantState,
    SiteLevelLedger,
    affordable_steps,
    clip_update,
    dp_gradient,
    dp_train_steps,
    epsilon_for,
    ledger_file,
    load_state,
    make_dp_optimizer,
    noise_for_target,
    plan_state,
    save_state,
    site_level_aggregate,
    unit_ids,
)
from fedmira.common.prompts import IGNORE_INDEX, Example
from fedmira.common.reports import Report

Factory = Callable[..., Any]


def _pad(tiny: LoadedModel) -> int:
    return int(tiny.tokenizer.pad_token_id)


def _equal_targets(examples: list[Example], n: int) -> list[Example]:
    """``n`` examples whose targets have the same token count (per-sample mean == token mean)."""
    by_len: dict[int, list[Example]] = {}
    for e in examples:
        by_len.setdefault(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX), []).append(e)
    group = max(by_len.values(), key=len)
    assert len(group) >= n, "fixture corpus has too few equal-length targets"
    return group[:n]


@pytest.fixture
def examples(tiny: LoadedModel, reports: list[Report], data_cfg: DataConfig) -> list[Example]:
    return encode_reports(reports, tiny.tokenizer, data_cfg)


def _ledger(sigma: float, q: float, units: int) -> AccountantState:
    return AccountantState(units=units, noise_multiplier=sigma, sample_rate=q, planned_steps=10)


# --------------------------------------------------------------------------- equivalence
def test_zero_noise_and_unreachable_clip_equals_the_plain_step(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example],
) -> None:
    """sigma=0, C=1e6, every unit sampled: DP-SGD's step is exactly train_steps' step."""
    batch = _equal_targets(examples, 4)
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, max_grad_norm=0.0, warmup_steps=0, weight_decay=0.0)
    no_dropout = LoraConfig(dropout=0.0)  # dropout masks depend on row order, which differs
    plain, private = new_lora(no_dropout), new_lora(no_dropout)
    train_steps(plain, batch, cfg, tiny.device, _pad(tiny), seed=3)
    ledger = _ledger(0.0, 1.0, len(batch))
    result = dp_train_steps(private, batch, list(range(len(batch))), cfg, ledger, tiny.device, _pad(tiny),
                            max_grad_norm=1e6, seed=3)
    assert result.steps == 2 and result.clipped_fraction == 0.0
    a, b = get_adapter_state(plain), get_adapter_state(private)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    start = get_adapter_state(new_lora(no_dropout))
    assert any(not torch.equal(v, start[k]) for k, v in b.items())  # it moved


# --------------------------------------------------------------------------- clipping bounds
def _dp_grad(model: Any, examples: list[Example], sample: list[list[int]], clip: float, sigma: float,
             pad: int, expected: float) -> tuple[torch.Tensor, int]:
    device = next(model.parameters()).device
    model.train()  # Opacus records activations in training mode only
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    opt = make_dp_optimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=sigma, max_grad_norm=clip,
                            expected_units=expected, device=device, seed=0, secure_mode=False)
    try:
        stats = dp_gradient(gsm, opt, params, examples, sample, micro_batch=3, pad_id=pad,
                            device=device)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
    finally:
        gsm._close()
    return flat, stats.clipped


def test_each_unit_is_clipped_to_the_norm(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example],
) -> None:
    """Without noise, the gradient is sum(clip(g_u)) / E: its norm is at most units x C / E,
    and a single sampled unit's gradient has norm exactly C (its raw norm is far above C)."""
    clip = 1e-3
    flat, clipped = _dp_grad(new_lora(), examples, [[0], [1], [2], [3]], clip, 0.0, _pad(tiny), expected=4)
    assert clipped == 4
    assert float(flat.norm()) <= clip * 4 / 4 * (1 + 1e-4)
    one, _ = _dp_grad(new_lora(), examples, [[5]], clip, 0.0, _pad(tiny), expected=1)
    assert float(one.norm()) == pytest.approx(clip, rel=1e-3)


def test_a_patient_is_one_unit_however_its_rows_are_batched(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example],
) -> None:
    """Rows 0-4 of one patient (split over two micro-batches of 3) are clipped together: the
    unit's gradient has norm C, not up to 5 C as five separate records would."""
    clip = 1e-3
    patient, c1 = _dp_grad(new_lora(), examples, [[0, 1, 2, 3, 4]], clip, 0.0, _pad(tiny), expected=1)
    records, c5 = _dp_grad(new_lora(), examples, [[0], [1], [2], [3], [4]], clip, 0.0, _pad(tiny), expected=1)
    assert (c1, c5) == (1, 5)
    assert float(patient.norm()) == pytest.approx(clip, rel=1e-3)
    assert float(records.norm()) > 2 * clip


def test_an_empty_sample_still_adds_noise(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example],
) -> None:
    flat, _ = _dp_grad(new_lora(), examples, [], 1.0, 1.0, _pad(tiny), expected=2)
    assert float(flat.norm()) > 0  # noise-only: skipping would reveal the empty sample
    std = float(flat.std())
    assert std == pytest.approx(1.0 * 1.0 / 2, rel=0.1)  # sigma C / E


def test_noise_has_the_planned_std(tiny: LoadedModel, new_lora: Factory, examples: list[Example]) -> None:
    """With a tiny clip the signal is negligible: the gradient's std is sigma C / E."""
    flat, _ = _dp_grad(new_lora(), examples, [[0], [1]], 1e-6, 2.0, _pad(tiny), expected=4)
    assert float(flat.std()) == pytest.approx(2.0 * 1e-6 / 4, rel=0.1)


# --------------------------------------------------------------------------- accounting
def test_epsilon_equals_opacus_accountant() -> None:
    """q=4/64, sigma=1.0, delta=1e-5: 6.09 after 160 steps (stack notes), and RDPAccountant agrees."""
    eps = epsilon_for([(1.0, 4 / 64, 160)], 1e-5)
    acc = RDPAccountant()
    for _ in range(160):
        acc.step(noise_multiplier=1.0, sample_rate=4 / 64)
    assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert eps == pytest.approx(6.09, abs=0.01)
    assert epsilon_for([], 1e-5) == 0.0
    assert epsilon_for([(0.0, 0.1, 3)], 1e-5) == math.inf
    assert epsilon_for([(1.0, 4 / 64, 100), (1.0, 4 / 64, 60)], 1e-5) == pytest.approx(eps, rel=1e-9)


def test_noise_is_solved_for_the_target() -> None:
    sigma = noise_for_target(8.0, 1e-5, 4 / 64, 160)
    eps = epsilon_for([(sigma, 4 / 64, 160)], 1e-5)
    assert 7.8 <= eps <= 8.0


def test_affordable_steps_stops_at_the_budget() -> None:
    history = [[1.0, 0.25, 10]]
    k = affordable_steps(history, 1.0, 0.25, 100, budget=12.0, delta=1e-5)  # 6.81 spent: 10 steps
    assert 0 < k < 100
    assert epsilon_for([*history, (1.0, 0.25, k)], 1e-5) <= 12.0 \
        < epsilon_for([*history, (1.0, 0.25, k + 1)], 1e-5)
    assert affordable_steps(history, 1.0, 0.25, 100, budget=0.0, delta=1e-5) == 100  # no budget
    assert affordable_steps(history, 1.0, 0.25, 5, budget=0.1, delta=1e-5) == 0


def test_the_ledger_survives_two_rounds_and_a_save_load(
    tmp_path: Path, tiny: LoadedModel, new_lora: Factory, examples: list[Example],
) -> None:
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3)
    ledger = plan_state(PrivacyConfig(enabled=True, target_epsilon=0, noise_multiplier=1.1), cfg, 40, 6)
    assert ledger.sample_rate == pytest.approx(4 / 40) and ledger.noise_multiplier == 1.1
    model = new_lora()
    units = list(range(len(examples)))
    dp_train_steps(model, examples, units, cfg, ledger, tiny.device, _pad(tiny), max_grad_norm=1.0, seed=1,
                   global_round=1)
    first = ledger.epsilon()
    path = tmp_path / "ledger.json"
    save_state(ledger, path)
    restored = load_state(path, None)  # a SuperNode restart: only the file is left
    assert restored is not None and restored.steps == 3 and restored.epsilon() == pytest.approx(first)
    result = dp_train_steps(model, examples, units, cfg, restored, tiny.device, _pad(tiny), max_grad_norm=1.0,
                            seed=2, global_round=2)
    assert restored.steps == 6 and restored.rounds == [1, 2]
    assert restored.history == [[1.1, 0.1, 6]]
    assert result.epsilon == pytest.approx(epsilon_for([(1.1, 0.1, 6)], 1e-5))
    assert result.epsilon > first
    # the longer of memory and file wins (privacy spent is never given back)
    assert load_state(path, restored.to_json()).steps == 6  # type: ignore[union-attr]
    save_state(restored, path)
    assert load_state(path, ledger.to_json()).steps == 6  # type: ignore[union-attr]
    assert load_state(tmp_path / "none.json", None) is None


def test_a_spent_budget_stops_training(tiny: LoadedModel, new_lora: Factory, examples: list[Example]) -> None:
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2)
    ledger = _ledger(1.0, 0.5, len(examples))
    budget = epsilon_for([(1.0, 0.5, 2)], ledger.delta) + 1e-6  # room for exactly two steps
    model = new_lora()
    before = get_adapter_state(model)
    first = dp_train_steps(model, examples, list(range(len(examples))), cfg, ledger, tiny.device, _pad(tiny),
                           max_grad_norm=1.0, budget=budget, seed=0)
    assert (first.steps, first.steps_wanted, first.budget_spent) == (2, 4, True)
    assert first.epsilon <= budget
    after_first = get_adapter_state(model)
    second = dp_train_steps(model, examples, list(range(len(examples))), cfg, ledger, tiny.device, _pad(tiny),
                            max_grad_norm=1.0, budget=budget, seed=1)
    assert second.steps == 0 and second.budget_spent and ledger.steps == 2
    for key, value in get_adapter_state(model).items():
        assert torch.equal(value, after_first[key])  # nothing trained once the budget is spent
    assert any(not torch.equal(v, before[k]) for k, v in after_first.items())


def test_dp_training_is_reproducible_with_a_seed(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example],
) -> None:
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2)
    states = []
    for _ in range(2):
        model = new_lora()
        dp_train_steps(model, examples, list(range(len(examples))), cfg, _ledger(1.0, 0.1, len(examples)),
                       tiny.device, _pad(tiny), max_grad_norm=1.0, seed=7)
        states.append(get_adapter_state(model))
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key])


# --------------------------------------------------------------------------- units and files
def test_patient_units_group_reports_and_need_ids(reports: list[Report]) -> None:
    import dataclasses

    with_ids = [dataclasses.replace(r, patient_id=f"p{i // 3}") for i, r in enumerate(reports[:7])]
    assert unit_ids(with_ids, "patient") == [0, 0, 0, 1, 1, 1, 2]
    assert unit_ids(with_ids, "record") == list(range(7))
    missing = [dataclasses.replace(r, patient_id=None) for r in reports[:2]] + with_ids
    with pytest.raises(DataError, match="2 of 9 have none") as err:
        unit_ids(missing, "patient")
    assert reports[0].findings not in str(err.value)


def test_ledger_file_is_per_run_and_safe(tmp_path: Path) -> None:
    class Run:
        dir = "/runs/iu-iid/20261127-101500"

    class Cfg:
        run = Run()

    assert ledger_file(tmp_path, Cfg()) == tmp_path / "privacy" / "20261127-101500.json"


def test_plan_rejects_an_empty_site() -> None:
    with pytest.raises(DataError):
        plan_state(PrivacyConfig(enabled=True), TrainConfig(), 0, 10)


def test_ledger_json_round_trip_and_version_check() -> None:
    ledger = _ledger(1.0, 0.1, 10)
    ledger.record(3, 1)
    again = AccountantState.from_json(ledger.to_json())
    assert again == ledger
    bad = json.loads(ledger.to_json())
    bad["version"] = 99
    with pytest.raises(ValueError, match="version"):
        AccountantState.from_json(json.dumps(bad))


# --------------------------------------------------------------------------- site-level DP
def test_clip_update_bounds_the_whole_update() -> None:
    update = {"a": np.full((2, 2), 3.0, np.float32), "b": np.full((4,), 4.0, np.float32)}  # norm 10
    clipped, norm = clip_update(update, 2.0)
    assert norm == pytest.approx(10.0)
    total = math.sqrt(sum(float((v ** 2).sum()) for v in clipped.values()))
    assert total == pytest.approx(2.0, rel=1e-6)
    same, _ = clip_update(update, 100.0)
    np.testing.assert_array_equal(same["a"], update["a"])


def test_site_level_aggregate_is_the_clipped_unweighted_mean_plus_noise() -> None:
    ref = {"w": np.zeros(3, np.float32)}
    states = [{"w": np.array([3.0, 4.0, 0.0], np.float32)}, {"w": np.array([0.1, 0.0, 0.0], np.float32)}]
    out, norms = site_level_aggregate(ref, states, clip=1.0, noise_multiplier=0.0,
                                      rng=np.random.default_rng(0))
    assert norms == pytest.approx([5.0, 0.1])
    np.testing.assert_allclose(out["w"], ([0.6, 0.8, 0.0] + np.array([0.1, 0.0, 0.0])) / 2, rtol=1e-6)
    big = [{"w": np.zeros(20000, np.float32)} for _ in range(4)]
    noisy, _ = site_level_aggregate({"w": np.zeros(20000, np.float32)}, big, clip=0.5, noise_multiplier=2.0,
                                    rng=np.random.default_rng(1))
    assert float(noisy["w"].std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.05)


def test_site_level_ledger_accounts_each_round() -> None:
    ledger = SiteLevelLedger(noise_multiplier=1.0, clip=1.0, delta=1e-3)
    for _ in range(3):
        ledger.record(4 / 42)
    assert ledger.history == [[1.0, 4 / 42, 3]] and ledger.rounds == 3
    assert ledger.epsilon() == pytest.approx(epsilon_for([(1.0, 4 / 42, 3)], 1e-3))
    assert ledger.summary()["epsilon"] > 0


def test_secagg_quantization_check_counts_silent_clipping() -> None:
    from fedmira.common.privacy import secagg_quantization_check

    state = {"a": np.array([0.5, -9.0, 0.01], np.float32), "b": np.array([0.0, 20.0], np.float32)}
    report = secagg_quantization_check(state, clipping_range=8.0, quantization_range=1 << 22)
    assert report["clipped"] == 2 and report["max_abs"] == pytest.approx(20.0) and report["values"] == 5
    assert report["step"] == pytest.approx(16 / 2 ** 22)
    assert report["step_over_typical"] == pytest.approx((16 / 2 ** 22) / 4.75)  # median of 0.01, 0.5, 9, 20


# --------------------------------------------------------------------------- flat clipping
def _release(model: Any, examples: list[Example], sample: list[list[int]], clipping: str, *, clip: float,
             sigma: float, expected: float, pad: int, seed: int = 0) -> tuple[torch.Tensor, Any, int]:
    """One step's DP gradient with ``privacy.clipping``; (flat gradient, release, clipped)."""
    device = next(model.parameters()).device
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    release = make_dp_optimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=sigma, max_grad_norm=clip,
                                expected_units=expected, device=device, seed=seed, secure_mode=False,
                                clipping=clipping)
    try:
        stats = dp_gradient(gsm, release, params, examples, sample, micro_batch=3, pad_id=pad, device=device)
        flat = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    finally:
        release.zero_grad()
        gsm._close()
    return flat, release, stats.clipped


@pytest.mark.parametrize("sample", [
    [[0], [1], [2], [3], [4]],        # records: some clipped, some not (clip near the median norm)
    [[0, 1, 2, 3], [4], [5, 6]],      # patients straddling micro-batches of 3
])
def test_flat_release_clips_exactly_as_opacus(
    tiny: LoadedModel, new_lora: Factory, perturb: Callable[..., Any], examples: list[Example],
    sample: list[list[int]],
) -> None:
    """Without noise the flat buffer gives Opacus' DPOptimizer's gradient: the same per-unit norms,
    the same units clipped, the same clipped mean."""
    results = {}
    for clipping in ("opacus", "flat"):
        model = new_lora(LoraConfig(dropout=0.0))
        perturb(model, seed=3, scale=0.05)  # B != 0, so every LoRA tensor has a gradient
        results[clipping] = _release(model, examples, sample, clipping, clip=1.0, sigma=0.0,
                                     expected=len(sample), pad=_pad(tiny))
    (g_op, r_op, c_op), (g_flat, r_flat, c_flat) = results["opacus"], results["flat"]
    torch.testing.assert_close(r_flat.norms, r_op.norms, rtol=1e-5, atol=0)
    median = float(r_op.norms.median())
    results = {}
    for clipping in ("opacus", "flat"):  # again with C at the median norm: about half clipped
        model = new_lora(LoraConfig(dropout=0.0))
        perturb(model, seed=3, scale=0.05)
        results[clipping] = _release(model, examples, sample, clipping, clip=median, sigma=0.0,
                                     expected=len(sample), pad=_pad(tiny))
    (g_op, r_op, c_op), (g_flat, r_flat, c_flat) = results["opacus"], results["flat"]
    assert c_flat == c_op and 0 < c_op < len(sample)
    torch.testing.assert_close(g_flat, g_op, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("clipping", ["opacus", "flat"])
def test_noise_scale_is_the_same_for_both_releases(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example], clipping: str,
) -> None:
    """Noise-only steps (empty samples): every coordinate is N(0, (sigma C / E)^2) either way,
    checked over 20 steps' coordinates (mean ~ 0, std within 2% of sigma C / E)."""
    sigma, clip, expected = 1.5, 0.5, 3.0
    draws = torch.cat([_release(new_lora(), examples, [], clipping, clip=clip, sigma=sigma, expected=expected,
                                pad=_pad(tiny), seed=s)[0] for s in range(20)])
    want = sigma * clip / expected
    assert float(draws.std()) == pytest.approx(want, rel=0.02)
    assert abs(float(draws.mean())) < 4 * want / math.sqrt(draws.numel())


def test_flat_and_opacus_training_spend_the_same_privacy(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example],
) -> None:
    """The accounting does not depend on the release: equal ledgers and epsilon; with zero noise and
    an unreachable clip both train the same adapter."""
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, max_grad_norm=0.0)
    out = {}
    for clipping in ("opacus", "flat"):
        model = new_lora(LoraConfig(dropout=0.0))
        ledger = _ledger(0.0, 0.5, len(examples))
        result = dp_train_steps(model, examples, list(range(len(examples))), cfg, ledger, tiny.device,
                                _pad(tiny), max_grad_norm=1e6, seed=4, clipping=clipping)
        out[clipping] = (get_adapter_state(model), ledger, result)
    (a, la, ra), (b, lb, rb) = out["opacus"], out["flat"]
    assert la.history == lb.history and ra.epsilon == rb.epsilon and ra.num_examples == rb.num_examples
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-7)
    sigma_ledgers = [_ledger(1.0, 0.25, 40), _ledger(1.0, 0.25, 40)]
    for ledger, clipping in zip(sigma_ledgers, ("opacus", "flat")):
        dp_train_steps(new_lora(), examples, list(range(len(examples))), cfg, ledger, tiny.device, _pad(tiny),
                       max_grad_norm=1.0, seed=4, clipping=clipping)
    assert sigma_ledgers[0].history == sigma_ledgers[1].history
    assert sigma_ledgers[0].epsilon() == sigma_ledgers[1].epsilon() > 0


def test_per_row_losses_at_target_positions_equal_full_logits(
    tiny: LoadedModel, new_lora: Factory, perturb: Callable[..., Any], examples: list[Example],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sample_losses projects to the vocabulary only at targets: the same per-row losses (and so the
    same per-sample gradients) as the full-logit path it replaced."""
    import fedmira.common.engine as engine
    import fedmira.common.privacy as privacy
    from fedmira.common.prompts import collate

    model = new_lora(LoraConfig(dropout=0.0))
    perturb(model, seed=1, scale=0.05)
    batch = collate(examples[:5], _pad(tiny))
    fast, counts = privacy.sample_losses(model, batch)
    monkeypatch.setattr(engine, "decoder_and_head", lambda _: None)
    full, counts_full = privacy.sample_losses(model, batch)
    assert torch.equal(counts, counts_full) and int(counts.min()) > 0
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
