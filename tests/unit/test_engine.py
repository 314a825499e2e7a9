"""Tests of local training, held-out loss and generation on the tiny model (common/engine.py)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from fedmira.common.adapters import get_adapter_state, set_adapter_state
from fedmira.common.config import DataConfig, GenerateConfig, TrainConfig
from fedmira.common.engine import TrainResult, encode_reports, evaluate_loss, generate, train_steps
from fedmira.common.model import LoadedModel
from fedmira.common.prompts import Example
from fedmira.common.reports import Report

Factory = Callable[..., Any]
TRAIN = TrainConfig(steps=15, batch_size=4, lr=5e-3)
GEN = GenerateConfig(max_new_tokens=8, batch_size=8)


@pytest.fixture
def examples(tiny: LoadedModel, reports: list[Report], data_cfg: DataConfig) -> list[Example]:
    """The fixture reports tokenized once (prompt masked, target = impression + eos)."""
    return encode_reports(reports, tiny.tokenizer, data_cfg)


def _pad(tiny: LoadedModel) -> int:
    """The tokenizer's pad id."""
    return int(tiny.tokenizer.pad_token_id)


def _train(model: Any, tiny: LoadedModel, examples: list[Example], cfg: TrainConfig = TRAIN,
           **kw: Any) -> TrainResult:
    """train_steps on the tiny model's device (keyword overrides: seed, lr, steps)."""
    return train_steps(model, examples, cfg, tiny.device, _pad(tiny), **kw)


def test_training_lowers_the_loss(tiny: LoadedModel, new_lora: Factory, examples: list[Example]) -> None:
    """15 steps at lr 5e-3 lower the per-token loss on the same examples."""
    model = new_lora()
    before, n_before = evaluate_loss(model, examples, tiny.device, _pad(tiny))
    result = _train(model, tiny, examples)
    after, n_after = evaluate_loss(model, examples, tiny.device, _pad(tiny))
    assert n_before == n_after > 0
    assert after < before - 0.03, (before, after)
    assert result.mean_loss == pytest.approx(before, abs=0.5)  # a mean over the run, near the start


def test_train_result_fields(tiny: LoadedModel, new_lora: Factory, examples: list[Example]) -> None:
    """Steps, distinct examples seen and token count are reported."""
    cfg = TrainConfig(steps=2, batch_size=4, grad_accum=2)
    result = _train(new_lora(), tiny, examples[:16], cfg)
    assert result.steps == 2
    assert result.num_examples == 16  # 2 steps x 2 micro-batches x 4 reports, no repeats
    assert result.tokens == sum(len(e.input_ids) for e in examples[:16])  # no padding counted
    assert result.seconds > 0 and result.tokens_per_s > 0
    assert 0 < result.mean_loss < 20
    short = _train(new_lora(), tiny, examples[:3], cfg, steps=1)  # fewer examples than a batch
    assert (short.steps, short.num_examples) == (1, 3)


def test_no_examples_is_an_error(tiny: LoadedModel, new_lora: Factory) -> None:
    """A site without training examples fails with a clear message."""
    with pytest.raises(ValueError, match="No training examples"):
        _train(new_lora(), tiny, [])


def test_training_is_deterministic_for_a_seed(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example]
) -> None:
    """Same seed and same initial adapter give bit-identical adapters (dropout included)."""
    model = new_lora()
    initial = get_adapter_state(model)
    cfg = TrainConfig(steps=4, batch_size=4, lr=5e-3)
    first = _train(model, tiny, examples, cfg, seed=7)
    state_1 = get_adapter_state(model)
    torch.rand(100)  # whatever ran in between (another site, evaluation) must not matter
    set_adapter_state(model, initial)
    second = _train(model, tiny, examples, cfg, seed=7)
    state_2 = get_adapter_state(model)
    assert all(torch.equal(state_1[k], state_2[k]) for k in state_1)
    assert first.mean_loss == second.mean_loss and first.tokens == second.tokens
    set_adapter_state(model, initial)
    _train(model, tiny, examples, cfg, seed=8)
    state_3 = get_adapter_state(model)
    assert not all(torch.equal(state_1[k], state_3[k]) for k in state_1)


def test_training_leaves_the_global_rng_alone(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example]
) -> None:
    """Seeding a round must not reset the caller's torch RNG stream."""
    model = new_lora()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _train(model, tiny, examples, TrainConfig(steps=1, batch_size=2), seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_gradients_reach_only_lora_weights(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example]
) -> None:
    """Training changes every LoRA tensor and no base-model weight."""
    model = new_lora()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = get_adapter_state(model)
    _train(model, tiny, examples, TrainConfig(steps=3, batch_size=4, lr=5e-3))
    base_after = dict(model.named_parameters())
    assert all(torch.equal(base_after[n].detach(), t) for n, t in base_before.items())
    lora_after = get_adapter_state(model)
    assert all(not torch.equal(lora_after[k], lora_before[k]) for k in lora_before)
    assert all(p.grad is None for p in model.parameters())  # zeroed with set_to_none
    assert not model.training  # left in eval mode


def test_evaluate_loss_matches_a_hand_computed_loss(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example]
) -> None:
    """Per-token mean over target tokens, independent of batch size (padding is ignored)."""
    model = new_lora()
    loss_1, n_1 = evaluate_loss(model, examples[:6], tiny.device, _pad(tiny), batch_size=1)
    loss_6, n_6 = evaluate_loss(model, examples[:6], tiny.device, _pad(tiny), batch_size=6)
    assert n_1 == n_6 == sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples[:6])
    assert loss_1 == pytest.approx(loss_6, rel=1e-5)
    ex = examples[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ex.input_ids], device=tiny.device)).logits[0, :-1].cpu()
    labels = torch.tensor(ex.labels[1:])
    mask = labels != -100
    manual = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    single, _ = evaluate_loss(model, [ex], tiny.device, _pad(tiny))
    assert single == pytest.approx(float(manual), rel=1e-5)


def test_greedy_generation_is_deterministic_and_in_input_order(
    tiny: LoadedModel, new_lora: Factory, perturb: Factory, reports: list[Report], data_cfg: DataConfig
) -> None:
    """One string per report, in input order, the same every time and alone or batched."""
    model = new_lora()
    perturb(model, seed=11)  # a random adapter makes outputs differ between reports
    r1, r2, r3 = reports[0], reports[1], reports[3]
    out = generate(model, tiny.tokenizer, [r1, r2, r3], data_cfg, GEN, tiny.device)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    assert len(set(out)) == 3, out  # distinct, so the order checks below mean something
    assert generate(model, tiny.tokenizer, [r1, r2, r3], data_cfg, GEN, tiny.device) == out
    shuffled = generate(model, tiny.tokenizer, [r3, r1, r2], data_cfg, GEN, tiny.device)
    assert shuffled == [out[2], out[0], out[1]]
    alone = [generate(model, tiny.tokenizer, [r], data_cfg, GEN, tiny.device)[0] for r in (r1, r2, r3)]
    assert alone == out  # left padding does not change a report's output
    small = GenerateConfig(max_new_tokens=8, batch_size=2)  # batches split across calls
    assert generate(model, tiny.tokenizer, [r1, r2, r3], data_cfg, small, tiny.device) == out


def test_generation_returns_text_without_special_tokens(
    tiny: LoadedModel, new_lora: Factory, perturb: Factory, reports: list[Report], data_cfg: DataConfig
) -> None:
    """Outputs are decoded text: no chat or padding tokens; an empty list gives no outputs."""
    model = new_lora()
    perturb(model, seed=12)
    gen = GenerateConfig(max_new_tokens=3, batch_size=4)
    texts = generate(model, tiny.tokenizer, reports[:4], data_cfg, gen, tiny.device)
    assert len(texts) == 4
    for text in texts:
        assert not any(s in text for s in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"))
    assert generate(model, tiny.tokenizer, [], data_cfg, gen, tiny.device) == []


def test_bf16_autocast_trains_like_fp32(tiny: LoadedModel) -> None:
    """Regression: autocast caches its bf16 weight copies until its context exits, so a context
    around the whole loop trained on stale LoRA weights (the held-out loss never moved).
    train_steps enters it per micro-batch; the result must track fp32 training."""
    import copy

    from fedmira.common.adapters import get_adapter_state
    from fedmira.common.config import LoraConfig, TrainConfig
    from fedmira.common.engine import evaluate_loss, train_steps
    from fedmira.common.model import apply_lora
    from fedmira.common.prompts import IGNORE_INDEX, Example

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (4, 20), generator=gen)
    examples = [Example(row.tolist(), [IGNORE_INDEX] * 12 + row[12:].tolist()) for row in ids]
    cfg = TrainConfig(steps=6, lr=1e-2, batch_size=4)
    losses = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = apply_lora(copy.deepcopy(tiny.model), LoraConfig(), seed=0)
        before, _ = evaluate_loss(model, examples, tiny.device, 0)
        train_steps(model, examples, cfg, tiny.device, 0, autocast=dtype)
        losses[name] = (before, evaluate_loss(model, examples, tiny.device, 0)[0])
        assert get_adapter_state(model)
    assert losses["bf16"][1] < losses["bf16"][0] - 0.05  # it learned
    assert abs(losses["bf16"][1] - losses["fp32"][1]) < 0.05  # about as much as fp32


def test_autocast_choice() -> None:
    from fedmira.common.config import ModelConfig
    from fedmira.common.model import cpu_has_fast_bf16, model_autocast, resolve_autocast

    cpu = torch.device("cpu")
    assert resolve_autocast("off", cpu, torch.float32) is None
    assert resolve_autocast("bfloat16", cpu, torch.float32) is torch.bfloat16
    assert resolve_autocast("bfloat16", cpu, torch.bfloat16) is None  # 16-bit weights gain nothing
    assert resolve_autocast("auto", cpu, torch.float32) is (torch.bfloat16 if cpu_has_fast_bf16() else None)
    assert model_autocast(ModelConfig(name_or_path="tiny-random"), cpu, torch.float32) is None


def test_gradient_checkpointing_gives_the_same_adapter_and_is_switched_off_after(
    tiny: LoadedModel, new_lora: Factory, examples: list[Example]
) -> None:
    """Recomputed activations (dropout masks included: the RNG state is restored) change nothing."""
    model = new_lora()
    initial = get_adapter_state(model)
    cfg = TrainConfig(steps=3, batch_size=4, lr=5e-3)
    plain = _train(model, tiny, examples, cfg, seed=3)
    want = get_adapter_state(model)
    set_adapter_state(model, initial)
    base = model.base_model.model
    during: list[bool] = []
    ckpt_cfg = TrainConfig(steps=3, batch_size=4, lr=5e-3, gradient_checkpointing=True)
    ckpt = _train(model, tiny, examples, ckpt_cfg, seed=3,
                  on_step=lambda step, loss: during.append(base.is_activation_checkpointing))
    got = get_adapter_state(model)
    assert during == [True, True, True]  # it really recomputed
    assert ckpt.mean_loss == pytest.approx(plain.mean_loss, rel=1e-6)
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
    assert not base.is_activation_checkpointing  # switched off: generation keeps its KV cache


def test_gradient_checkpointing_is_refused_with_dp_sgd() -> None:
    from fedmira.common.compose import compose_config
    from fedmira.common.errors import ConfigError

    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        compose_config(["+debug=tiny", "privacy=dp", "train.gradient_checkpointing=true"])
