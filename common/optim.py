"""The optimizer and learning-rate schedule of local training, shared by plain and DP-SGD steps.

Federated training calls the local trainer once per round. Two things must not restart with
each call, or a 4-round run of 5 steps moves the adapter about as far as 5 steps:

- **the schedule**: warm-up then constant / linear / cosine decay over the *run's* planned
  steps. A call says where it sits (:class:`Schedule`: steps of the run before it, and the run's
  total); :func:`lr_factor` is a pure function of the global step.
- **the optimizer's moments** (AdamW's ``exp_avg``, ``exp_avg_sq``, ``step``), when the site
  keeps them (``train.keep_optimizer_state``): :func:`optimizer_arrays` flattens them to
  tensors (keyed by parameter name) the site stores in its own node state (never in a reply),
  and :func:`restore_optimizer` loads them back with strict name and shape checks.

``lr_factor`` reproduces ``transformers.get_scheduler``'s formulas exactly (constant with
warm-up, linear, cosine with half a cycle), so a single call with offset 0 trains exactly as
before.
"""

from __future__ import annotations

import contextlib
import math
import random
import secrets
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from fedmira.common.config import TrainConfig

#: AdamW's per-parameter state entries, in the order they are stored.
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")
#: What a training call says when it is given no examples (plain and DP-SGD alike).
NO_EXAMPLES = "No training examples: this site has no usable reports in its train split."


@dataclass(frozen=True)
class Schedule:
    """Where one training call sits in the run's learning-rate schedule.

    ``offset``: optimizer steps of the run before this call (a federated round ``g`` of ``s``
    steps per round starts at ``(g - 1) * s``); ``total``: the run's planned steps (None: this
    call's own steps, i.e. a schedule that covers only this call).
    """

    offset: int = 0
    total: int | None = None


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at global step ``step`` (0-based) of ``total``.

    Past the planned total the rate stays at its end value (a cosine does not climb again).
    """
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    if schedule == "cosine":
        progress = min(1.0, float(step - warmup) / float(max(1, total - warmup)))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"Unknown schedule {schedule!r}; use constant, linear or cosine.")


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str) -> float:
    """Return the learning rate at global step ``step`` of a run of ``total`` steps peaking at ``peak``."""
    return peak * lr_factor(step, total, warmup, schedule)


def round_steps(cfg: TrainConfig, n_examples: int, steps: int | None = None) -> int:
    """Return the optimizer steps of one call.

    ``train.epochs`` passes over the examples when set (they win over a server's step count),
    else ``steps`` (what the round's message says), else ``train.steps``.
    """
    if cfg.epochs > 0:
        per_step = cfg.batch_size * cfg.grad_accum
        # 1e-9: 0.07 x 100 is 7.000000000000001 in floats, which is 7 steps, not 8
        return max(1, math.ceil(cfg.epochs * n_examples / per_step - 1e-9))
    return cfg.steps if steps is None else steps



def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """Return the warm-up length of a run of ``total`` steps.

    ``train.warmup_ratio`` of it when set (rounded up, as transformers does), else
    ``train.warmup_steps``.
    """
    if cfg.warmup_ratio > 0:
        return math.ceil(cfg.warmup_ratio * total)
    return cfg.warmup_steps


def check_position(global_step: int, total_steps: int | None) -> None:
    """Fail fast on a schedule position that cannot be right."""
    if global_step < 0:
        raise ValueError(f"global_step must be >= 0 (steps of the run before this call), got {global_step}")
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 (the run's planned steps) or None, got {total_steps}")


def make_optimizer(
    params: Sequence[torch.Tensor], cfg: TrainConfig, lr: float, steps: int, schedule: Schedule,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on ``params`` and its scheduler, positioned at ``schedule.offset`` of the run."""
    check_position(schedule.offset, schedule.total)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    total = schedule.total if schedule.total is not None else steps
    offset = schedule.offset
    warmup = warmup_steps(cfg, total)

    def factor(i: int) -> float:
        return lr_factor(offset + i, total, warmup, cfg.schedule)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_arrays(optimizer: torch.optim.Optimizer, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copy AdamW's moments as flat CPU tensors ``"<parameter name>:<key>"``.

    A copy: later steps do not change it.
    """
    out: dict[str, torch.Tensor] = {}
    for index, entry in optimizer.state_dict()["state"].items():
        for key in ADAM_KEYS:
            if key in entry:
                value = entry[key]
                value = value if torch.is_tensor(value) else torch.tensor(float(value))
                out[f"{names[index]}:{key}"] = value.detach().to("cpu").clone()
    return out


def restore_optimizer(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], names: Sequence[str],
    saved: Mapping[str, torch.Tensor] | None,
) -> bool:
    """Load :func:`optimizer_arrays` output into ``optimizer``; tell whether it did.

    False (and nothing loaded) unless ``saved`` holds exactly the moments of these parameters
    (same names, same shapes).
    """
    if not saved:
        return False
    if set(saved) != {f"{n}:{k}" for n in names for k in ADAM_KEYS}:
        return False
    state: dict[int, dict[str, Any]] = {}
    for i, (name, p) in enumerate(zip(names, params)):
        avg, sq = saved[f"{name}:exp_avg"], saved[f"{name}:exp_avg_sq"]
        if tuple(avg.shape) != tuple(p.shape) or tuple(sq.shape) != tuple(p.shape):
            return False
        state[i] = {"step": saved[f"{name}:step"].to(torch.float32).reshape(()).clone(),
                    "exp_avg": avg.to(device=p.device, dtype=p.dtype).clone(),
                    "exp_avg_sq": sq.to(device=p.device, dtype=p.dtype).clone()}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return True


def require_examples(n_examples: int) -> None:
    """Fail with :data:`NO_EXAMPLES` when a training call has nothing to train on."""
    if not n_examples:
        raise ValueError(NO_EXAMPLES)


@contextlib.contextmanager
def seeded_torch(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch (LoRA dropout) for one training run, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class LocalTraining:
    """What one local training call (plain or DP-SGD) starts from: see :func:`start_training`."""

    #: Optimizer steps the call plans (:func:`round_steps`).
    steps: int
    #: Peak learning rate of the call.
    lr: float
    #: The call's seed (batch order, LoRA dropout, DP noise).
    seed: int
    #: Names and tensors of the trainable parameters, in ``model.named_parameters()`` order.
    names: list[str]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    #: Whether the call keeps AdamW's moments (``train.keep_optimizer_state``).
    keep: bool
    #: Whether the optimizer started from kept moments (else afresh).
    restored: bool

    def sampler(self, secure: bool = False) -> random.Random:
        """Make the call's Python RNG for sampling: seeded, or OS entropy when ``secure``."""
        return secrets.SystemRandom() if secure else random.Random(self.seed)

    def seeded(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        """Torch's RNG seeded with the call's seed for the loop (:func:`seeded_torch`)."""
        return seeded_torch(self.seed, device)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """AdamW's moments after the call when they are kept (:func:`optimizer_arrays`), else empty."""
        return optimizer_arrays(self.optimizer, self.names) if self.keep else {}


def start_training(
    model: Any, n_examples: int, cfg: TrainConfig, *, seed: int | None, lr: float | None,
    steps: int | None, global_step: int, total_steps: int | None,
    optimizer_state: Mapping[str, torch.Tensor] | None,
) -> LocalTraining:
    """Set up one local training call: steps, learning rate, seed, parameters, AdamW and schedule.

    ``seed``, ``lr`` and ``steps`` override the config (None: the config's; an explicit lr of 0
    means 0). ``global_step`` / ``total_steps`` place the call in the run's schedule. With
    ``train.keep_optimizer_state`` a matching ``optimizer_state`` resumes AdamW's moments.

    Raises
    ------
    ValueError
        No examples (:data:`NO_EXAMPLES`), or a schedule position that cannot be right.
    """
    require_examples(n_examples)
    planned = round_steps(cfg, n_examples, steps)
    peak = cfg.lr if lr is None else lr
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    optimizer, scheduler = make_optimizer(params, cfg, peak, planned, Schedule(global_step, total_steps))
    keep = cfg.keep_optimizer_state
    restored = keep and restore_optimizer(optimizer, params, names, optimizer_state)
    return LocalTraining(steps=planned, lr=peak, seed=cfg.seed if seed is None else seed, names=names,
                         params=params, optimizer=optimizer, scheduler=scheduler, keep=keep,
                         restored=restored)
