"""Shared fixtures for fedmira's tests: fixed seeds, the tiny random model, a small corpus.

Everything here is built in-process (nothing is downloaded): the ``tiny-random`` Llama and its
tokenizer come from a seed, the reports from the synthetic corpus generator.
"""

from __future__ import annotations

import copy
import os
import random
from typing import Any, Callable

import numpy as np
import pytest
import torch

from fedmira.common.adapters import get_adapter_state, set_adapter_state
from fedmira.common.config import DataConfig, LoraConfig, ModelConfig
from fedmira.common.model import LoadedModel, apply_lora, load_base_model
from fedmira.common.reports import Report
from fedmira.common.synthetic import make_synthetic_corpus

SEED = 1234
#: Where model tests run: ``FEDMIRA_TEST_DEVICE=cuda pytest tests/unit`` checks them on a GPU
#: (in float32, so expected numbers hold; bf16 is checked by simulations/scripts/cuda_check.py).
TEST_DEVICE = os.environ.get("FEDMIRA_TEST_DEVICE", "cpu")


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread (the tiny model gains nothing from more, and CI shares 2 cores); silence a
    third-party deprecation (PEFT calling a renamed transformers method)."""
    torch.set_num_threads(1)
    config.addinivalue_line(
        "filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
    )


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    """Seed Python, NumPy and torch before every test so each test is reproducible alone."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    """The tiny random Llama + tokenizer (CPU unless FEDMIRA_TEST_DEVICE). Read-only: copy the model
    before wrapping it."""
    return load_base_model(ModelConfig(name_or_path="tiny-random", device=TEST_DEVICE, dtype="float32"))


@pytest.fixture(scope="session")
def _corpus() -> tuple[Report, ...]:
    """The synthetic corpus, generated once per session."""
    return tuple(make_synthetic_corpus(num_sites=3, num_reports=40, seed=1))


@pytest.fixture
def reports(_corpus: tuple[Report, ...]) -> list[Report]:
    """40 synthetic reports from 3 sites (a fresh list per test; reports are frozen)."""
    return list(_corpus)


@pytest.fixture
def data_cfg() -> DataConfig:
    """Prompt settings that fit the tiny tokenizer, which is nearly character-level."""
    return DataConfig(max_length=224, max_target_tokens=48)


@pytest.fixture
def new_lora(tiny: LoadedModel) -> Callable[..., Any]:
    """Factory: a fresh LoRA model on a private copy of the tiny base model (in eval mode)."""

    def make(lora: LoraConfig | None = None, seed: int = 0) -> Any:
        model = apply_lora(copy.deepcopy(tiny.model), lora or LoraConfig(), seed=seed)
        model.eval()
        return model

    return make


@pytest.fixture
def perturb() -> Callable[..., dict[str, torch.Tensor]]:
    """Function: give a model's adapter random values (B is zero at init) and return them."""

    def apply(model: Any, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        state = {k: torch.randn(v.shape, generator=gen) * scale for k, v in get_adapter_state(model).items()}
        set_adapter_state(model, state)
        return state

    return apply
