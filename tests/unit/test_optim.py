"""The run-long schedule, AdamW state across rounds, epochs and length-grouped batches (tiny model)."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from transformers import get_scheduler

from fedmira.common.adapters import get_adapter_state
from fedmira.common.config import LoraConfig, TrainConfig
from fedmira.common.engine import _batches, train_steps
from fedmira.common.errors import ConfigError
from fedmira.common.model import LoadedModel, apply_lora
from fedmira.common.optim import (
    Schedule,
    lr_factor,
    make_optimizer,
    optimizer_arrays,
    restore_optimizer,
    round_steps,
)
from fedmira.common.prompts import IGNORE_INDEX, Example, collate
from fedmira.common.site import round_schedule


def _examples(n: int = 1, width: int = 20) -> list[Example]:
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 100, (n, width), generator=gen)
    return [Example(r.tolist(), [IGNORE_INDEX] * (width - 6) + r[width - 6 :].tolist()) for r in rows]


def _model(tiny: LoadedModel) -> torch.nn.Module:
    return apply_lora(copy.deepcopy(tiny.model), LoraConfig(dropout=0.0), seed=0)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_factor_equals_transformers_schedules(schedule: str) -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    ref = get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=12)
    for step in range(12):
        assert lr_factor(step, 12, 3, schedule) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        ref.step()


def test_round_schedule_continues_across_rounds() -> None:
    assert round_schedule(0, 5, 4) == Schedule()
    assert round_schedule(1, 5, 4) == Schedule(0, 20) and round_schedule(3, 5, 4) == Schedule(10, 20)
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, schedule="cosine")
    opt, _ = make_optimizer([param], cfg, cfg.lr, 5, round_schedule(3, 5, 4))
    # round 3 starts at global step 10 of 20: half way down the cosine, not at the warm-up again
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(10, 20, 2, "cosine"))
    assert 0.3e-2 < opt.param_groups[0]["lr"] < 0.7e-2


def test_two_rounds_with_kept_state_equal_one_long_run(tiny: LoadedModel) -> None:
    """Schedule offset + AdamW moments carried over: 2 + 2 steps == 4 steps (one example, no dropout)."""
    ex, dev = _examples(), tiny.device
    cfg = TrainConfig(lr=5e-3, batch_size=1, warmup_steps=1, schedule="cosine", max_grad_norm=0.0,
                      keep_optimizer_state=True)
    whole = _model(tiny)
    train_steps(whole, ex, cfg, dev, 0, steps=4, seed=0)
    split = _model(tiny)
    first = train_steps(split, ex, cfg, dev, 0, steps=2, seed=0, total_steps=4)
    second = train_steps(split, ex, cfg, dev, 0, steps=2, seed=0, global_step=2, total_steps=4,
                         optimizer_state=first.optimizer_state)
    assert not first.optimizer_state_restored and second.optimizer_state_restored
    a, b = get_adapter_state(whole), get_adapter_state(split)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    # Restarting AdamW and the schedule (the old behaviour) ends somewhere else.
    restarted = _model(tiny)
    train_steps(restarted, ex, cfg, dev, 0, steps=2, seed=0)
    train_steps(restarted, ex, cfg, dev, 0, steps=2, seed=0)
    c = get_adapter_state(restarted)
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4


def test_explicit_lr_zero_means_no_update(tiny: LoadedModel) -> None:
    model = _model(tiny)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # so that weight decay or any step would show
    before = get_adapter_state(model)
    train_steps(model, _examples(2), TrainConfig(lr=1e-2, batch_size=2), tiny.device, 0, steps=2, lr=0.0)
    after = get_adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_epochs_decide_the_steps() -> None:
    assert round_steps(TrainConfig(epochs=1.0, batch_size=4), 10) == 3
    assert round_steps(TrainConfig(epochs=0.5, batch_size=4, grad_accum=2), 100) == 7
    assert round_steps(TrainConfig(steps=9), 100) == 9 and round_steps(TrainConfig(steps=9), 100, 2) == 2
    assert round_steps(TrainConfig(epochs=0.01, batch_size=4), 10) == 1


def test_restore_refuses_moments_of_other_parameters() -> None:
    p = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(p, lr=0.1)
    sum(x.sum() for x in p).backward()
    opt.step()
    names = ["a", "b"]
    saved = optimizer_arrays(opt, names)
    assert set(saved) == {f"{n}:{k}" for n in names for k in ("step", "exp_avg", "exp_avg_sq")}
    fresh = torch.optim.AdamW(p, lr=0.1)
    assert restore_optimizer(fresh, p, names, saved) and float(fresh.state[p[0]]["step"]) == 1.0
    other = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(4))]
    assert not restore_optimizer(torch.optim.AdamW(other, lr=0.1), other, names, saved)
    assert not restore_optimizer(torch.optim.AdamW(p[:1], lr=0.1), p[:1], names[:1], saved)
    assert not restore_optimizer(fresh, p, ["x", "y"], saved)
    assert not restore_optimizer(fresh, p, names, None)


def test_length_grouped_batches_pad_less_and_cover_every_example() -> None:
    rng_lengths = random.Random(0)
    lengths = [rng_lengths.randint(10, 200) for _ in range(400)]
    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    n_batches = 400 // 8
    plain = _batches(400, 8, random.Random(1))
    grouped = _batches(400, 8, random.Random(1), lengths)
    epoch_plain = [next(plain) for _ in range(n_batches)]
    epoch_grouped = [next(grouped) for _ in range(n_batches)]
    assert sorted(i for b in epoch_grouped for i in b) == list(range(400))  # one epoch, each once
    assert padding(epoch_grouped) < 0.3 * padding(epoch_plain)
    again = _batches(400, 8, random.Random(1), lengths)
    assert [next(again) for _ in range(n_batches)] == epoch_grouped  # seeded


def test_group_by_length_trains(tiny: LoadedModel) -> None:
    ex = _examples(6, 20) + _examples(6, 40)
    cfg = TrainConfig(batch_size=3, group_by_length=True, lr=1e-2)
    result = train_steps(_model(tiny), ex, cfg, tiny.device, 0, steps=4, seed=0)
    assert result.steps == 4 and math.isfinite(result.mean_loss)
    pad = sum(int((collate([ex[i] for i in b], 0)["attention_mask"] == 0).sum())
              for b in ([0, 1, 2], [6, 7, 8]))
    assert pad == 0  # equal-length groups need no padding


def test_warmup_ratio_scales_with_each_sites_run() -> None:
    """Sites of different sizes (train.epochs) warm up over the same share of their own run."""
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(lr=1.0, warmup_ratio=0.25, schedule="constant")
    small, _ = make_optimizer([param], cfg, cfg.lr, 2, round_schedule(2, 2, 4))  # step 2 of 8
    big, _ = make_optimizer([param], cfg, cfg.lr, 20, round_schedule(2, 20, 4))  # step 20 of 80
    # both sit at the end of their warm-up (ceil(0.25 x total) = 2 and 20 steps): full rate
    assert small.param_groups[0]["lr"] == pytest.approx(1.0)
    assert big.param_groups[0]["lr"] == pytest.approx(1.0)
    first, _ = make_optimizer([param], cfg, cfg.lr, 2, round_schedule(1, 2, 4))
    assert first.param_groups[0]["lr"] == 0.0  # step 0 of a warm-up, as with warmup_steps


def test_warmup_steps_and_ratio_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="warmup_ratio"):
        TrainConfig(warmup_steps=5, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)


def test_a_call_reports_the_sum_of_its_learning_rates(tiny: LoadedModel) -> None:
    """lr-sum is what the server divides update norms by (AdamW moves about lr per step)."""
    cfg = TrainConfig(lr=1e-3, batch_size=1, warmup_steps=4, schedule="constant")
    result = train_steps(_model(tiny), _examples(), cfg, tiny.device, 0, steps=3, seed=0, total_steps=8)
    assert result.lr_sum == pytest.approx(1e-3 * (0 + 0.25 + 0.5))
