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
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_scheduler

from common.config import DataConfig, GenerateConfig, TrainConfig
from common.prompts import IGNORE_INDEX, Example, collate, collate_left, encode_example, prompt_ids
from common.reports import Report


@dataclass(frozen=True)
class TrainResult:
    """What a local training run did (no report text)."""

    mean_loss: float
    num_examples: int
    steps: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def encode_reports(reports: Sequence[Report], tokenizer: Any, data: DataConfig) -> list[Example]:
    """Tokenize reports once (prompt + masked target) for training or loss evaluation."""
    return [
        encode_example(r, tokenizer, data.template, data.max_length, data.max_target_tokens)
        for r in reports
    ]


def token_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count.

    Computed here rather than with HF's ``labels=`` so the caller decides the normalisation
    (HF averages over the whole padded batch, which is wrong for per-sample DP gradients).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return loss, int((labels != IGNORE_INDEX).sum())


@contextlib.contextmanager
def _seeded_torch(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch (LoRA dropout) for one training run, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _batches(n: int, batch_size: int, rng: random.Random) -> Any:
    """Endless shuffled mini-batches of indices (reshuffled every epoch)."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, batch_size):
            chunk = order[i : i + batch_size]
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
) -> TrainResult:
    """Run ``steps`` AdamW steps of LoRA training on ``examples``.

    ``lr``/``steps``/``seed`` override the config (a federated round sends them). Returns the
    mean loss per target token over all steps, the number of distinct examples, and throughput.

    ``proximal = (mu, reference)`` adds FedProx's term ``(mu / 2) * ||w - w_ref||^2`` to every
    step's loss, ``reference`` holding one tensor per trainable parameter in
    ``model.parameters()`` order (the global adapter as received). The reported loss stays the
    task loss, so FedProx and FedAvg curves compare like with like.
    """
    if not examples:
        raise ValueError("No training examples: this site has no usable reports in its train split.")
    steps = steps or cfg.steps
    lr = lr or cfg.lr
    run_seed = cfg.seed if seed is None else seed
    rng = random.Random(run_seed)
    params = [p for p in model.parameters() if p.requires_grad]
    prox = _proximal_term(params, proximal, device)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    batches = _batches(len(examples), cfg.batch_size, rng)
    model.train()
    seen: set[int] = set()
    total_loss, total_tokens, all_tokens = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", unit="step", disable=not progress, leave=False)
    with _seeded_torch(run_seed, device):  # dropout masks follow the seed too
        for step in bar:
            step_loss, step_tokens = torch.zeros((), device=device), 0
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            n_target = sum(
                sum(1 for t in examples[i].labels[1:] if t != IGNORE_INDEX) for m in micro for i in m
            )
            for idx in micro:
                seen.update(idx)
                batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
                loss_sum, n_tok = token_loss(model, batch)
                (loss_sum / max(n_target, 1)).backward()  # token mean over the whole accumulated step
                step_loss += loss_sum.detach()
                step_tokens += n_tok
                all_tokens += int(batch["attention_mask"].sum())
            if prox is not None:
                prox().backward()  # once per optimizer step, not per micro-batch
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
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
    return TrainResult(mean, len(seen), steps, all_tokens, seconds)


def _proximal_term(
    params: Sequence[torch.Tensor], proximal: tuple[float, Sequence[torch.Tensor]] | None,
    device: torch.device,
) -> Callable[[], torch.Tensor] | None:
    """A closure computing ``(mu / 2) * sum ||p - ref||^2``, or None when there is no term."""
    if proximal is None or proximal[0] == 0:
        return None
    mu, reference = proximal
    if len(reference) != len(params) or any(r.shape != p.shape for p, r in zip(params, reference)):
        raise ValueError(
            f"proximal reference must match the {len(params)} trainable parameters in order and shape")
    refs = [r.detach().to(device=device, dtype=p.dtype) for p, r in zip(params, reference)]

    def term() -> torch.Tensor:
        squares = sum(((p - r) ** 2).sum() for p, r in zip(params, refs))
        return 0.5 * mu * squares  # type: ignore[return-value]

    return term


@torch.no_grad()
def evaluate_loss(
    model: Any, examples: Sequence[Example], device: torch.device, pad_id: int, batch_size: int = 8,
    progress: bool = False,
) -> tuple[float, int]:
    """Mean loss per target token over ``examples`` and the number of target tokens."""
    model.eval()
    total, count = 0.0, 0
    for i in tqdm(range(0, len(examples), batch_size), desc="loss", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
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
) -> list[str]:
    """Impressions for ``reports`` (in order), batched with left padding and the KV cache."""
    model.eval()
    max_prompt = max(8, data.max_length - gen.max_new_tokens) if data.max_length > gen.max_new_tokens + 8 else data.max_length
    prompts = [prompt_ids(r, tokenizer, data.template, max_prompt) for r in reports]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    outputs: list[str] = [""] * len(prompts)
    pad_id = int(tokenizer.pad_token_id)
    eos_id = int(tokenizer.eos_token_id)
    bar = tqdm(total=len(prompts), desc="generate", unit="report", disable=not progress)
    for start in range(0, len(order), gen.batch_size):
        idx = order[start : start + gen.batch_size]
        batch = {k: v.to(device) for k, v in collate_left([prompts[i] for i in idx], pad_id).items()}
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
