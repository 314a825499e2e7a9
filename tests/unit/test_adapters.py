"""Tests of adapter export/import, strict checks and the PEFT folder format (common/adapters.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from peft import PeftModel

from fedmira.common.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_num_bytes,
    get_adapter_state,
    load_adapter,
    load_adapter_state,
    save_adapter,
    save_adapter_state,
    set_adapter_state,
)
from fedmira.common.config import LoraConfig
from fedmira.common.errors import ModelError
from fedmira.common.model import LoadedModel, count_trainable

Factory = Callable[..., Any]


def _logits(model: Any, tiny: LoadedModel) -> torch.Tensor:
    """Logits of a fixed batch (two texts of different lengths, right-padded)."""
    tok = tiny.tokenizer
    batch = tok(["The lungs are clear.", "No acute fracture of the spine or knee."],
                return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**{k: v.to(tiny.device) for k, v in batch.items()}).logits.cpu()


def test_only_lora_tensors_are_exported(tiny: LoadedModel, new_lora: Factory) -> None:
    """r=8 on q_proj,v_proj of the 2-layer tiny model: 8 tensors, 3584 parameters, 14336 bytes."""
    model = new_lora(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    state = get_adapter_state(model)
    layers = tiny.model.config.num_hidden_layers
    assert layers == 2
    assert len(state) == 2 * layers * 2 == 8  # (A, B) x layers x modules
    assert all("lora_" in k for k in state)
    assert sum(1 for k in state if ".lora_A." in k) == sum(1 for k in state if ".lora_B." in k) == 4
    assert list(state) == sorted(state)
    assert sum(t.numel() for t in state.values()) == count_trainable(model) == 3584
    assert adapter_num_bytes(state) == 3584 * 4
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    assert all(torch.count_nonzero(t) == 0 for k, t in state.items() if ".lora_B." in k)  # B = 0 at init


def test_count_scales_with_target_modules(tiny: LoadedModel, new_lora: Factory) -> None:
    """Seven target modules (conf/lora/r16_all.yaml) give 2 x layers x 7 tensors."""
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    state = get_adapter_state(new_lora(LoraConfig(r=16, alpha=32, target_modules=modules)))
    assert len(state) == 2 * tiny.model.config.num_hidden_layers * len(modules) == 28
    assert all("lora_" in k for k in state)


def test_export_import_gives_identical_logits(
    tiny: LoadedModel, new_lora: Factory, perturb: Factory
) -> None:
    """A perturbed adapter exported and set into a fresh LoRA model reproduces its logits exactly."""
    source = new_lora()
    perturb(source, seed=1)
    target = new_lora()
    assert not torch.equal(_logits(source, tiny), _logits(target, tiny))  # the change matters
    set_adapter_state(target, get_adapter_state(source))
    assert torch.equal(_logits(source, tiny), _logits(target, tiny))
    base = _logits(tiny.model, tiny)
    assert not torch.equal(_logits(target, tiny), base)


def test_exported_state_is_a_copy(new_lora: Factory, perturb: Factory) -> None:
    """Changing an exported tensor does not change the model (tensors leave as copies)."""
    model = new_lora()
    perturb(model, seed=2)
    state = get_adapter_state(model)
    key = next(iter(state))
    state[key].add_(1.0)
    assert not torch.equal(get_adapter_state(model)[key], state[key])


def test_wrong_key_set_is_rejected(new_lora: Factory) -> None:
    """A missing or an unexpected tensor is named, with what to check."""
    model = new_lora()
    state = get_adapter_state(model)
    missing = dict(state)
    dropped = missing.pop(next(iter(missing)))
    with pytest.raises(ModelError, match=r"1 missing .*lora\.target_modules"):
        set_adapter_state(model, missing)
    extra = {**state, "base_model.model.lm_head.lora_A.weight": dropped}
    with pytest.raises(ModelError, match=r"1 unexpected .*lm_head"):
        set_adapter_state(model, extra)
    # An adapter of other target modules (k_proj too) does not fit this model.
    other = get_adapter_state(new_lora(LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"])))
    with pytest.raises(ModelError, match="unexpected"):
        set_adapter_state(model, other)


def test_wrong_shape_is_rejected(new_lora: Factory) -> None:
    """An adapter of another rank fails naming the tensor and both shapes."""
    model = new_lora(LoraConfig(r=8))
    other = get_adapter_state(new_lora(LoraConfig(r=4)))
    with pytest.raises(ModelError) as info:
        set_adapter_state(model, other)
    message = str(info.value)
    assert "lora_" in message and "(4, 64)" in message and "(8, 64)" in message and "lora.r" in message


def test_nan_values_are_rejected_and_leave_the_model_untouched(new_lora: Factory, perturb: Factory) -> None:
    """NaN/Inf tensors are refused before anything is loaded."""
    model = new_lora()
    before = perturb(model, seed=3)
    bad = {k: v.clone() for k, v in before.items()}
    key = sorted(bad)[-1]
    bad[key][0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN") as info:
        set_adapter_state(model, bad)
    assert key in str(info.value)
    bad[key][0, 0] = float("inf")
    with pytest.raises(ModelError, match="Inf"):
        set_adapter_state(model, bad)
    after = get_adapter_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_save_then_load_adapter_state_round_trip(
    tmp_path: Path, tiny: LoadedModel, new_lora: Factory, perturb: Factory
) -> None:
    """save_adapter_state -> load_adapter_state returns the same tensors; the folder is PEFT's."""
    model = new_lora()
    state = perturb(model, seed=4)
    folder = save_adapter_state(get_adapter_state(model), model.peft_config["default"], tmp_path / "a")
    assert (folder / ADAPTER_WEIGHTS).is_file() and (folder / ADAPTER_CONFIG).is_file()
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    loaded = load_adapter_state(folder)
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    fresh = new_lora()
    load_adapter(fresh, folder)
    assert torch.equal(_logits(fresh, tiny), _logits(model, tiny))


def test_saved_folder_loads_with_peft_from_pretrained(
    tmp_path: Path, tiny: LoadedModel, new_lora: Factory, perturb: Factory
) -> None:
    """Both save paths write folders that plain PEFT loads onto the base model, same logits."""
    model = new_lora()
    perturb(model, seed=5)
    expected = _logits(model, tiny)
    bare = save_adapter_state(get_adapter_state(model), model.peft_config["default"], tmp_path / "bare")
    native = save_adapter(model, tmp_path / "native", metadata={"round": 3})
    assert json.loads((native / "fedmira.json").read_text()) == {"round": 3}
    for folder in (bare, native):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny.model), folder)
        assert torch.equal(_logits(peft_model, tiny), expected), folder.name
    assert set(load_adapter_state(native)) == set(get_adapter_state(model))


def test_missing_adapter_folder_is_a_model_error(tmp_path: Path) -> None:
    """Loading from a folder without adapter weights says which file is missing."""
    with pytest.raises(ModelError, match=ADAPTER_WEIGHTS):
        load_adapter_state(tmp_path)
