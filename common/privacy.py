"""Differential privacy for fedmira: DP-SGD at a site, its accountant across rounds, site-level DP.

Kept in three layers, as Opacus keeps them:

- **Accounting math** (pure functions of ``(noise_multiplier, sample_rate, steps)`` histories):
  :func:`epsilon_for`, :func:`noise_for_target`, :func:`affordable_steps`. Opacus' accountants
  do the math; these functions only give them fedmira's history format.
- **State**: :class:`AccountantState`, the site's privacy ledger. It lives with the site across
  rounds (Flower's ``context.state``) and across restarts (a JSON file in the site's own state
  folder), never resets, and never leaves the site except as the epsilon it reports.
- **Training**: :func:`dp_train_steps`, record- or patient-level DP-SGD on the LoRA parameters
  with Opacus' ``GradSampleModule`` (per-sample gradients) and ``DPOptimizer`` (clipping, noise).
  The loop is written here rather than through ``PrivacyEngine.make_private`` because fedmira
  needs three things ``make_private`` does not give: per-sample losses that ignore padding,
  patient-level units (a patient's reports clipped together), and an accountant that outlives
  the optimizer of one round.

Site-level DP (each hospital's whole update protected) is :func:`site_level_aggregate` plus the
same accounting over rounds with the site sampling rate.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fedmira.common.config import CLIPPINGS, PrivacyConfig, TrainConfig
from fedmira.common.engine import target_logits
from fedmira.common.errors import DataError
from fedmira.common.optim import require_examples, start_training
from fedmira.common.prompts import Example, collate
from fedmira.common.reports import Report

if TYPE_CHECKING:
    from fedmira.common.config import ExperimentConfig

STATE_VERSION = 1
#: Key of the ledger in a Flower node's ``context.state``.
LEDGER_KEY = "fedmira-privacy"


# ============================================================================ accounting math
def epsilon_for(history: Sequence[Sequence[float]], delta: float, mechanism: str = "rdp") -> float:
    """Epsilon of a composition of subsampled Gaussian steps, by Opacus' accountant.

    ``history`` holds ``(noise_multiplier, sample_rate, steps)`` entries; an empty history
    (nothing released yet) costs nothing. A zero noise multiplier gives infinity.
    """
    entries = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not entries:
        return 0.0
    if any(s <= 0 for s, _, _ in entries):
        return math.inf
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=mechanism)
    accountant.history = entries
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is just looser
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        return float(accountant.get_epsilon(delta=delta))


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     mechanism: str = "rdp") -> float:
    """Solve for the noise multiplier that spends ``target_epsilon`` in ``steps`` steps (Opacus' solver)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser bound, noted once here
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=max(steps, 1),
                                          accountant=mechanism))


def affordable_steps(history: Sequence[Sequence[float]], noise_multiplier: float, sample_rate: float,
                     wanted: int, budget: float, delta: float, mechanism: str = "rdp") -> int:
    """How many of ``wanted`` further steps keep epsilon within ``budget`` (0: no budget).

    Epsilon grows with every step, so the answer is found by bisection on the step count.
    """
    if budget <= 0 or wanted <= 0:
        return max(wanted, 0)

    def fits(k: int) -> bool:
        spent = epsilon_for([*history, (noise_multiplier, sample_rate, k)], delta, mechanism)
        return spent <= budget * (1 + 1e-9)

    if fits(wanted):
        return wanted
    lo, hi = 0, wanted  # fits(lo) holds (or lo == 0), fits(hi) fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ============================================================================ the site's ledger
@dataclass
class AccountantState:
    """A site's privacy ledger for one training run (JSON-serialisable, no report content).

    ``noise_multiplier`` and ``sample_rate`` are fixed at the site's first round (the noise is
    planned for the whole run) and kept, so the plan holds when later rounds are resumed.
    """

    mechanism: str = "rdp"
    delta: float = 1e-5
    unit: str = "record"
    units: int = 0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    planned_steps: int = 0
    history: list[list[float]] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    version: int = STATE_VERSION

    @property
    def planned(self) -> bool:
        """Whether the noise is planned (:func:`plan_state` ran)."""
        return self.units > 0

    @property
    def steps(self) -> int:
        """DP-SGD steps released so far."""
        return int(sum(n for _, _, n in self.history))

    def epsilon(self) -> float:
        """Compute the epsilon spent so far at ``delta`` (:func:`epsilon_for`)."""
        return epsilon_for(self.history, self.delta, self.mechanism)

    def record(self, steps: int, global_round: int) -> None:
        """Add ``steps`` released DP-SGD steps (merged with the last entry when equal)."""
        if steps <= 0:
            return
        sigma, q = self.noise_multiplier, self.sample_rate
        if self.history and self.history[-1][0] == sigma and self.history[-1][1] == q:
            self.history[-1][2] = int(self.history[-1][2]) + steps
        else:
            self.history.append([sigma, q, steps])
        if global_round not in self.rounds:
            self.rounds.append(global_round)

    def to_json(self) -> str:
        """Serialise the ledger as JSON (sorted keys)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AccountantState:
        """Read a ledger written by :meth:`to_json`; a ValueError for another version."""
        data = json.loads(text)
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"privacy ledger version {data.get('version')!r} is not {STATE_VERSION}")
        return cls(**data)


def plan_state(privacy: PrivacyConfig, train: TrainConfig, units: int, planned_steps: int) -> AccountantState:
    """Plan a new ledger with the noise for this site: solved for ``target_epsilon`` or fixed.

    The sampling rate is the expected logical batch (``batch_size x grad_accum`` units) over the
    site's units; ``planned_steps`` assumes the site trains in every round (the worst case when
    sites are sampled), so the target holds whatever the sampling does.
    """
    if units < 1:
        raise DataError("DP-SGD needs at least one training unit at this site.")
    q = min(1.0, train.batch_size * train.grad_accum / units)
    if privacy.target_epsilon > 0:
        sigma = noise_for_target(privacy.target_epsilon, privacy.delta, q, planned_steps, privacy.accountant)
    else:
        sigma = privacy.noise_multiplier
    return AccountantState(mechanism=privacy.accountant, delta=privacy.delta, unit=privacy.unit,
                           units=units, noise_multiplier=sigma, sample_rate=q, planned_steps=planned_steps)


def load_state(path: Path | None, in_memory: str | None) -> AccountantState | None:
    """Load the ledger from ``context.state`` or the site's file, whichever released more steps.

    Both copies are written after every round; after a SuperNode restart only the file is
    left, and a file can be a round behind the memory copy if writing it failed. The longer
    history is the one that counts (privacy already spent is never given back).
    """
    found = []
    if in_memory:
        found.append(AccountantState.from_json(in_memory))
    if path is not None and path.is_file():
        found.append(AccountantState.from_json(path.read_text(encoding="utf-8")))
    return max(found, key=lambda s: s.steps) if found else None


def save_state(state: AccountantState, path: Path) -> None:
    """Write the ledger atomically (a crash leaves the old file or the new one, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(state.to_json(), encoding="utf-8")
    os.replace(tmp, path)


def ledger_file(state_dir: Path, cfg: ExperimentConfig) -> Path:
    """``<state_dir>/privacy/<run>.json``: one ledger per training run (resume keeps the name).

    Separate runs on the same data compose: their epsilons add up (a safe bound).
    """
    name = Path(cfg.run.dir).name if cfg.run.dir else cfg.experiment_name()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "run"
    return Path(state_dir) / "privacy" / f"{safe}.json"


def unit_ids(reports: Sequence[Report], unit: str) -> list[int]:
    """Return the privacy unit of each report: itself (``record``) or its patient (``patient``).

    Raises
    ------
    DataError
        ``unit=patient`` and some reports have no patient_id (names how many, no content).
    """
    if unit == "record":
        return list(range(len(reports)))
    missing = sum(1 for r in reports if not r.patient_id)
    if missing:
        raise DataError(
            f"privacy.unit=patient needs a patient_id on every training report; {missing} of "
            f"{len(reports)} have none. Add a patient_id column to the site's data or use "
            "privacy.unit=record.")
    index: dict[str, int] = {}
    return [index.setdefault(str(r.patient_id), len(index)) for r in reports]


# ============================================================================ DP-SGD training
@dataclass(frozen=True)
class DPResult:
    """What a DP training run did (numbers only)."""

    mean_loss: float
    num_examples: int
    steps: int
    steps_wanted: int
    tokens: int
    seconds: float
    clipped_fraction: float
    epsilon: float
    #: Learning rate of the last step taken (where the run's schedule stands).
    lr: float = 0.0
    #: Sum of the learning rates of the steps taken (see TrainResult.lr_sum).
    lr_sum: float = 0.0
    #: With ``train.keep_optimizer_state``: AdamW's moments after the call. They are computed
    #: from the noisy gradients only (post-processing), so keeping them costs no privacy.
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    optimizer_state_restored: bool = False

    @property
    def tokens_per_s(self) -> float:
        """Throughput: tokens (padding excluded) per second; 0 when no time passed."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def budget_spent(self) -> bool:
        """Whether the budget stopped the call before it took every step it wanted."""
        return self.steps < self.steps_wanted


def sample_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean target-token loss ``[B]`` and per-row target-token counts ``[B]``.

    Padding and prompt tokens carry ``IGNORE_INDEX`` and count for nothing, so each row's loss
    (and so its per-sample gradient) does not depend on how long its batch-mates are. The
    logits are ``engine.target_logits``' (the head only at targets; the frozen head has no
    Opacus hooks, so its input's shape does not matter to them): the same losses as full
    logits (tested), without the ``[B, T, vocab]`` fp32 buffer that made a DP step cost far
    more than a plain one on a GPU.
    """
    logits, labels, keep = target_logits(_unwrapped(model), batch)
    counts = keep.sum(dim=1)
    tok = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    per_row = torch.zeros(keep.shape[0], dtype=tok.dtype, device=tok.device).index_add_(0, rows, tok)
    return per_row / counts.clamp(min=1), counts


def _unwrapped(model: Any) -> Any:
    """Return the model inside Opacus' GradSampleModule (its hooks sit on the inner modules)."""
    from opacus import GradSampleModule

    return model._module if isinstance(model, GradSampleModule) else model


def _members(units: Sequence[int]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for row, unit in enumerate(units):
        groups.setdefault(unit, []).append(row)
    return [groups[u] for u in sorted(groups)]


#: The attribute Opacus' hooks add to each parameter: its per-sample gradients (a tensor, or a
#: list of them, one per backward pass). torch's types do not know it, hence getattr/setattr.
_GRAD_SAMPLE = "grad_sample"


def _grad_sample(p: torch.nn.Parameter, rows: int) -> torch.Tensor:
    """Return ``p``'s per-row gradients ``[rows, *p.shape]`` from Opacus' hooks (zeros if none)."""
    gs: torch.Tensor | list[torch.Tensor] | None = getattr(p, _GRAD_SAMPLE, None)
    if isinstance(gs, list):  # one tensor per backward pass (a step's micro-batches)
        gs = torch.cat(gs, dim=0)
    if gs is None:  # this parameter took no part in the forward pass
        gs = torch.zeros((rows, *p.shape), dtype=p.dtype, device=p.device)
    return gs


def _group_grad_samples(params: Sequence[torch.nn.Parameter], owner: torch.Tensor, n_units: int,
                        identity: bool) -> torch.Tensor:
    """Turn per-row gradient samples into per-unit ones (a patient's rows summed); unit norms."""
    norms: list[torch.Tensor] = []
    for p in params:
        gs = _grad_sample(p, len(owner))
        if not identity:
            per_unit = torch.zeros((n_units, *gs.shape[1:]), dtype=gs.dtype, device=gs.device)
            gs = per_unit.index_add_(0, owner, gs)
        setattr(p, _GRAD_SAMPLE, gs)
        norms.append(torch.linalg.vector_norm(gs.reshape(n_units, -1), dim=1, dtype=torch.float32))
    unit_norms: torch.Tensor = torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)
    return unit_norms  # one norm per unit over all parameters


@dataclass(frozen=True)
class StepStats:
    """Numbers from one DP-SGD step (for logging; no content)."""

    loss_sum: float
    target_tokens: int
    tokens: int
    clipped: int


def dp_gradient(
    gsm: Any, dp_opt: DPRelease, params: Sequence[torch.nn.Parameter], examples: Sequence[Example],
    sample: Sequence[Sequence[int]], micro_batch: int, pad_id: int, device: torch.device,
) -> StepStats:
    """Leave the DP gradient of one step in ``p.grad``: per-unit clipped, summed, noised, scaled.

    ``sample`` lists the sampled units, each as its example rows. Rows are run in micro-batches
    of ``micro_batch`` (a patient's rows may straddle two); Opacus' hooks give per-row
    gradients, which ``dp_opt`` (:func:`make_dp_optimizer`) sums per unit, clips each unit to
    its ``max_grad_norm``, noises and divides by its expected batch size (over one flat buffer,
    or per tensor with Opacus' ``DPOptimizer``: the same mechanism). An empty sample gives
    a noise-only gradient.
    """
    if not gsm.training:
        raise ValueError(
            "dp_gradient needs the model in training mode (Opacus records activations only then)")
    rows = [i for unit in sample for i in unit]
    owner = torch.tensor([pos for pos, unit in enumerate(sample) for _ in unit], dtype=torch.long,
                         device=device)
    loss_sum, n_tok, tokens = 0.0, 0, 0
    for i in range(0, len(rows), micro_batch):
        chunk = rows[i : i + micro_batch]
        batch = {k: v.to(device) for k, v in collate([examples[j] for j in chunk], pad_id).items()}
        per_row, counts = sample_losses(gsm, batch)
        with warnings.catch_warnings():  # Opacus' hooks fire on outputs when only LoRA needs grads
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            per_row.mean().backward()  # hooks scale by the chunk size: grad_sample = each row's gradient
        loss_sum += float((per_row.detach() * counts).sum())
        n_tok += int(counts.sum())
        tokens += int(batch["attention_mask"].sum())
    clipped = dp_opt.release(params, owner, len(sample))
    return StepStats(loss_sum, n_tok, tokens, clipped)


class DPRelease:
    """Turns the per-row gradient samples Opacus' hooks left on ``params`` into a DP gradient.

    Subclasses differ only in how they compute it; the mechanism (clip each unit's gradient to
    ``max_grad_norm``, sum, add N(0, (sigma C)^2) per coordinate, divide by the expected
    number of units) and so the accounting are the same, which the tests check.
    """

    max_grad_norm: float
    #: The last step's per-unit gradient norms before clipping (diagnostics and tests).
    norms: torch.Tensor | None = None

    def release(self, params: Sequence[torch.nn.Parameter], owner: torch.Tensor, n_units: int) -> int:
        """Set each ``p.grad`` to the noisy clipped mean; return how many units were clipped."""
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop gradients and gradient samples before the next step."""
        raise NotImplementedError


class OpacusRelease(DPRelease):
    """Opacus' own ``DPOptimizer``: clipping, noise and scaling one parameter at a time."""

    def __init__(self, dp_optimizer: Any) -> None:
        self.dp_optimizer = dp_optimizer
        self.max_grad_norm = float(dp_optimizer.max_grad_norm)

    def release(self, params: Sequence[torch.nn.Parameter], owner: torch.Tensor, n_units: int) -> int:
        """Group and clip per unit, then Opacus' ``pre_step`` (clip, noise, scale per tensor)."""
        if n_units:
            norms = _group_grad_samples(params, owner, n_units, identity=n_units == len(owner))
            clipped = int((norms > self.max_grad_norm).sum())
            self.norms = norms.detach()
        else:
            clipped, self.norms = 0, torch.zeros(0)
            for p in params:  # an empty Poisson sample: a noise-only step
                setattr(p, _GRAD_SAMPLE, torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device))
        self.dp_optimizer.pre_step()
        return clipped

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and gradient samples (Opacus' ``zero_grad``)."""
        self.dp_optimizer.zero_grad(set_to_none=set_to_none)


class FlatRelease(DPRelease):
    """The same mechanism over one flat buffer of every LoRA parameter's gradient samples.

    Written by hand (Opacus' ``DPOptimizer`` works per parameter) because a LoRA adapter is
    ~100 small tensors: per parameter, a step launches a norm, an einsum, a noise draw, an add
    and a divide, so on a GPU the fixed cost of ~500 tiny kernels, not the arithmetic, made a
    DP step about twice a plain one. Here a step is one concatenation, one norm, one
    matrix-vector product, one noise draw (Opacus' ``_generate_noise``, so ``secure_mode``
    keeps its floating-point-attack protection) and one scale, whatever the parameter count.
    The per-unit norms are those of the whole gradient (all parameters), exactly as Opacus'
    flat clipping; the extra memory is one copy of the step's gradient samples.
    """

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float, expected_units: float,
                 generator: torch.Generator, secure_mode: bool) -> None:
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_units = float(expected_units)
        self.generator = generator
        self.secure_mode = secure_mode
        self.params: list[torch.nn.Parameter] = []

    def release(self, params: Sequence[torch.nn.Parameter], owner: torch.Tensor, n_units: int) -> int:
        """Clip, sum, noise and scale the whole step's gradient samples in one buffer."""
        from opacus.optimizers.optimizer import _generate_noise

        self.params = list(params)
        samples = _flat_grad_samples(self.params, len(owner))  # [rows, D], fp32
        if n_units != len(owner):  # patient units: a unit's rows summed before clipping
            samples = torch.zeros((n_units, samples.shape[1]), dtype=samples.dtype,
                                  device=samples.device).index_add_(0, owner, samples)
        norms = torch.linalg.vector_norm(samples, dim=1)
        self.norms = norms.detach()
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' clip factor
        summed = factor @ samples if n_units else samples.new_zeros(samples.shape[1])
        noise = _generate_noise(std=self.noise_multiplier * self.max_grad_norm, reference=summed,
                                generator=self.generator, secure_mode=self.secure_mode)
        flat = (summed + noise) / self.expected_units
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
            setattr(p, _GRAD_SAMPLE, None)
        return int((norms > self.max_grad_norm).sum())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the views of the last step's buffer and any gradient samples."""
        for p in self.params:
            p.grad = None
            setattr(p, _GRAD_SAMPLE, None)


def _flat_grad_samples(params: Sequence[torch.nn.Parameter], rows: int) -> torch.Tensor:
    """Every parameter's per-row gradients side by side: ``[rows, sum of numel]`` in fp32."""
    parts = [_grad_sample(p, rows).reshape(rows, p.numel()).float() for p in params]
    return torch.cat(parts, dim=1) if parts else torch.zeros((rows, 0))


def make_dp_optimizer(optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                      expected_units: float, device: torch.device, seed: int, secure_mode: bool,
                      clipping: str = "flat") -> DPRelease:
    """Make the DP release for ``optimizer``'s parameters (noise seeded, or from OS entropy).

    ``clipping="flat"``: :class:`FlatRelease` (one buffer); ``"opacus"``: Opacus'
    ``DPOptimizer`` around ``optimizer``. Either way the caller steps ``optimizer`` after
    :meth:`DPRelease.release`.
    """
    generator = _noise_generator(device, seed, secure_mode)
    expected = max(expected_units, 1e-12)
    if clipping == "flat":
        return FlatRelease(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                           expected_units=expected, generator=generator, secure_mode=secure_mode)
    if clipping != "opacus":
        raise ValueError(f"clipping must be one of {CLIPPINGS}, not {clipping!r}")
    from opacus.optimizers import DPOptimizer

    return OpacusRelease(DPOptimizer(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected, loss_reduction="mean", generator=generator, secure_mode=secure_mode))


def _noise_generator(device: torch.device, seed: int, secure: bool) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1 if secure else seed)
    return gen


def dp_train_steps(
    model: Any,
    examples: Sequence[Example],
    units: Sequence[int],
    cfg: TrainConfig,
    state: AccountantState,
    device: torch.device,
    pad_id: int,
    *,
    max_grad_norm: float,
    budget: float = 0.0,
    seed: int | None = None,
    lr: float | None = None,
    steps: int | None = None,
    global_round: int = 0,
    secure_mode: bool = False,
    progress: bool = False,
    proximal: tuple[float, Sequence[torch.Tensor]] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    global_step: int = 0,
    total_steps: int | None = None,
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
    clipping: str = "flat",
) -> DPResult:
    """DP-SGD on the trainable (LoRA) parameters, recording every released step in ``state``.

    Each step Poisson-samples units with ``state.sample_rate`` (an empty sample still takes a
    noise-only step: skipping it would reveal that the sample was empty), computes per-row
    gradients with Opacus' hooks in micro-batches of ``cfg.batch_size`` rows, sums them per unit,
    clips each unit to ``max_grad_norm``, adds Gaussian noise of std ``noise_multiplier x
    max_grad_norm`` and divides by the expected number of units per step. The optimizer (AdamW
    with the config's schedule) only post-processes the noisy gradient, so DP holds for it.

    Steps that would take epsilon past ``budget`` are not taken (``DPResult.steps`` <
    ``steps_wanted`` says so). FedProx's proximal term is data-independent and added after the
    noise. ``state`` must be planned (:func:`plan_state`) and is updated in place.
    """
    from opacus import GradSampleModule

    require_examples(len(examples))
    if len(units) != len(examples):
        raise ValueError("units must give one privacy unit per training example")
    if not state.planned:
        raise ValueError("the privacy ledger has no noise plan; call plan_state first")
    run = start_training(model, len(examples), cfg, seed=seed, lr=lr, steps=steps, global_step=global_step,
                         total_steps=total_steps, optimizer_state=optimizer_state)
    wanted, run_seed, params = run.steps, run.seed, run.params
    optimizer, scheduler = run.optimizer, run.scheduler
    sigma, q = state.noise_multiplier, state.sample_rate
    todo = affordable_steps(state.history, sigma, q, wanted, budget, state.delta, state.mechanism)
    members = _members(units)
    sampler = run.sampler(secure=secure_mode)
    prox = _proximal(params, proximal, device)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    dp_opt = make_dp_optimizer(optimizer, noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                               expected_units=q * len(members), device=device, seed=run_seed,
                               secure_mode=secure_mode, clipping=clipping)
    seen: set[int] = set()
    total_loss, total_tokens, all_tokens, clipped, sampled = 0.0, 0, 0, 0, 0
    last_lr, lr_sum = run.lr, 0.0
    start = time.perf_counter()
    model.train()
    try:
        with run.seeded(device):  # LoRA dropout follows the seed
            for step in tqdm(range(todo), desc="dp-train", unit="step", disable=not progress, leave=False):
                chosen = [u for u in range(len(members)) if sampler.random() < q]
                stats = dp_gradient(gsm, dp_opt, params, examples, [members[u] for u in chosen],
                                    cfg.batch_size, pad_id, device)
                seen.update(i for u in chosen for i in members[u])
                all_tokens += stats.tokens
                clipped += stats.clipped
                sampled += len(chosen)
                loss_sum, n_tok = stats.loss_sum, stats.target_tokens
                if prox is not None:
                    prox()
                last_lr = float(optimizer.param_groups[0]["lr"])
                lr_sum += last_lr
                optimizer.step()
                scheduler.step()
                dp_opt.zero_grad(set_to_none=True)
                state.record(1, global_round)
                total_loss += loss_sum
                total_tokens += n_tok
                if on_step is not None:
                    on_step(step, loss_sum / max(n_tok, 1))
    finally:
        gsm._close()  # remove the hooks: the cached model serves plain evaluation next
        model.eval()
    return DPResult(
        mean_loss=total_loss / total_tokens if total_tokens else math.nan, num_examples=len(seen),
        steps=todo, steps_wanted=wanted, tokens=all_tokens, seconds=time.perf_counter() - start,
        clipped_fraction=clipped / sampled if sampled else 0.0, epsilon=state.epsilon(),
        lr=last_lr, lr_sum=lr_sum, optimizer_state=run.optimizer_state(),
        optimizer_state_restored=run.restored,
    )


def _proximal(params: Sequence[torch.Tensor], proximal: tuple[float, Sequence[torch.Tensor]] | None,
              device: torch.device) -> Callable[[], None] | None:
    """Add FedProx's gradient ``mu (w - w_ref)`` to each parameter's (already noisy) gradient."""
    if proximal is None or proximal[0] == 0:
        return None
    mu, reference = proximal
    refs = [r.detach().to(device=device, dtype=p.dtype) for p, r in zip(params, reference)]

    def add() -> None:
        with torch.no_grad():
            for p, r in zip(params, refs):
                assert p.grad is not None  # the DP step left a (noisy) gradient on every parameter
                p.grad.add_(p.detach() - r, alpha=mu)

    return add


# ============================================================================ site-level DP
def clip_update(update: dict[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale a site's whole update (all tensors together) to L2 norm <= ``clip``; its norm."""
    norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values())))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (v * scale).astype(np.float32) for k, v in update.items()}, norm


def site_level_aggregate(
    reference: dict[str, np.ndarray], states: Sequence[dict[str, np.ndarray]], *, clip: float,
    noise_multiplier: float, rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Global adapter with site-level DP: ``ref + mean(clip(s_i - ref)) + N(0, (sigma C / m)^2)``.

    The mean is unweighted (a weighted mean would let a large site exceed the sensitivity
    ``C / m``), as in Flower's server-side fixed clipping and McMahan et al. (2018).

    Returns
    -------
    tuple
        (new global adapter, each site's update norm before clipping).
    """
    if not states:
        raise ValueError("site-level DP needs at least one site update")
    m = len(states)
    clipped, norms = [], []
    for state in states:
        update = {k: state[k] - reference[k] for k in reference}
        c, n = clip_update(update, clip)
        clipped.append(c)
        norms.append(n)
    std = noise_multiplier * clip / m
    out = {}
    for key, ref in reference.items():
        mean = sum(c[key] for c in clipped) / m
        out[key] = (ref + mean + rng.normal(0.0, std, size=ref.shape)).astype(np.float32)
    return out, norms


@dataclass
class SiteLevelLedger:
    """The server's ledger for site-level DP: one subsampled Gaussian release per round.

    The sampling rate of a round is the number of sites sampled over the sites available.
    Flower samples a fixed number of sites without replacement, while the accountant assumes
    Poisson sampling at that rate: the usual approximation in federated DP (as in TensorFlow
    Federated's and Flower's DP examples), stated in the README.
    """

    noise_multiplier: float
    clip: float
    delta: float
    mechanism: str = "rdp"
    history: list[list[float]] = field(default_factory=list)

    def record(self, sample_rate: float) -> None:
        """Add one round's release at ``sample_rate`` (merged with the last entry when equal)."""
        last = self.history[-1] if self.history else None
        if last is not None and last[0] == self.noise_multiplier and last[1] == sample_rate:
            self.history[-1][2] = int(self.history[-1][2]) + 1
        else:
            self.history.append([self.noise_multiplier, sample_rate, 1])

    @property
    def rounds(self) -> int:
        """Rounds released so far."""
        return int(sum(n for _, _, n in self.history))

    def epsilon(self) -> float:
        """Compute the epsilon spent so far at ``delta`` (:func:`epsilon_for`)."""
        return epsilon_for(self.history, self.delta, self.mechanism)

    def summary(self) -> dict[str, Any]:
        """Return the ledger as a JSON-ready dict: epsilon, delta, noise, clip, rounds, history."""
        return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "clip": self.clip, "rounds": self.rounds, "history": [list(h) for h in self.history]}


# ============================================================================ secure aggregation
def secagg_quantization_check(state: dict[str, np.ndarray], clipping_range: float = 8.0,
                              quantization_range: int = 1 << 22) -> dict[str, float | int]:
    """Check what Flower's SecAgg+ quantization would do to an adapter (its defaults as arguments).

    SecAgg+ clips every value to ``[-clipping_range, clipping_range]`` *silently*
    (``np.clip``) and stochastically rounds it to one of ``quantization_range`` levels, so a step
    of ``2 * clipping_range / quantization_range``. Returns how many values would be clipped,
    the largest magnitude, the step, and the step relative to the typical (median nonzero)
    magnitude: a ratio near or above 1 means quantization noise swamps the values.
    """
    values = np.concatenate([np.abs(np.asarray(v, dtype=np.float64)).ravel() for v in state.values()])
    step = 2 * clipping_range / quantization_range
    nonzero = values[values > 0]
    typical = float(np.median(nonzero)) if nonzero.size else 0.0
    return {"values": int(values.size), "clipped": int((values > clipping_range).sum()),
            "max_abs": float(values.max()) if values.size else 0.0, "step": step,
            "step_over_typical": step / typical if typical > 0 else math.inf}
