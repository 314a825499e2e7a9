"""The training recipe over a whole run (common/engine.py, common/privacy.py, common/config.py).

Local epochs instead of steps, one learning-rate schedule over all rounds, AdamW state kept at a
site between rounds, length-grouped batches, and ``lr=0`` meaning 0. Tiny random model, fixed
seeds, expected numbers worked out by hand or from transformers' own schedulers.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from transformers import get_scheduler

from fedmira.common.adapters import get_adapter_state
from fedmira.common.compose import compose_config
from fedmira.common.config import DataConfig, LoraConfig, TrainConfig
from fedmira.common.engine import TrainResult, _batches, encode_reports, lr_at, round_steps, train_steps
from fedmira.common.errors import ConfigError
from fedmira.common.model import LoadedModel
from fedmira.common.privacy import AccountantState, dp_train_steps
from fedmira.common.prompts import Example
from fedmira.common.reports import Report

Factory = Callable[..., Any]
NO_DROPOUT = LoraConfig(dropout=0.0)  # dropout masks would differ between one run and two rounds


@pytest.fixture
def examples(tiny: LoadedModel, reports: list[Report], data_cfg: DataConfig) -> list[Example]:
    return encode_reports(reports, tiny.tokenizer, data_cfg)


@pytest.fixture
def long_examples(tiny: LoadedModel, reports: list[Report]) -> list[Example]:
    """The fixture reports untruncated (211-433 tokens): lengths vary, so batching decides padding."""
    return encode_reports(reports, tiny.tokenizer, DataConfig(max_length=1024, max_target_tokens=48))


@pytest.fixture
def seen_lrs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The learning rate of every AdamW step taken in the test: what the optimizer really used."""
    lrs: list[float] = []
    original = torch.optim.AdamW.step

    def step(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        lrs.append(float(self.param_groups[0]["lr"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    yield lrs


def _pad(tiny: LoadedModel) -> int:
    return int(tiny.tokenizer.pad_token_id)


def _train(model: Any, tiny: LoadedModel, examples: list[Example], cfg: TrainConfig,
           **kw: Any) -> TrainResult:
    return train_steps(model, examples, cfg, tiny.device, _pad(tiny), **kw)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ledger(units: int) -> AccountantState:
    return AccountantState(units=units, noise_multiplier=1.0, sample_rate=0.2, planned_steps=10)


# --------------------------------------------------------------------------- lr_at
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_at_is_transformers_schedule_step_for_step(schedule: str, warmup: int) -> None:
    """Within a run's steps lr_at gives exactly the rates of get_scheduler (the previous engine)."""
    total, peak = 10, 5e-3
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    scheduler = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        assert lr_at(step, total, peak, warmup, schedule) == opt.param_groups[0]["lr"], step
        opt.step()
        scheduler.step()


def test_lr_at_known_values_and_past_the_plan() -> None:
    assert [lr_at(k, 10, 1.0, 2, "cosine") for k in range(3)] == [0.0, 0.5, 1.0]  # warm-up from 0
    assert lr_at(6, 10, 1.0, 2, "cosine") == pytest.approx(0.5)  # half way through the decay
    assert lr_at(6, 10, 1.0, 2, "linear") == 0.5
    assert lr_at(4, 10, 2e-3, 0, "constant") == 2e-3 == lr_at(10**6, 10, 2e-3, 0, "constant")
    for schedule in ("linear", "cosine"):  # past the planned total the rate stays at the end value
        assert lr_at(10, 10, 1.0, 2, schedule) == 0.0 == lr_at(25, 10, 1.0, 2, schedule)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, 1.0, 0, "step")


# --------------------------------------------------------------------------- one schedule per run
def test_rounds_continue_one_schedule(tiny: LoadedModel, new_lora: Factory, examples: list[Example],
                                      seen_lrs: list[float]) -> None:
    """Three rounds of 3 steps at global steps 0, 3, 6 of 9: one warm-up and one decay in all."""
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=2, schedule="cosine")
    model = new_lora()
    for g in range(3):
        _train(model, tiny, examples, cfg, global_step=3 * g, total_steps=9)
    assert seen_lrs == [lr_at(k, 9, 1e-2, 2, "cosine") for k in range(9)]
    assert seen_lrs[:3] == [0.0, 5e-3, 1e-2]
    assert seen_lrs[-1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 6 / 7)))


def test_one_call_is_a_whole_run_by_default(tiny: LoadedModel, new_lora: Factory, examples: list[Example],
                                            seen_lrs: list[float]) -> None:
    """Without an offset (centralized `fedmira train`) the schedule spans the call's own steps."""
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=2, schedule="linear")
    result = _train(new_lora(), tiny, examples, cfg)
    assert seen_lrs == [0.0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3]
    assert result.lr == 2.5e-3  # the rate of the last step taken


def test_constant_schedule_is_the_same_at_every_position(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example], seen_lrs: list[float],
) -> None:
    """Constant without warm-up (the default) trains bit for bit as before, wherever the round is."""
    cfg = TrainConfig(steps=3, batch_size=4, lr=5e-3)
    first, later = new_lora(), new_lora()
    _train(first, tiny, examples, cfg, seed=7)
    _train(later, tiny, examples, cfg, seed=7, global_step=300, total_steps=30)
    assert _equal(get_adapter_state(first), get_adapter_state(later))
    assert seen_lrs == [5e-3] * 6


def test_a_bad_schedule_position_is_an_error(tiny: LoadedModel, new_lora: Factory,
                                             examples: list[Example]) -> None:
    cfg = TrainConfig(steps=1, batch_size=4)
    with pytest.raises(ValueError, match="global_step"):
        _train(new_lora(), tiny, examples, cfg, global_step=-1)
    with pytest.raises(ValueError, match="total_steps"):
        _train(new_lora(), tiny, examples, cfg, total_steps=0)


def test_dp_rounds_follow_the_same_schedule(tiny: LoadedModel, new_lora: Factory, examples: list[Example],
                                            seen_lrs: list[float]) -> None:
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=2, schedule="linear")
    model, ledger = new_lora(), _ledger(len(examples))
    for g in range(2):
        dp_train_steps(model, examples, list(range(len(examples))), cfg, ledger, tiny.device, _pad(tiny),
                       max_grad_norm=1.0, seed=g, global_step=2 * g, total_steps=4)
    assert seen_lrs == [0.0, 5e-3, 1e-2, 5e-3]


# --------------------------------------------------------------------------- lr = 0
def test_lr_zero_means_zero(tiny: LoadedModel, new_lora: Factory, perturb: Factory, examples: list[Example],
                            seen_lrs: list[float]) -> None:
    """An explicit lr=0 (a server may send it) trains nothing; it used to fall back to train.lr."""
    cfg = TrainConfig(steps=2, batch_size=4, lr=5e-3, weight_decay=0.1)
    model = new_lora()
    perturb(model, seed=3)  # nonzero weights, so weight decay would show too
    before = get_adapter_state(model)
    _train(model, tiny, examples, cfg, lr=0.0)
    dp_train_steps(model, examples, list(range(len(examples))), cfg, _ledger(len(examples)), tiny.device,
                   _pad(tiny), max_grad_norm=1.0, seed=0, lr=0.0)
    assert seen_lrs == [0.0] * 4
    assert _equal(get_adapter_state(model), before)


# --------------------------------------------------------------------------- epochs
def test_epochs_set_the_steps_of_a_round() -> None:
    """ceil(epochs x examples / (batch_size x grad_accum)); train.steps (or the server's) when 0."""
    assert round_steps(TrainConfig(epochs=1.0, batch_size=4), 40) == 10
    assert round_steps(TrainConfig(epochs=0.5, batch_size=4, grad_accum=2), 40) == 3  # 2.5 steps
    assert round_steps(TrainConfig(epochs=0.07, batch_size=1), 100) == 7  # 7.000000000000001 in floats
    assert round_steps(TrainConfig(epochs=0.001, batch_size=4), 40) == 1  # at least one step
    assert round_steps(TrainConfig(steps=7), 40) == 7
    assert round_steps(TrainConfig(steps=7), 40, steps=2) == 2
    assert round_steps(TrainConfig(steps=7, epochs=1.0, batch_size=4), 40, steps=2) == 10  # epochs win


def test_training_by_epochs(tiny: LoadedModel, new_lora: Factory, examples: list[Example]) -> None:
    result = _train(new_lora(), tiny, examples, TrainConfig(epochs=0.5, batch_size=4))
    assert (result.steps, result.num_examples) == (5, 20)  # half of the 40 examples, none twice


@pytest.mark.parametrize("epochs", [-0.5, math.nan, math.inf, 10001.0, "1"])
def test_bad_epochs_raise_config_error_naming_the_field(epochs: Any) -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        TrainConfig(epochs=epochs)


def test_new_train_options_compose_and_round_trip() -> None:
    cfg = compose_config(["train.epochs=0.25", "train.keep_optimizer_state=true",
                          "train.group_by_length=true"])
    assert (cfg.train.epochs, cfg.train.keep_optimizer_state, cfg.train.group_by_length) == (0.25, True, True)
    assert type(cfg).from_run_config(cfg.to_run_config()) == cfg
    default = compose_config([]).train
    assert (default.epochs, default.keep_optimizer_state, default.group_by_length) == (0.0, False, False)


def test_group_by_length_is_refused_with_dp() -> None:
    """DP-SGD's batches are Poisson samples (the accountant assumes so): grouping cannot apply."""
    with pytest.raises(ConfigError, match=r"train\.group_by_length"):
        compose_config(["privacy=dp", "train.group_by_length=true"])


# --------------------------------------------------------------------------- optimizer state
def test_kept_adamw_state_makes_two_rounds_one_run(tiny: LoadedModel, new_lora: Factory,
                                                   examples: list[Example]) -> None:
    """Same example every step, no dropout: two rounds of 3 steps with the AdamW state and the
    schedule carried over are bit for bit one run of 6 steps; restarting AdamW is not."""
    one = examples[:1]
    keep = TrainConfig(steps=3, batch_size=1, lr=1e-2, warmup_steps=2, schedule="cosine",
                       keep_optimizer_state=True)
    whole = new_lora(NO_DROPOUT)
    _train(whole, tiny, one, dataclasses.replace(keep, steps=6, keep_optimizer_state=False))
    split = new_lora(NO_DROPOUT)
    first = _train(split, tiny, one, keep, total_steps=6)
    assert not first.optimizer_state_restored
    assert len(first.optimizer_state) == 3 * sum(p.requires_grad for p in split.parameters())
    second = _train(split, tiny, one, keep, global_step=3, total_steps=6,
                    optimizer_state=first.optimizer_state)
    assert second.optimizer_state_restored
    assert _equal(get_adapter_state(split), get_adapter_state(whole))
    steps = {k: float(v) for k, v in second.optimizer_state.items() if k.endswith(":step")}
    assert set(steps.values()) == {6.0} and all(float(v) == 3.0 for k, v in first.optimizer_state.items()
                                                if k.endswith(":step"))  # the kept state was not mutated
    restart = new_lora(NO_DROPOUT)
    for g in range(2):
        _train(restart, tiny, one, keep, global_step=3 * g, total_steps=6)
    assert not _equal(get_adapter_state(restart), get_adapter_state(whole))


def test_optimizer_state_is_off_by_default(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example],
) -> None:
    cfg = TrainConfig(steps=2, batch_size=4)
    keep = dataclasses.replace(cfg, keep_optimizer_state=True)
    kept = _train(new_lora(), tiny, examples, keep).optimizer_state
    result = _train(new_lora(), tiny, examples, cfg, optimizer_state=kept)
    assert not result.optimizer_state_restored and result.optimizer_state == {}


@pytest.mark.parametrize("damage", ["other_rank", "missing_key", "extra_key", "bad_shape"])
def test_a_state_that_does_not_match_exactly_starts_fresh(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example], damage: str,
) -> None:
    cfg = TrainConfig(steps=2, batch_size=4, keep_optimizer_state=True)
    donor = new_lora(LoraConfig(r=4)) if damage == "other_rank" else new_lora()
    saved = dict(_train(donor, tiny, examples, cfg).optimizer_state)
    key = sorted(saved)[1]
    if damage == "missing_key":
        del saved[key]
    elif damage == "extra_key":
        saved["base_model.model.lm_head.weight:exp_avg"] = torch.zeros(1)
    elif damage == "bad_shape":
        saved[key] = saved[key].flatten()[:-1]
    fresh, restored = new_lora(), new_lora()
    _train(fresh, tiny, examples, cfg, seed=5)
    result = _train(restored, tiny, examples, cfg, seed=5, optimizer_state=saved)
    assert not result.optimizer_state_restored
    assert _equal(get_adapter_state(restored), get_adapter_state(fresh))


def test_dp_keeps_the_optimizer_state_too(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example],
) -> None:
    cfg = TrainConfig(steps=2, batch_size=4, keep_optimizer_state=True)
    model, ledger, units = new_lora(), _ledger(len(examples)), list(range(len(examples)))
    first = dp_train_steps(model, examples, units, cfg, ledger, tiny.device, _pad(tiny), max_grad_norm=1.0,
                           seed=0)
    second = dp_train_steps(model, examples, units, cfg, ledger, tiny.device, _pad(tiny), max_grad_norm=1.0,
                            seed=1, optimizer_state=first.optimizer_state)
    assert (first.optimizer_state_restored, second.optimizer_state_restored) == (False, True)
    assert {float(v) for k, v in second.optimizer_state.items() if k.endswith(":step")} == {4.0}


# --------------------------------------------------------------------------- length grouping
def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_pad_less(long_examples: list[Example]) -> None:
    """One epoch of 10 batches of 4: every example once, seeded, and 421 padded tokens, not 1837."""
    lengths = [len(e.input_ids) for e in long_examples]

    def epoch(grouped: bool) -> list[list[int]]:
        stream = _batches(40, 4, random.Random(0), lengths if grouped else None)
        return [next(stream) for _ in range(10)]

    shuffled, grouped = epoch(False), epoch(True)
    assert sorted(i for b in grouped for i in b) == list(range(40))
    assert grouped == epoch(True) and shuffled == epoch(False)
    assert (_padding(shuffled, lengths), _padding(grouped, lengths)) == (1837, 421)
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest)  # the batches themselves come in random order


def test_grouping_leaves_out_random_rows_not_the_longest(long_examples: list[Example]) -> None:
    """42 rows, batches of 4: each epoch drops 2 rows as plain batching does, never always the longest."""
    lengths = [len(e.input_ids) for e in long_examples] + [1000, 999]
    stream = _batches(42, 4, random.Random(1), lengths)
    seen = {i for _ in range(10 * 10) for i in next(stream)}
    assert {40, 41} <= seen


def test_grouping_keeps_batches_random_among_equal_lengths() -> None:
    """Reports cut to max_length are all equally long: their batches must still change every
    epoch (a tie-break by index would pin them to {0..3}, {4..7}, ... for the whole run)."""
    stream = _batches(40, 4, random.Random(0), [224] * 40)
    epochs = [{frozenset(next(stream)) for _ in range(10)} for _ in range(2)]
    plain = _batches(40, 4, random.Random(0))
    assert epochs[0] != epochs[1]
    assert epochs[0] == {frozenset(next(plain)) for _ in range(10)}  # grouping changes nothing here


def test_training_with_grouped_batches_pads_less(tiny: LoadedModel, new_lora: Factory,
                                                 long_examples: list[Example]) -> None:
    cfg = TrainConfig(steps=10, batch_size=4)
    plain = _train(new_lora(), tiny, long_examples, cfg)
    grouped = _train(new_lora(), tiny, long_examples, dataclasses.replace(cfg, group_by_length=True))
    assert (plain.padded_tokens, grouped.padded_tokens) == (1837, 421)
    assert plain.tokens == grouped.tokens == sum(len(e.input_ids) for e in long_examples)
    assert grouped.num_examples == 40


def test_model_card_states_the_recipe() -> None:
    from fedmira.common.export import training_line

    assert training_line(compose_config([])) == "4 steps per round x batch 4 x accum 1, lr 0.0005 (constant)"
    line = training_line(compose_config(["train.epochs=0.5", "train.schedule=cosine", "train.warmup_steps=10",
                                         "train.keep_optimizer_state=true", "train.group_by_length=true"]))
    assert line == ("0.5 local epochs per round x batch 4 x accum 1, lr 0.0005 (cosine over the run, "
                    "10 warm-up steps), AdamW state kept at each site, length-grouped batches")


def test_the_model_card_is_a_hugging_face_card_with_metadata(tmp_path: Path) -> None:
    """Issue 15: the card is written with huggingface_hub.ModelCard (YAML metadata + Markdown)."""
    from huggingface_hub import ModelCard

    from fedmira.common.export import hub_card

    cfg = compose_config(["+debug=tiny", "model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct"])
    hub_card(cfg, "# fedmira adapter\n\nbody\n").save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "fedmira" in card.data.tags and card.text.strip().endswith("body")
    local = hub_card(compose_config(["+debug=tiny", "model.name_or_path=/models/local"]), "x")
    assert local.data.base_model is None  # a hospital's staged path is not a Hub id
