"""Local training, held-out loss and batched generation: plain PyTorch, no Flower.

These are the functions a site runs in a round, a researcher runs centralized, and the CLI runs
for ``fedmira train`` / ``fedmira generate``. They take explicit arguments (model, tokenizer,
reports, typed configs, device) and return plain results, so they are tested without Flower.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, cast

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedmira.common.config import DataConfig, GenerateConfig, TrainConfig
from fedmira.common.model import autocast_context
from fedmira.common.optim import (  # noqa: F401  (lr_at, round_steps: part of the engine's interface)
    lr_at,
    round_steps,
    start_training,
)

#: Where a site keeps its AdamW moments between rounds, in its node state (never in a reply).
OPTIMIZER_KEY = "fedmira.optimizer"
from fedmira.common.prompts import IGNORE_INDEX, Example, collate, collate_left, encode_example, prompt_ids
from fedmira.common.reports import Report
from fedmira.common.retrieval import Neighbor

if TYPE_CHECKING:
    from fedmira.common.parallel import Shard


@dataclass(frozen=True)
class TrainResult:
    """What a local training run did (no report text)."""

    mean_loss: float
    num_examples: int
    steps: int
    tokens: int
    seconds: float
    #: Learning rate of the last step taken (where the run's schedule stands).
    lr: float = 0.0
    #: Sum of the learning rates of the steps taken: how far AdamW could move the adapter
    #: (about lr per step and weight), so the server compares update norms per unit of it.
    lr_sum: float = 0.0
    #: Padding tokens in the batches (what length grouping saves).
    padded_tokens: int = 0
    #: With ``train.keep_optimizer_state``: AdamW's moments after the call, ``"<param>:<key>"``
    #: (see common.optim); empty otherwise. The site keeps them; they are never sent.
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: Whether the call started from kept moments (else AdamW started afresh).
    optimizer_state_restored: bool = False

    @property
    def tokens_per_s(self) -> float:
        """Throughput: tokens (padding excluded) per second; 0 when no time passed."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def encode_reports(
    reports: Sequence[Report], tokenizer: Any, data: DataConfig,
    neighbors: Sequence[Sequence[Neighbor]] | None = None,
) -> list[Example]:
    """Tokenize reports once (prompt + masked target) for training or loss evaluation.

    ``neighbors`` (aligned with ``reports``) are the retrieved prior cases of ``site_aware_rag``.
    """
    near = _aligned(reports, neighbors)
    return [
        encode_example(r, tokenizer, data.template, data.max_length, data.max_target_tokens,
                       neighbors=n, neighbor_tokens=data.neighbor_tokens, preamble=data.preamble)
        for r, n in zip(reports, near)
    ]


def _aligned(reports: Sequence[Report],
             neighbors: Sequence[Sequence[Neighbor]] | None) -> Sequence[Sequence[Neighbor]]:
    if neighbors is None:
        return [()] * len(reports)
    if len(neighbors) != len(reports):
        raise ValueError(f"{len(neighbors)} neighbour lists for {len(reports)} reports")
    return neighbors


def target_logits(model: Any, batch: dict[str, torch.Tensor],
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return fp32 logits and labels at the target positions (``[N, vocab]``, ``[N]``) and the mask.

    The mask (``[B, T-1]``, True at targets) tells each target's row. The vocabulary projection
    runs only where there is a target when the model allows it: the impression is ~10% of the
    tokens and the head (49k x 576 for SmolLM2) is ~20% of the forward's FLOPs, so this saves
    most of that and the big fp32 log-softmax, with the same logits (tested against the full
    ones). ``use_cache=False``: a training forward has no use for a KV cache, which costs memory.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    parts = decoder_and_head(model)
    if parts is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits[:, :-1][keep].float(), labels[keep], keep
    decoder, head = parts
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).last_hidden_state
    return head(hidden[:, :-1][keep]).float(), labels[keep], keep


def token_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Compute the summed next-token cross-entropy over target tokens, and their count.

    Computed here rather than with HF's ``labels=`` so the caller decides the normalisation
    (HF averages over the whole padded batch, which is wrong for per-sample DP gradients).
    """
    logits, labels, _ = target_logits(model, batch)
    return F.cross_entropy(logits, labels, reduction="sum"), int(labels.numel())


def decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """Return (decoder stack, output head) of a causal LM (PEFT-wrapped or not), or None.

    None when the model's logits are more than ``head(hidden)`` (softcapping, scaling) or it
    has no such parts.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) is not None \
            or getattr(config, "logit_scale", None) is not None:
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


#: Length grouping sorts windows of this many batches by length, then shuffles the batches.
GROUP_WINDOW = 50


def _batches(n: int, batch_size: int, rng: random.Random, lengths: Sequence[int] | None = None) -> Any:
    """Endless shuffled mini-batches of indices (reshuffled every epoch).

    With ``lengths`` the batches are length-grouped: each epoch's shuffled order is cut into
    windows of ``GROUP_WINDOW`` batches, each window sorted by length and cut into batches, and
    the batches shuffled again, so a batch holds similar lengths (less padding) while every
    example is still seen once per epoch in a seeded random order.
    """
    while True:
        order = list(range(n))
        rng.shuffle(order)
        chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        if lengths is not None:
            # Drop the epoch's remainder from the shuffled order first, so the rows left out of an
            # epoch are random ones (sorting first would always leave out the longest).
            usable = order[: n - n % batch_size] if n >= batch_size else order
            span = batch_size * GROUP_WINDOW
            # Sort by length alone: the stable sort keeps the shuffled order among equal lengths,
            # so equally long reports (all cut to max_length) still meet in new batches each epoch.
            grouped = [sorted(usable[i : i + span], key=lambda j: lengths[j])
                       for i in range(0, len(usable), span)]
            chunks = [w[i : i + batch_size] for w in grouped for i in range(0, len(w), batch_size)]
            rng.shuffle(chunks)
        for chunk in chunks:
            if len(chunk) == batch_size or n < batch_size:
                yield chunk


def train_steps(
    model: Any,
    examples: Sequence[Example],
    cfg: TrainConfig,
    device: torch.device,
    pad_id: int,
    *,
    seed: int | None = None,
    lr: float | None = None,
    steps: int | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    proximal: tuple[float, Sequence[torch.Tensor]] | None = None,
    autocast: torch.dtype | None = None,
    global_step: int = 0,
    total_steps: int | None = None,
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
    shard: Shard | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps of LoRA training on ``examples``.

    ``lr``/``steps``/``seed`` override the config (a federated round sends them). Returns the
    mean loss per target token over all steps, the number of distinct examples, and throughput.

    ``autocast`` (e.g. ``LoadedModel.autocast``) runs each forward in bf16 mixed precision.
    With ``train.epochs`` > 0 the call takes that many passes over ``examples`` instead of
    ``steps``. ``global_step`` / ``total_steps`` place the call in the run's learning-rate
    schedule (a federated round continues it; by default the call is a whole run). With
    ``train.keep_optimizer_state`` an ``optimizer_state`` (a previous result's) resumes AdamW's
    moments when it matches these parameters exactly, and the result carries the new ones.

    ``proximal = (mu, reference)`` adds FedProx's term ``(mu / 2) * ||w - w_ref||^2`` to every
    step's loss, ``reference`` holding one tensor per trainable parameter in
    ``model.parameters()`` order (the global adapter as received). The reported loss stays the
    task loss, so FedProx and FedAvg curves compare like with like.

    ``shard`` (set by :mod:`common.parallel` in each of ``train.devices`` processes): every
    process draws the same batches, runs its slice of each micro-batch, and the step's
    gradients and loss are summed over processes before clipping and the optimizer step, so
    every process steps alike and the result counts all processes' rows.
    """
    run = start_training(model, len(examples), cfg, seed=seed, lr=lr, steps=steps, global_step=global_step,
                         total_steps=total_steps, optimizer_state=optimizer_state)
    steps, params, optimizer, scheduler = run.steps, run.params, run.optimizer, run.scheduler
    rng = run.sampler()
    prox = _proximal_term(params, proximal, device)
    lengths = [len(e.input_ids) for e in examples] if cfg.group_by_length else None
    batches = _batches(len(examples), cfg.batch_size, rng, lengths)
    model.train()
    seen: set[int] = set()
    total_loss, total_tokens, all_tokens, padded, last_lr, lr_sum = 0.0, 0, 0, 0, run.lr, 0.0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", unit="step", disable=not progress, leave=False)
    with run.seeded(device), gradient_checkpointing(model, cfg.gradient_checkpointing):
        for step in bar:
            step_loss, step_tokens, step_all, step_padded = torch.zeros((), device=device), 0, 0, 0
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            n_target = sum(
                sum(1 for t in examples[i].labels[1:] if t != IGNORE_INDEX) for m in micro for i in m
            )
            for idx in micro:
                seen.update(idx)
                idx = shard.rows(idx) if shard is not None else idx
                if not idx:  # more processes than rows in this micro-batch
                    continue
                batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
                # Autocast per micro-batch, never around the loop: autocast caches its bf16 copies
                # of the weights until its context exits, so one context over several optimizer
                # steps would keep training on the stale first copy of the LoRA weights.
                with autocast_context(device, autocast):
                    loss_sum, n_tok = token_loss(model, batch)
                (loss_sum / max(n_target, 1)).backward()  # token mean over the whole accumulated step
                step_loss += loss_sum.detach()
                step_tokens += n_tok
                step_all += int(batch["attention_mask"].sum())
                step_padded += int((batch["attention_mask"] == 0).sum())
            if shard is not None:  # one collective per step: gradients, loss and token counts
                counts = torch.tensor([float(step_tokens), float(step_all), float(step_padded)],
                                      device=device)
                summed = shard.all_reduce(params, torch.cat([step_loss.reshape(1).float(), counts]))
                step_loss = summed[0]
                step_tokens, step_all, step_padded = int(summed[1]), int(summed[2]), int(summed[3])
            all_tokens += step_all
            padded += step_padded
            if prox is not None:
                prox().backward()  # once per optimizer step, not per micro-batch
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            last_lr = float(optimizer.param_groups[0]["lr"])
            lr_sum += last_lr
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(step_loss) / max(step_tokens, 1)
            total_loss += float(step_loss)
            total_tokens += step_tokens
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if on_step is not None:
                on_step(step, loss_value)
    model.eval()
    seconds = time.perf_counter() - start
    mean = total_loss / max(total_tokens, 1)
    return TrainResult(mean, len(seen), steps, all_tokens, seconds, lr=last_lr, lr_sum=lr_sum,
                       padded_tokens=padded, optimizer_state=run.optimizer_state(),
                       optimizer_state_restored=run.restored)


@contextlib.contextmanager
def gradient_checkpointing(model: Any, enabled: bool) -> Iterator[None]:
    """Recompute activations in backward while inside (``train.gradient_checkpointing``).

    Non-reentrant checkpointing (PyTorch's recommended mode) needs no gradient on the inputs,
    which a frozen base would not give; the RNG state is restored for the recomputation, so
    dropout draws the same masks and the gradients equal those without checkpointing. Switched
    off again on exit: generation and evaluation keep their KV cache.
    """
    if not enabled:
        yield
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.activation_checkpointing_disable()


def _proximal_term(
    params: Sequence[torch.Tensor], proximal: tuple[float, Sequence[torch.Tensor]] | None,
    device: torch.device,
) -> Callable[[], torch.Tensor] | None:
    """Build a closure computing ``(mu / 2) * sum ||p - ref||^2``, or None when there is no term."""
    if proximal is None or proximal[0] == 0:
        return None
    mu, reference = proximal
    if len(reference) != len(params) or any(r.shape != p.shape for p, r in zip(params, reference)):
        raise ValueError(
            f"proximal reference must match the {len(params)} trainable parameters in order and shape")
    refs = [r.detach().to(device=device, dtype=p.dtype) for p, r in zip(params, reference)]

    def term() -> torch.Tensor:
        squares = cast(torch.Tensor, sum(((p - r) ** 2).sum() for p, r in zip(params, refs)))
        return 0.5 * mu * squares

    return term


@torch.no_grad()
def evaluate_loss(
    model: Any, examples: Sequence[Example], device: torch.device, pad_id: int, batch_size: int = 8,
    progress: bool = False, autocast: torch.dtype | None = None,
) -> tuple[float, int]:
    """Mean loss per target token over ``examples`` and the number of target tokens.

    ``autocast`` (e.g. ``LoadedModel.autocast``) runs the forward in bf16 mixed precision.
    """
    model.eval()
    total, count = 0.0, 0
    for i in tqdm(range(0, len(examples), batch_size), desc="loss", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        with autocast_context(device, autocast):
            loss_sum, n_tok = token_loss(model, batch)
        total += float(loss_sum)
        count += n_tok
    return (total / count if count else math.nan), count


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    reports: Sequence[Report],
    data: DataConfig,
    gen: GenerateConfig,
    device: torch.device,
    progress: bool = False,
    neighbors: Sequence[Sequence[Neighbor]] | None = None,
    autocast: torch.dtype | None = None,
) -> list[str]:
    """Impressions for ``reports`` (in order), batched with left padding and the KV cache.

    ``neighbors`` (aligned with ``reports``) are the prior cases of ``site_aware_rag`` prompts;
    ``autocast`` runs decoding in bf16 mixed precision.
    """
    model.eval()
    max_prompt = (max(8, data.max_length - gen.max_new_tokens) if data.max_length > gen.max_new_tokens + 8
                  else data.max_length)
    prompts = [prompt_ids(r, tokenizer, data.template, max_prompt, neighbors=n,
                          neighbor_tokens=data.neighbor_tokens, preamble=data.preamble)
               for r, n in zip(reports, _aligned(reports, neighbors))]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    outputs: list[str] = [""] * len(prompts)
    pad_id = int(tokenizer.pad_token_id)
    eos_id = int(tokenizer.eos_token_id)
    bar = tqdm(total=len(prompts), desc="generate", unit="report", disable=not progress)
    for start in range(0, len(order), gen.batch_size):
        idx = order[start : start + gen.batch_size]
        batch = {k: v.to(device) for k, v in collate_left([prompts[i] for i in idx], pad_id).items()}
        with autocast_context(device, autocast):
            out = model.generate(
                **batch, max_new_tokens=gen.max_new_tokens, num_beams=gen.num_beams, do_sample=False,
                eos_token_id=eos_id, pad_token_id=pad_id,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        for i, row in zip(idx, new):
            outputs[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return outputs
