"""QLoRA bases (``model.quantization=nf4|int8``): the tiny model loaded by bitsandbytes on CPU.

Only the LoRA tensors are trained and sent, with the same keys and shapes as over a
full-precision base; the refusals name the setting and the fix; a merged export uses the
full-precision base.
"""

from __future__ import annotations

import builtins
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmira.common.adapters import get_adapter_state
from fedmira.common.compose import compose_config
from fedmira.common.errors import ConfigError, ModelError
from fedmira.common.model import apply_lora, load_base_model

pytest.importorskip("bitsandbytes")


@pytest.fixture
def cfg(tmp_path: Path) -> Any:
    return compose_config(["+debug=tiny", f"model.cache_dir={tmp_path / 'cache'}"])


@pytest.mark.parametrize("kind, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_a_quantized_base_trains_the_same_lora_tensors(cfg: Any, kind: str, layer: str) -> None:
    plain = apply_lora(load_base_model(cfg.model).model, cfg.lora, seed=0)
    loaded = load_base_model(dataclasses.replace(cfg.model, quantization=kind))
    assert layer in {type(m).__name__ for m in loaded.model.modules()}
    model = apply_lora(loaded.model, cfg.lora, seed=0)
    want = {k: tuple(v.shape) for k, v in get_adapter_state(plain).items()}
    assert {k: tuple(v.shape) for k, v in get_adapter_state(model).items()} == want  # same wire format
    before = {k: v.clone() for k, v in get_adapter_state(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)  # LoRA itself is not quantized
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    text = "findings: the lungs are clear. impression: normal."
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = get_adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the adapter trained
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen  # the quantized base stays frozen


def test_quantization_is_validated_by_name(cfg: Any) -> None:
    for overrides, match in ((["model.quantization=fp4"], "model.quantization"),
                             (["model.quantization=nf4", "model.device=mps"], "MPS"),
                             (["model.quantization=nf4", "model.name_or_path=/m/x.gguf"], "gguf")):
        with pytest.raises(ConfigError, match=match):
            compose_config(["+debug=tiny", *overrides])


def test_missing_bitsandbytes_says_how_to_install_it(cfg: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = builtins.__import__

    def no_bnb(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ModelError, match=r"pip install 'fedmira\[qlora\]'"):
        load_base_model(dataclasses.replace(cfg.model, quantization="nf4"))


def test_a_missing_folder_is_refused_with_the_fix(cfg: Any, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="needs a local Hugging Face folder"):
        load_base_model(dataclasses.replace(cfg.model, name_or_path="org/not-here", quantization="nf4"))


def test_a_merged_export_of_a_qlora_run_uses_the_full_precision_base(cfg: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from fedmira.common.export import _merge

    model = apply_lora(load_base_model(cfg.model).model, cfg.lora, seed=0)
    for name, p in model.named_parameters():  # a non-zero update, so the merge changes weights
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(tmp_path / "adapter")
    run_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization="nf4"))
    _merge(run_cfg, tmp_path / "adapter", tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    expected = model.merge_and_unload().state_dict()
    key = next(k for k in merged if k.endswith("q_proj.weight"))
    assert merged[key].dtype == torch.float32 and torch.allclose(merged[key], expected[key], atol=1e-6)
