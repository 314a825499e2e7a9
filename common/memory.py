"""How much GPU memory LoRA training at a site needs, before any training starts.

:func:`estimate_training_memory` predicts the peak of ``torch.cuda.max_memory_allocated()`` over
one training step (forward, backward, AdamW step) of a Llama-family base model from its Hugging
Face config alone, and adds an allowance for what the CUDA driver holds outside PyTorch's
allocator. The terms, in bytes (:class:`MemoryEstimate`):

- **base weights**, by ``model.quantization``: ``none`` at the model dtype; ``nf4`` as
  bitsandbytes stores it (4-bit codes, one uint8 absmax per 64 weights, one fp32 absmax per 256
  of those: double quantization) for the decoder's Linear layers, while embeddings, norms and
  ``lm_head`` (transformers never quantizes the head) stay unquantized, in fp32 with fedmira's
  loader; ``int8``: one byte per weight and one fp32 scale per output row.
- **LoRA** parameters (fp32: PEFT keeps adapters in fp32 over a 16-bit base), their fp32
  gradients and AdamW's two fp32 moments; DP-SGD's **per-sample gradients**; cuBLAS workspaces.
- **activations saved for backward**, from an op-by-op account of what a transformers Llama
  decoder layer (SDPA attention) with PEFT LoRA saves (see ``_Flow``), derived from and checked
  against :func:`measure_saved_activations`.
- three **transients**, of which the largest counts, since they come at different moments: the
  end of the forward pass (KV cache, the last MLP), the loss at the start of the backward pass
  (fp32 logits, log-softmax and gradients over the target rows only: fedmira's
  ``engine.token_loss`` and ``privacy.sample_losses`` project to the vocabulary there), and the
  first layer's backward (its MLP's gradients; with checkpointing, the recomputed layer too).

The transients were calibrated on the CPU against the live tensor bytes of whole training steps
(tests/unit/test_memory_estimate.py). Pure functions with explicit arguments; nothing here needs
Flower or a GPU, except :func:`memory_check`, which measures a real step on CUDA for
``simulations/scripts/cuda_check.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from fedmira.common.config import ExperimentConfig, ModelConfig

GIB = 2**30
MIB = 2**20

#: What the CUDA driver holds for this process outside PyTorch's caching allocator, so outside
#: ``max_memory_allocated`` but inside what ``nvidia-smi`` and ``mem_get_info`` see: the CUDA
#: context with the kernel images of torch, cuBLAS/cuDNN and bitsandbytes (about 0.5 GiB on
#: recent GPUs and CUDA 12 with lazy module loading, more without), plus cuBLAS workspaces.
CUDA_CONTEXT_BYTES = 768 * MIB
#: PyTorch's caching allocator reserves more than it hands out (blocks rounded up, segments
#: split and cached between steps): budget this share of the peak on top of it.
ALLOCATOR_SLACK = 0.05
#: cuBLAS and cuBLASLt workspaces, 32 MiB each on Hopper (PyTorch follows cuBLAS' advice; 4 MiB
#: or less before): allocated from PyTorch's caching allocator per stream, so they count in
#: ``max_memory_allocated``.
CUBLAS_WORKSPACE_BYTES = 64 * MIB

#: The module names LoRA can target in a Llama-family decoder layer.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTIZATIONS = ("none", "nf4", "int8")

# bitsandbytes' NF4 storage (BitsAndBytesConfig as common/model.py bnb_config sets it: nf4,
# blocksize 64, double quantization): per Linear weight of n values, (n + 1) // 2 bytes of 4-bit
# codes, one uint8 absmax per 64-value block, one fp32 absmax per 256 of those blocks (the
# nested state), and a fixed part (the 256-entry fp32 code of the nested state, the 16-entry NF4
# code, the fp32 offset).
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
NF4_FIXED_BYTES = 256 * 4 + 16 * 4 + 4
#: The dtype bitsandbytes' 4-bit matmul computes in (bnb_4bit_compute_dtype in common/model.py):
#: the backward pass dequantizes each weight to it, one layer at a time.
NF4_COMPUTE_BYTES = 2

#: Which tensors fedmira's loader keeps unquantized with model.quantization=nf4|int8, and in what
#: dtype: it loads with dtype=float32 and peft's prepare_model_for_kbit_training casts every
#: non-quantized parameter (embeddings, norms, lm_head) to fp32, so the hidden states stay fp32
#: too (bitsandbytes' Linear4bit/8bitLt return their output in their input's dtype).
FEDMIRA_QUANTIZED_COMPUTE = torch.float32

#: Llama-family ``model_type`` values whose layers this module's account follows exactly.
LLAMA_FAMILY = ("llama", "mistral")


# ------------------------------------------------------------------------------ model shape
@dataclass(frozen=True)
class ModelShape:
    """The fields of a Llama-family Hugging Face config that decide the memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"

    @classmethod
    def from_config(cls, hf_config: Any) -> ModelShape:
        """Read a transformers ``PretrainedConfig`` (Llama-family field names)."""
        hidden = int(hf_config.hidden_size)
        heads = int(hf_config.num_attention_heads)
        kv = getattr(hf_config, "num_key_value_heads", None)
        head_dim = getattr(hf_config, "head_dim", None)
        return cls(
            hidden=hidden, intermediate=int(hf_config.intermediate_size),
            layers=int(hf_config.num_hidden_layers), heads=heads,
            kv_heads=int(kv) if kv else heads,
            head_dim=int(head_dim) if head_dim else hidden // heads,
            vocab=int(hf_config.vocab_size),
            tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            model_type=str(getattr(hf_config, "model_type", "llama")),
        )

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each Linear layer of one decoder layer."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def bias(self, name: str) -> bool:
        """Whether the Linear ``name`` has a bias."""
        return self.mlp_bias if name in ("gate_proj", "up_proj", "down_proj") else self.attention_bias


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a Llama-family causal LM by kind (tied embeddings counted once)."""

    embedding: int
    linear: int  # weights of the decoder layers' Linear layers (what bitsandbytes quantizes)
    linear_bias: int
    norms: int
    lm_head: int  # 0 when tied to the embedding

    @property
    def total(self) -> int:
        """All parameters, as ``sum(p.numel() for p in model.parameters())`` counts them."""
        return self.embedding + self.linear + self.linear_bias + self.norms + self.lm_head

    @property
    def unquantized(self) -> int:
        """Parameters a quantized base keeps in its compute dtype (embeddings, norms, biases, head)."""
        return self.total - self.linear


def count_parameters(hf_config: Any) -> ParameterCounts:
    """Count the parameters of the model ``AutoModelForCausalLM.from_config(hf_config)`` builds."""
    s = ModelShape.from_config(hf_config)
    dims = s.linear_dims()
    linear = s.layers * sum(a * b for a, b in dims.values())
    bias = s.layers * sum(b for name, (_, b) in dims.items() if s.bias(name))
    return ParameterCounts(
        embedding=s.vocab * s.hidden, linear=linear, linear_bias=bias,
        norms=(2 * s.layers + 1) * s.hidden, lm_head=0 if s.tied else s.vocab * s.hidden,
    )


def _check_targets(targets: Sequence[str]) -> list[str]:
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"LoRA target modules {list(targets)}: the estimate knows only "
                         f"{', '.join(LORA_TARGETS)}")
    return [t for t in LORA_TARGETS if t in targets]


def count_lora_parameters(hf_config: Any, rank: int, targets: Sequence[str]) -> int:
    """LoRA parameters (A: r x in, B: out x r per targeted Linear per layer), as PEFT counts them."""
    s = ModelShape.from_config(hf_config)
    dims = s.linear_dims()
    return s.layers * sum(rank * (dims[t][0] + dims[t][1]) for t in _check_targets(targets))


def weight_bytes(hf_config: Any, quantization: str, compute_dtype: torch.dtype | str) -> int:
    """Bytes of the frozen base weights on the device, as loaded with ``quantization``."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    counts = count_parameters(hf_config)
    size = dtype_bytes(compute_dtype)
    if quantization == "none":
        return counts.total * size
    s = ModelShape.from_config(hf_config)
    per_layer = 0
    for d_in, d_out in s.linear_dims().values():
        n = d_in * d_out
        if quantization == "nf4":
            blocks = math.ceil(n / NF4_BLOCKSIZE)
            nested = 4 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE)
            per_layer += (n + 1) // 2 + blocks + nested + NF4_FIXED_BYTES
        else:  # int8: LLM.int8() row-wise codes and one fp32 scale (SCB) per output row
            per_layer += n + 4 * d_out
    return s.layers * per_layer + counts.unquantized * size


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype, or of its name (``"bfloat16"``)."""
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"{dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
        dtype = resolved
    return int(torch.empty((), dtype=dtype).element_size())


# ------------------------------------------------------------------------------ the estimate
@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted GPU memory of one LoRA training step, by term, in bytes.

    The step's peak holds the static terms (weights, LoRA, gradients, moments, per-sample
    gradients, cuBLAS workspaces) and the saved activations at all times, plus the largest of
    three transients, which come at different moments: the end of the forward pass
    (``forward_working``), the start of the backward pass (``loss_buffers``) and the first
    decoder layer's backward (``backward_working``). ``peak_allocated`` is that sum (what
    ``torch.cuda.max_memory_allocated`` measures); ``total`` adds the CUDA context and the
    allocator's slack (what the GPU must have free).
    """

    base_weights: int
    lora_weights: int
    lora_grads: int
    optimizer_state: int
    activations: int
    forward_working: int
    loss_buffers: int
    backward_working: int
    dp_per_sample: int
    workspace: int
    cuda_overhead: int
    settings: Mapping[str, Any] = field(default_factory=dict)

    STATIC = ("base_weights", "lora_weights", "lora_grads", "optimizer_state", "workspace")
    TRANSIENTS = ("forward_working", "loss_buffers", "backward_working")

    @property
    def transient(self) -> int:
        """The largest of the transients (they peak at different moments of the step)."""
        return max(int(getattr(self, name)) for name in self.TRANSIENTS)

    @property
    def peak_allocated(self) -> int:
        """Predicted ``torch.cuda.max_memory_allocated()`` of a training step.

        DP-SGD's per-sample gradients pile up during the backward pass while the activations
        are freed, and are largest at its end, when the activations are gone: the peak holds the
        larger of the two.
        """
        static = sum(int(getattr(self, name)) for name in self.STATIC)
        return static + max(self.activations + self.transient, self.dp_per_sample)

    @property
    def total(self) -> int:
        """Predicted GPU memory the process needs, CUDA context and allocator slack included."""
        return self.peak_allocated + self.cuda_overhead

    def headroom(self, free_bytes: int, *, resident_bytes: int = 0, context_created: bool = False) -> int:
        """Bytes left (negative: missing) if training starts with ``free_bytes`` free on the GPU.

        ``resident_bytes``: what this process already holds there and the estimate counts (the
        loaded base model: ``torch.cuda.memory_allocated()``); ``context_created``: the free
        memory was read by this process (``torch.cuda.mem_get_info``), so its CUDA context is
        already out of it.
        """
        need = self.total - int(resident_bytes) - (CUDA_CONTEXT_BYTES if context_created else 0)
        return int(free_bytes) - need

    def fits(self, free_bytes: int, *, resident_bytes: int = 0, context_created: bool = False) -> bool:
        """Whether training fits in ``free_bytes`` (see :meth:`headroom`)."""
        return self.headroom(free_bytes, resident_bytes=resident_bytes, context_created=context_created) >= 0

    def lines(self) -> list[tuple[str, int]]:
        """(label, bytes) per term, then the total; the transient that sets the peak is marked."""
        s = self.settings
        q = s.get("quantization", "?")
        dtype = s.get("compute_dtype", "?")
        params = int(s.get("params", 0))
        count = (f"{params / 1e9:.2f} B" if params >= 1e9 else
                 f"{params / 1e6:.0f} M" if params >= 1e6 else f"{params:,}")
        kind = f"{q}, the rest {dtype}" if q != "none" else dtype
        weights = f"base weights ({count} params, {kind})"
        ckpt = "gradient checkpointing" if s.get("gradient_checkpointing") else "no checkpointing"
        peak = self.transient

        def mark(name: str) -> str:
            return " <- peak" if int(getattr(self, name)) == peak else ""

        dp_label = "DP-SGD per-sample gradients" + (" (end of backward)" if s.get("dp") else " (privacy off)")

        return [
            (weights, self.base_weights),
            (f"LoRA weights ({s.get('lora_params', 0):,} fp32 params)", self.lora_weights),
            ("LoRA gradients (fp32)", self.lora_grads),
            ("AdamW moments (2 x fp32)", self.optimizer_state),
            (dp_label, self.dp_per_sample),
            ("cuBLAS workspaces", self.workspace),
            (f"activations saved for backward ({ckpt})", self.activations),
            ("transient: end of forward (last MLP, any KV cache)" + mark("forward_working"),
             self.forward_working),
            (f"transient: loss (fp32 logits, {s.get('loss_rows', '?')} rows)" + mark("loss_buffers"),
             self.loss_buffers),
            ("transient: first layer's backward"
             + (" (recomputed)" if s.get("gradient_checkpointing") else "") + mark("backward_working"),
             self.backward_working),
            ("CUDA context and allocator allowance", self.cuda_overhead),
            ("total (peak allocated + allowance)", self.total),
        ]

    def describe(self) -> str:
        """Short human summary: the settings, then one line per term in GiB and the total."""
        s = self.settings
        head = (f"batch {s.get('batch_size')} x {s.get('seq_len')} tokens, LoRA r={s.get('lora_rank')} on "
                f"{','.join(s.get('lora_targets', ()))}" + ("; bf16 autocast" if s.get("autocast") else ""))
        lines = [head] + [f"  {label:<56} {value / GIB:8.2f} GiB" for label, value in self.lines()]
        if s.get("dp"):
            lines.append("  (peak: the larger of activations + transient and the per-sample gradients)")
        if s.get("approximate"):
            lines.append(f"  (model_type {s.get('model_type')!r} is not Llama-family: approximate)")
        return "\n".join(lines)


def estimate_training_memory(
    hf_config: Any,
    *,
    quantization: str,
    compute_dtype: torch.dtype | str,
    lora_rank: int,
    lora_targets: Sequence[str],
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    dp: bool,
    target_tokens: int | None = None,
    lora_dropout: float = 0.05,
    autocast: bool = False,
    padded: bool = True,
    use_cache: bool | None = None,
    dp_clipping: str = "flat",
    device_type: str = "cuda",
) -> MemoryEstimate:
    """Predict the GPU memory of one LoRA training step of the model ``hf_config`` describes.

    Parameters
    ----------
    hf_config
        A transformers ``PretrainedConfig`` of a Llama-family model.
    quantization
        ``none`` | ``nf4`` | ``int8`` (the frozen base, as ``model.quantization``).
    compute_dtype
        Dtype of the unquantized weights and of the hidden states (fedmira: the model dtype, or
        fp32 under a quantized base: :data:`FEDMIRA_QUANTIZED_COMPUTE`).
    lora_rank, lora_targets, lora_dropout
        The adapter (``lora.r``, ``lora.target_modules``, ``lora.dropout``).
    batch_size, seq_len
        Rows per micro-batch and their padded length.
    gradient_checkpointing
        Non-reentrant activation checkpointing of every decoder layer.
    dp, dp_clipping
        DP-SGD: Opacus' per-sample gradients, clipped over one flat buffer (``flat``, which
        copies them once) or tensor by tensor (``opacus``), as ``privacy.clipping``.
    target_tokens
        Target (loss) tokens in the micro-batch, the rows fedmira's loss projects to the
        vocabulary; None: every position (``batch_size * (seq_len - 1)``, as a full-logits loss).
    autocast
        bf16 autocast over fp32 weights (``model.autocast``).
    padded
        The batch has padding, so attention gets an explicit mask (the usual case in training).
    use_cache
        Whether the forward builds a KV cache (transformers does in training unless told not to;
        never with checkpointing); None: ``hf_config.use_cache``.
    device_type
        ``cuda`` (the target) or ``cpu`` (dropout masks fp32, no cuBLAS workspaces).
    """
    shape = ModelShape.from_config(hf_config)
    targets = _check_targets(lora_targets)
    cuda = device_type == "cuda"
    act = dtype_bytes(compute_dtype)
    n = batch_size * seq_len
    rows = batch_size * max(seq_len - 1, 1) if target_tokens is None else min(target_tokens, n)
    lora_params = count_lora_parameters(hf_config, lora_rank, targets)
    flow = _Flow(shape=shape, act=act, autocast=autocast, rank=lora_rank, targets=frozenset(targets),
                 dropout=lora_dropout > 0, mask_bytes=1 if cuda else 4, padded=padded,
                 int8=quantization == "int8", batch=batch_size, seq=seq_len)
    first, grad = flow.layer(grad_in=False)
    regular, _ = flow.layer(grad_in=True)
    res, mm = flow.res, flow.mm
    final_norm = n * (4 * shape.hidden + 4) if grad else 0
    head_cast = 2 * shape.vocab * shape.hidden if autocast else 0  # bf16 copy of lm_head, for backward
    rope = 2 * seq_len * shape.head_dim * res  # cos and sin, shared by the layers
    largest = max(a * b for a, b in shape.linear_dims().values())
    # A quantized base dequantizes one weight at a time. 4-bit: bitsandbytes' backward dequantizes
    # to the dtype the weight was loaded in (fp32 in fedmira) and casts that to bf16; its forward
    # dequantizes straight to bf16 on CUDA (via fp32 on the CPU). int8: to the input's dtype in
    # backward, and on the CPU in forward too (CUDA's int8 forward multiplies the int8 codes).
    if quantization == "nf4":
        deq_fwd = (NF4_COMPUTE_BYTES + (0 if cuda else 4)) * largest
    else:
        deq_fwd = res * largest if quantization == "int8" and not cuda else 0
    # The backward of the first layer to run it (the last): its MLP's three I-wide gradients,
    # with the gradient flowing in, once the final norm's saved tensors are gone; under a
    # quantized base the down projection's backward may peak higher (the dequantized weight,
    # the gradient in bf16 and in fp32).
    h, i = shape.hidden, shape.intermediate
    mlp_grads = n * (3 * i * mm + h * res)
    if quantization == "nf4":
        mlp_grads = max(mlp_grads, n * 6 * h + (act + NF4_COMPUTE_BYTES) * largest,
                        n * (6 * h + 2 * i) + NF4_COMPUTE_BYTES * largest, n * (4 * h + 6 * i))
    elif quantization == "int8":
        mlp_grads = max(mlp_grads, n * res * (i + h) + res * largest)
    # The end of the forward pass: the last MLP's product and output with the residual stream,
    # and the KV cache transformers builds unless told not to, in so far as SDPA does not keep
    # the same tensors (k and v repeated to nh heads for a masked batch, or bf16 casts under
    # autocast, are copies of the cached ones).
    cache = (not gradient_checkpointing) and bool(
        getattr(hf_config, "use_cache", True) if use_cache is None else use_cache)
    kv_copied = autocast or (padded and shape.kv_heads != shape.heads)
    kv_cache = shape.layers * 2 * n * shape.kv_heads * shape.head_dim * res if cache and kv_copied else 0
    if gradient_checkpointing:
        # Kept: each layer's input, the final norm's, and what bitsandbytes' int8 matmul keeps on
        # its autograd ctx (out of checkpointing's reach). One layer is recomputed at a time; its
        # recomputed graph (with the int8 ctx copies) is dropped once it has run.
        kept = shape.layers * (n * shape.hidden * res + flow.ctx_bytes(n))
        activations = kept + final_norm + head_cast
        recompute = dataclasses.replace(flow, int8=False).layer(grad_in=True)[0]
        forward_working = n * (2 * shape.intermediate * mm + 2 * shape.hidden * 4) + deq_fwd
        backward_working = recompute + mlp_grads - final_norm
    else:
        activations = first + (shape.layers - 1) * regular + final_norm + head_cast + rope
        forward_working = kv_cache + n * (shape.intermediate * mm + 2 * shape.hidden * 4) + deq_fwd
        backward_working = mlp_grads - final_norm
    # fp32 log-softmax output, the gradient arriving at it and the gradient it passes to the
    # logits, all [rows, vocab] at the start of the backward pass (the head runs only at the
    # target rows in fedmira's engine.token_loss and privacy.sample_losses).
    loss = 12 * rows * shape.vocab
    # Opacus' per-sample gradients (batch x LoRA params, fp32); `flat` clipping copies them into
    # one buffer (Opacus' own clips tensor by tensor), then the clipped sum and the noise.
    dp_bytes = ((2 if dp_clipping == "flat" else 1) * batch_size + 2) * lora_params * 4 if dp else 0
    weights = weight_bytes(hf_config, quantization, compute_dtype)
    settings = {
        "quantization": quantization, "compute_dtype": _dtype_name(compute_dtype), "lora_rank": lora_rank,
        "lora_targets": tuple(targets), "lora_params": lora_params, "batch_size": batch_size,
        "seq_len": seq_len, "gradient_checkpointing": gradient_checkpointing, "dp": dp,
        "loss_rows": rows, "autocast": autocast, "params": count_parameters(hf_config).total,
        "approximate": shape.model_type not in LLAMA_FAMILY, "model_type": shape.model_type,
        "device_type": device_type,
    }
    estimate = MemoryEstimate(
        base_weights=weights, lora_weights=4 * lora_params, lora_grads=4 * lora_params,
        optimizer_state=8 * lora_params, activations=activations, forward_working=max(forward_working, 0),
        loss_buffers=loss, backward_working=max(backward_working, 0), dp_per_sample=dp_bytes,
        workspace=CUBLAS_WORKSPACE_BYTES if cuda else 0, cuda_overhead=0, settings=settings,
    )
    overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * estimate.peak_allocated) if cuda else 0
    return dataclasses.replace(estimate, cuda_overhead=overhead)


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------ activations
# What one transformers Llama decoder layer (SDPA attention, PEFT LoRA, frozen base) saves for
# backward, op by op, as measured with measure_saved_activations (saved_tensors_hooks, deduplicated
# by storage, parameters excluded) on small random models and listed tensor by tensor. Per token,
# with H hidden, I intermediate, nh/nkv heads of head_dim d, LoRA rank r, and a = bytes of the
# hidden states (4 fp32, 2 bf16; fp32 under a quantized base in fedmira), m = bytes of a matmul
# output (a; 2 under bf16 autocast):
#
#   RMSNorm (x2)          4H + 4        its input upcast to fp32 (the fp32 input itself in fp32)
#                                       and the fp32 rsqrt; the weight product saves the weight only
#   frozen Linear         0             needs only its (parameter) weight for the input's gradient;
#                                       under autocast its bf16 weight copy: 2 x in x out per layer
#   LoRA on a Linear      in x (mask + 4) + 4r
#                                       PEFT upcasts the input to fp32, dropout keeps its mask
#                                       (bool on CUDA, fp32 on the CPU) and its fp32 output (lora_A's
#                                       input), lora_A's output is lora_B's input; no dropout: the
#                                       input itself (one storage for q,k,v or gate,up) or its copy
#   SDPA                  m d (2 nh + 2 nkv') + 4 nh + m S
#                                       q, k, v, the output and the fp32 logsumexp; with padding the
#                                       mask comes as a float [B, 1, S, S] per layer, and
#                                       transformers repeats k, v to nh heads (nkv' = nh); without
#                                       padding it uses enable_gqa (nkv' = nkv) and no mask
#   MLP                   3 I m         gate output (silu's input), silu's output and up output
#                                       (the product's two factors)
#
# Layer 0 differs: the frozen embedding gives its input no gradient, so its input norm saves
# nothing and dropout keeps no masks until a LoRA layer starts the gradient; _Flow follows that
# op by op. bitsandbytes' 4-bit matmul keeps only its (parameter) weight; its int8 matmul keeps its
# input on the autograd ctx, outside saved_tensors_hooks and outside checkpointing (counted here,
# and found by measure_saved_activations' graph walk). o_proj's input is a view of SDPA's output
# (which SDPA returns in [B, S, nh, d] memory), so it costs nothing more. Under bf16 autocast
# matmul outputs, SDPA's inputs and lora_A's input are bf16 copies (m = 2) while the residual
# stream and norms stay fp32, and each frozen Linear on the gradient's path keeps its bf16
# weight copy (2 x in x out per layer; lm_head's too). transformers' training forward also builds
# a KV cache (freed when the forward returns: a transient, not an activation). Gradient
# checkpointing (non-reentrant) keeps only each layer's input and the final norm's.
#
# Measured against the account, bytes (fp32, hidden 128, intermediate 352, 3 layers, 8/2 heads,
# batch 3 x 40, LoRA r=8 on q,v, dropout 0.05): 3,341,120 = 3,341,120; bf16 2,180,800 =
# 2,180,800; checkpointed 246,240 = 246,240; nf4 3,341,120 = 3,341,120 (fp32 hidden states);
# int8 4,155,200 = 4,155,200; autocast 3,139,008 = 3,139,008; all 7 targets r=16 5,906,240 =
# 5,906,240. The account assumes transformers' default SDPA attention; eager attention would also
# keep the [B, nh, S, S] attention probabilities per layer.
@dataclass(frozen=True)
class _Flow:
    """The per-layer account above for one shape and setting (bytes per micro-batch)."""

    shape: ModelShape
    act: int
    autocast: bool
    rank: int
    targets: frozenset[str]
    dropout: bool
    mask_bytes: int
    padded: bool
    int8: bool
    batch: int
    seq: int

    @property
    def res(self) -> int:
        """Bytes of the residual stream and the norm outputs (fp32 under autocast)."""
        return 4 if self.autocast else self.act

    @property
    def mm(self) -> int:
        """Bytes of matmul outputs, attention and MLP tensors (bf16 under autocast)."""
        return 2 if self.autocast else self.act

    def _inputs(self, n: int) -> dict[str, int]:
        s = self.shape
        return {"attn_in": n * s.hidden * self.res, "attn_out": n * s.heads * s.head_dim * self.mm,
                "mlp_in": n * s.hidden * self.res, "mlp_mid": n * s.intermediate * self.mm}

    def layer(self, grad_in: bool) -> tuple[int, bool]:
        """Bytes one decoder layer saves for backward, and whether its output needs a gradient."""
        s, n = self.shape, self.batch * self.seq
        dims = s.linear_dims()
        saved = 0
        shared: set[str] = set()  # inputs kept as they are (counted once below)

        def linear(name: str, x: str, x_bytes: int, gx: bool) -> bool:
            nonlocal saved
            d_in, d_out = dims[name]
            if self.autocast and gx:
                saved += 2 * d_in * d_out  # bf16 copy of the frozen weight, for the input's gradient
            if self.int8 and gx:
                shared.add(x)  # bitsandbytes' MatMul8bitLt keeps its input on the ctx
            if name not in self.targets:
                return gx
            lora_bytes = 2 if self.autocast else 4
            if self.dropout:
                saved += n * d_in * ((self.mask_bytes if gx else 0) + lora_bytes)
            elif self.autocast or x_bytes != 4:
                saved += n * d_in * lora_bytes  # the input cast for lora_A (one copy per module)
            else:
                shared.add(x)
            saved += n * self.rank * lora_bytes
            if self.autocast:  # autocast's cached bf16 LoRA weights (A's only for its input's gradient)
                saved += 2 * self.rank * ((d_in if gx else 0) + d_out)
            return True

        norm = n * (4 * s.hidden + 4)
        saved += norm if grad_in else 0
        grads = [linear(p, "attn_in", self.res, grad_in) for p in ("q_proj", "k_proj", "v_proj")]
        g_att = any(grads)
        if g_att:
            kv = s.heads if (self.padded or s.kv_heads == s.heads) else s.kv_heads
            saved += n * (s.head_dim * (2 * s.heads + 2 * kv) * self.mm + 4 * s.heads)
            saved += self.batch * self.seq * self.seq * self.mm if self.padded else 0
        g1 = linear("o_proj", "attn_out", self.mm, g_att) or grad_in
        saved += norm if g1 else 0
        gate = linear("gate_proj", "mlp_in", self.res, g1)
        up = linear("up_proj", "mlp_in", self.res, g1)
        saved += n * s.intermediate * self.mm * ((2 if gate else 0) + (1 if up else 0))
        down = linear("down_proj", "mlp_mid", self.mm, gate or up)
        sizes = self._inputs(n)
        if g_att:  # o_proj's input is a view of SDPA's output (kept in [B, S, nh, d] layout), counted above
            shared.discard("attn_out")
        return saved + sum(sizes[x] for x in shared), g1 or down

    def ctx_bytes(self, n: int) -> int:
        """Bytes bitsandbytes' int8 matmuls of one layer keep on their autograd ctx."""
        return sum(self._inputs(n).values()) if self.int8 else 0


def measure_saved_activations(model: Any, batch: Mapping[str, torch.Tensor],
                              forward: Callable[[Any, Mapping[str, torch.Tensor]], Any] | None = None) -> int:
    """Bytes of the tensors a training-mode forward keeps for backward (parameters excluded).

    Counts every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` once per storage
    (``untyped_storage().data_ptr()``), leaving out the storages of the model's parameters and
    buffers (frozen weights are not activations), plus tensors custom autograd Functions keep on
    their ctx instead (bitsandbytes' int8 matmul keeps its input there), found by walking the
    graph. ``forward(model, batch)`` defaults to ``model(input_ids=..., attention_mask=...)``.
    The model is put in training mode for the call and back afterwards.
    """
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (a wrapper or sparse tensor)
            return
        ptr = storage.data_ptr()
        if ptr and ptr not in frozen:
            seen.setdefault(ptr, storage.nbytes())

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = (forward(model, batch) if forward is not None else
                   model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
        for t in _ctx_tensors(_output_tensors(out)):
            keep(t)
    finally:
        model.train(was_training)
    return sum(seen.values())


def _output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _output_tensors(v)]
    logits = getattr(out, "logits", None)
    return [logits] if isinstance(logits, torch.Tensor) else []


def _ctx_tensors(outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors held as attributes of custom autograd Functions' ctx in the graph of ``outputs``."""
    found: list[torch.Tensor] = []
    todo = [t.grad_fn for t in outputs if t.grad_fn is not None]
    visited: set[int] = set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            items = value if isinstance(value, (tuple, list)) else (value,)
            found.extend(v for v in items if isinstance(v, torch.Tensor))
        todo.extend(fn for fn, _ in node.next_functions if fn is not None)
    return found


# ------------------------------------------------------------------------------ fedmira's config
def estimate_for_config(cfg: ExperimentConfig, hf_config: Any, *,
                        device_type: str = "cuda") -> MemoryEstimate:
    """Estimate one training step at a site with fedmira's settings, on a GPU by default.

    The settings map as the site's training code uses them: ``model.quantization`` (the rest of
    the model in fp32 then, as fedmira's loader keeps it), ``model.dtype`` (``auto``: bf16 on a
    GPU, fp32 on the CPU) and ``model.autocast``, ``lora.r`` / ``lora.target_modules`` /
    ``lora.dropout``, ``train.batch_size`` rows of ``data.max_length`` tokens per micro-batch
    (split over ``train.devices`` GPUs), at most ``data.max_target_tokens`` target tokens per
    row, ``train.gradient_checkpointing``, ``privacy.enabled`` and ``privacy.clipping``.
    """
    from fedmira.common.config import MODEL_TINY

    m, train = cfg.model, cfg.train
    cuda = device_type == "cuda"
    if m.quantization != "none":
        dtype, autocast = FEDMIRA_QUANTIZED_COMPUTE, False  # common/model.py: no autocast over bnb
    else:
        dtype = (torch.bfloat16 if cuda else torch.float32) if m.dtype == "auto" else getattr(torch, m.dtype)
        autocast = dtype == torch.float32 and (
            m.autocast == "bfloat16"
            or (m.autocast == "auto" and m.name_or_path != MODEL_TINY and (cuda or _cpu_fast_bf16())))
    devices = train.devices or 1  # 0 (every GPU) is counted as 1: the GPU count is not known here
    batch = max(1, math.ceil(train.batch_size / devices))
    seq = cfg.data.max_length
    return estimate_training_memory(
        hf_config, quantization=m.quantization, compute_dtype=dtype, lora_rank=cfg.lora.r,
        lora_targets=cfg.lora.target_modules, lora_dropout=cfg.lora.dropout, batch_size=batch,
        seq_len=seq, target_tokens=batch * min(cfg.data.max_target_tokens, seq - 1),
        gradient_checkpointing=train.gradient_checkpointing, dp=cfg.privacy.enabled,
        dp_clipping=cfg.privacy.clipping, autocast=autocast, use_cache=False,  # engine.token_loss
        device_type=device_type,
    )


def _cpu_fast_bf16() -> bool:
    from fedmira.common.model import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def hf_config_for(model: ModelConfig) -> tuple[Any | None, str]:
    """Read the Hugging Face config of ``model.name_or_path`` without loading weights, or say why not.

    Returns ``(config, where it came from)`` or ``(None, why it cannot be had cheaply)``:
    ``tiny-random`` is built in memory (milliseconds); the embedded SmolLM2 reads the
    ``config.json`` of its converted cache folder, or else the GGUF file's metadata (a few
    seconds, no weights dequantized); a local folder its ``config.json``; a ``.gguf`` file its
    metadata; a hub id only from the local Hugging Face cache (never downloaded).
    """
    from transformers import AutoConfig

    from fedmira.common import model as models
    from fedmira.common.config import MODEL_EMBEDDED, MODEL_TINY
    from fedmira.common.errors import ModelError

    name = model.name_or_path
    try:
        if name == MODEL_TINY:
            tiny = models.build_tiny_model(models.build_tiny_tokenizer(), seed=model.seed)
            return tiny.config, "the built-in tiny test model"
        if name == MODEL_EMBEDDED:
            folder = models.cache_root(model) / models.EMBEDDED_CACHE_NAME
            if (folder / "config.json").is_file():
                return AutoConfig.from_pretrained(folder), f"{folder}/config.json"
            gguf = models.embedded_gguf_path()
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name), f"{gguf} (GGUF metadata)"
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                return None, f"GGUF file {path} not found"
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name), f"{path} (GGUF metadata)"
        if path.is_dir():
            if model.gguf_file:
                return (AutoConfig.from_pretrained(path, gguf_file=model.gguf_file),
                        f"{path / model.gguf_file} (GGUF metadata)")
            if not (path / "config.json").is_file():
                return None, f"{path} has no config.json"
            return AutoConfig.from_pretrained(path), f"{path}/config.json"
        if "/" in name and not name.startswith((".", "/", "~")):
            config = AutoConfig.from_pretrained(name, local_files_only=True)
            return config, f"{name} (local Hugging Face cache)"
        return None, f"model `{name}` is neither a built-in model, a local folder or .gguf file, nor a hub id"
    except (OSError, ValueError, KeyError, ImportError, ModelError) as exc:
        return None, f"its config could not be read offline ({type(exc).__name__}: {str(exc)[:160]})"


def config_report(cfg: ExperimentConfig) -> str:
    """Return ``fedmira config``'s block: the estimate for training at a site, or why it is skipped."""
    hf_config, source = hf_config_for(cfg.model)
    if hf_config is None:
        return f"  skipped: {source}"
    try:
        estimate = estimate_for_config(cfg, hf_config)
    except (ValueError, AttributeError, TypeError) as exc:
        return f"  skipped: {exc}"
    return (f"  on one GPU (model config: {source})\n"
            + "\n".join("  " + line for line in estimate.describe().splitlines()))


# ------------------------------------------------------------------------------ GPU check
def memory_check(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    *,
    quantization: str | None = None,
    compute_dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = False,
    autocast: torch.dtype | None = None,
    lr: float = 1e-4,
) -> tuple[MemoryEstimate, int]:
    """Measure one training step's peak GPU memory beside the estimate, for ``cuda_check.py``.

    ``model`` is a PEFT LoRA model on CUDA (fedmira's ``apply_lora``) and ``batch`` a collated
    batch (``input_ids``, ``attention_mask``, ``labels``) on the same device. A first step
    creates AdamW's moments (a site's steady state); then the peak statistics are reset and a
    second step (fedmira's ``engine.token_loss``, backward, AdamW step) is measured. The
    quantization and compute dtype are read from the model unless given. Returns ``(estimate,
    torch.cuda.max_memory_allocated() of the step)``; the ratio is what the estimate is judged by.
    """
    from fedmira.common.engine import gradient_checkpointing as checkpointing
    from fedmira.common.engine import token_loss
    from fedmira.common.model import autocast_context
    from fedmira.common.prompts import IGNORE_INDEX

    device = batch["input_ids"].device
    _require_cuda(device)
    kinds = {type(mod).__name__ for mod in model.modules()}
    if quantization is None:
        quantization = "nf4" if "Linear4bit" in kinds else "int8" if "Linear8bitLt" in kinds else "none"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if compute_dtype is None:
        compute_dtype = base.get_input_embeddings().weight.dtype
    peft_cfg = next(iter(model.peft_config.values()))
    targets = sorted(peft_cfg.target_modules) if not isinstance(peft_cfg.target_modules, str) else []
    rows, width = batch["input_ids"].shape
    estimate = estimate_training_memory(
        base.config, quantization=quantization, compute_dtype=compute_dtype, lora_rank=int(peft_cfg.r),
        lora_targets=targets, lora_dropout=float(peft_cfg.lora_dropout), batch_size=int(rows),
        seq_len=int(width), target_tokens=int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        gradient_checkpointing=gradient_checkpointing, dp=False, autocast=autocast is not None,
        padded=bool((batch["attention_mask"] == 0).any()), use_cache=False, device_type="cuda",
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    measured = 0
    with checkpointing(model, gradient_checkpointing):
        for step in range(2):
            if step == 1:
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            with autocast_context(device, autocast):
                loss, count = token_loss(model, dict(batch))
            (loss / max(count, 1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        measured = int(torch.cuda.max_memory_allocated(device))
    model.eval()
    return estimate, measured


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError("memory_check measures CUDA memory: put the model and the batch on a GPU")
