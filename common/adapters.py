"""LoRA adapter state: the only tensors that ever leave a hospital.

The state is PEFT's own adapter state dict (``get_peft_model_state_dict``), keyed like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Loading checks the key set
and every shape strictly: a silent partial load would train or evaluate the wrong model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from fedmira.common.errors import ModelError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _unwrap(model: Any) -> Any:
    # Opacus' GradSampleModule wraps the PEFT model as `_module`.
    return getattr(model, "_module", model)


def get_adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the adapter tensors, in a stable (sorted) key order."""
    state = get_peft_model_state_dict(_unwrap(model))
    return {k: state[k].detach().to("cpu", copy=True).contiguous() for k in sorted(state)}


def check_adapter_state(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`ModelError` unless ``got`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"Adapter keys do not match the model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}). Check that lora.r, "
            "lora.target_modules and the base model match those the adapter was trained with."
        )
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(got[k].shape)]
    if bad:
        k = bad[0]
        raise ModelError(
            f"Adapter tensor {k} has shape {tuple(got[k].shape)}, the model expects "
            f"{tuple(expected[k].shape)} ({len(bad)} tensors differ). Check lora.r and the base model."
        )
    nonfinite = [k for k in got if not torch.isfinite(got[k]).all()]
    if nonfinite:
        raise ModelError(f"Adapter tensor {nonfinite[0]} holds NaN or Inf values; refusing to load it.")


def set_adapter_state(model: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter tensors into ``model`` after a strict key, shape and finiteness check."""
    inner = _unwrap(model)
    expected = get_peft_model_state_dict(inner)
    check_adapter_state(expected, state)
    ref = next(iter(expected.values()))
    converted = {k: v.to(device=ref.device, dtype=expected[k].dtype) for k, v in state.items()}
    result = set_peft_model_state_dict(inner, converted)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"PEFT did not accept adapter keys {unexpected[:3]}.")


def adapter_num_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Payload size of an adapter state in bytes (what crosses the wire)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def save_adapter(model: Any, folder: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save the adapter in PEFT's format (loadable with ``PeftModel.from_pretrained``)."""
    folder = Path(folder)
    _unwrap(model).save_pretrained(str(folder))
    if metadata:
        (folder / "fedmira.json").write_text(json.dumps(dict(metadata), indent=2, sort_keys=True))
    return folder


def save_adapter_state(state: Mapping[str, torch.Tensor], peft_config: Any, folder: str | Path) -> Path:
    """Save a bare adapter state (e.g. an aggregate) in PEFT's folder format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # PEFT saves keys without the adapter name ("default"); get_peft_model_state_dict already
    # strips it, so the state can be written as is.
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS))
    peft_config.save_pretrained(str(folder))
    return folder


def load_adapter_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """Read the adapter tensors of a PEFT adapter folder (no model needed)."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ModelError(f"No adapter at {folder}: {ADAPTER_WEIGHTS} is missing.")
    return dict(sorted(load_file(str(path)).items()))


def load_adapter(model: Any, folder: str | Path) -> None:
    """Load a saved PEFT adapter folder into ``model`` with the strict checks."""
    set_adapter_state(model, load_adapter_state(folder))
