"""Communication: bytes per site per round with LoRA vs moving the full model.

Pure arithmetic from a decoder's shapes: a LoRA module on a ``d_in -> d_out`` linear layer adds
``r * (d_in + d_out)`` parameters (A is ``r x d_in``, B is ``d_out x r``). Per site and round
the server sends the global adapter in float32 and the site sends its adapter back at the
transport dtype (``strategy.transport_dtype``: float32, or bfloat16 which halves the upload).
The baseline is the full model's size (its weights in float32: what a site would download once
to get the model, and what federated *full* fine-tuning would move each way every round).
Sites that also evaluate in a round receive the adapter a second time (not counted here;
``metrics.jsonl``'s ``comm`` block counts everything).

The embedded model's shapes come from its ``config.json`` (no weights are read for the
arithmetic); the 7B-class shapes are the published Llama-2-7B and Mistral-7B configs. One
measured check: the real SmolLM2 adapter, encoded by ``common.transport`` and serialised by
Flower into the protobuf that goes on the wire, against the arithmetic::

    python -m fedmira.simulations.bench.comm
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any

from fedmira.simulations.bench.common import BenchRow

MB = 1_000_000  # decimal, like network traffic (common.transport.BYTES_PER_MB)
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
QV = ("q_proj", "v_proj")
ALL_LINEAR = ATTENTION + MLP


@dataclass(frozen=True)
class DecoderShape:
    """The shapes of a Llama-style decoder that fix its parameter count."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_hf_config(cls, name: str, config: Any) -> DecoderShape:
        """From a transformers ``LlamaConfig``-like object (``head_dim`` defaults to hidden/heads)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(name, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.intermediate_size, config.vocab_size,
                   bool(config.tie_word_embeddings))

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """``(d_in, d_out)`` of each linear layer of one block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden),
        }

    def num_params(self) -> int:
        """All weights: embeddings (+ untied LM head), blocks (linears + 2 RMSNorms), final norm."""
        block = sum(i * o for i, o in self.linear_dims().values()) + 2 * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + head + self.layers * block + self.hidden

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        """Trainable LoRA parameters for rank ``rank`` on ``targets`` in every block."""
        dims = self.linear_dims()
        unknown = [t for t in targets if t not in dims]
        if unknown:
            raise ValueError(f"unknown target modules {unknown}; known: {', '.join(dims)}")
        return self.layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)

    def lora_tensors(self, targets: tuple[str, ...]) -> int:
        """Tensors in the adapter state: an A and a B per target per block."""
        return 2 * len(targets) * self.layers


# Published configs (config.json of meta-llama/Llama-2-7b-hf and mistralai/Mistral-7B-v0.1).
LLAMA2_7B = DecoderShape("llama-2-7b", hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128,
                         intermediate=11008, vocab=32000, tied_embeddings=False)
MISTRAL_7B = DecoderShape("mistral-7b", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
                          intermediate=14336, vocab=32000, tied_embeddings=False)
# SmolLM2-135M-Instruct, used when the embedded model's config cannot be read.
SMOLLM2_135M = DecoderShape("smollm2-135m", hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64,
                            intermediate=1536, vocab=49152, tied_embeddings=True)


def round_bytes(params: int, transport: str) -> tuple[int, int]:
    """(down, up) bytes per site per round: float32 down, ``transport`` up."""
    return params * ITEMSIZE["float32"], params * ITEMSIZE[transport]


def comm_row(shape: DecoderShape, rank: int, targets: tuple[str, ...], transport: str) -> BenchRow:
    """LoRA bytes per site per round (down + up) vs the full model's float32 size."""
    lora = shape.lora_params(rank, targets)
    down, up = round_bytes(lora, transport)
    model = shape.num_params() * ITEMSIZE["float32"]
    label = "q,v" if targets == QV else "all-linear" if targets == ALL_LINEAR else ",".join(targets)
    return BenchRow(
        name=f"{shape.name} LoRA r={rank} {label}, {transport} up",
        value=(down + up) / MB, unit="MB", baseline=model / MB,
        note=(f"per site per round: down fp32 {down / MB:.3f} + up {transport} {up / MB:.3f} MB; "
              f"{lora:,} LoRA params ({shape.lora_tensors(targets)} tensors) of {shape.num_params():,}; "
              f"baseline: the model's fp32 weights (full fine-tuning would move 2x that per round)"),
    )


def embedded_shape() -> tuple[DecoderShape, str]:
    """SmolLM2's shapes from the embedded model's config.json, or the known ones if absent."""
    from transformers import AutoConfig

    from fedmira.common.config import ModelConfig
    from fedmira.common.errors import ModelError
    from fedmira.common.model import ensure_embedded_model

    try:
        folder = ensure_embedded_model(ModelConfig())
        shape = DecoderShape.from_hf_config(SMOLLM2_135M.name, AutoConfig.from_pretrained(folder))
        return shape, "config.json"
    except (ModelError, OSError) as exc:  # not installed: the published shapes, and the row says so
        return SMOLLM2_135M, f"built-in shapes ({type(exc).__name__})"


def measured_rows(shape: DecoderShape) -> list[BenchRow]:
    """Serialise the real embedded adapter as the ClientApp does; compare with the arithmetic."""
    from flwr.app import Array, ArrayRecord
    from flwr.common.serde import array_record_to_proto

    from fedmira.common.adapters import get_adapter_state
    from fedmira.common.compose import compose_config
    from fedmira.common.model import apply_lora, load_base_model
    from fedmira.common.transport import encode_state

    cfg = compose_config([])
    loaded = load_base_model(cfg.model)
    state = get_adapter_state(apply_lora(loaded.model, cfg.lora, seed=cfg.train.seed))
    rows = []
    rank, targets = cfg.lora.r, tuple(cfg.lora.target_modules)
    if len(state) != shape.lora_tensors(targets):
        raise ValueError(f"the real adapter has {len(state)} tensors, "
                         f"the arithmetic {shape.lora_tensors(targets)}")
    for transport in ("float32", "bfloat16"):
        payload = encode_state(state, transport)
        _, up = round_bytes(shape.lora_params(rank, targets), transport)
        values = sum(a.nbytes for a in payload.values())
        if values != up:
            raise ValueError(f"{transport}: the adapter's values take {values} bytes, "
                             f"the arithmetic says {up}")
        wire = array_record_to_proto(ArrayRecord({k: Array(v) for k, v in payload.items()})).ByteSize()
        rows.append(BenchRow(
            name=f"{shape.name} r={rank} adapter on the wire, {transport} (measured)",
            value=wire / MB, unit="MB", baseline=up / MB, target="<= 1.05",
            note=(f"Flower protobuf of the real adapter vs the arithmetic; the values match it "
                  f"exactly ({values:,} B); the rest is .npy headers and keys, "
                  f"{(wire - up) / len(state):.0f} B per tensor"),
        ))
    return rows


def run(quick: bool) -> list[BenchRow]:
    """Arithmetic rows for the embedded and 7B-class configs, plus the measured check.

    ``quick`` changes nothing: the arithmetic is instant and the check loads the model once.
    """
    smol, source = embedded_shape()
    configs = [
        (smol, 8, QV), (smol, 16, ALL_LINEAR),
        (LLAMA2_7B, 8, QV), (LLAMA2_7B, 16, QV), (LLAMA2_7B, 16, ALL_LINEAR),
        (MISTRAL_7B, 8, QV), (MISTRAL_7B, 16, ALL_LINEAR),
    ]
    rows = [comm_row(s, r, t, tr) for s, r, t in configs for tr in ("float32", "bfloat16")]
    rows[0] = replace(rows[0], note=f"{rows[0].note}; shapes from {source}")
    return rows + measured_rows(smol)


def main(argv: list[str] | None = None) -> None:
    """Print the rows (the runner, ``python -m fedmira.simulations.bench.run``, also writes them)."""
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    from fedmira.simulations.bench.run import format_table

    print(format_table({"comm": run(quick=False)}))


if __name__ == "__main__":
    main()
