"""What one hospital does in a round, as plain functions (the ClientApp only wires them).

- :func:`load_site` reads a site's own folder (``train.jsonl``, ``val.jsonl``).
- :class:`ModelCache` keeps the base model loaded for the life of the process: a simulated or
  deployed site pays the model load once, not once per round.
- :func:`local_train` / :func:`local_evaluate` take the global adapter tensors and return new
  adapter tensors and metrics. Metrics are numbers only; report text never leaves.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, MutableMapping, TypedDict

import torch

from fedmira.common.adapters import adapter_num_bytes, get_adapter_state, set_adapter_state
from fedmira.common.aggregation import LORA_A, adapter_rank, truncate_adapter
from fedmira.common.config import ExperimentConfig, GenerateConfig, LoraConfig, ModelConfig, stable_hash
from fedmira.common.engine import TrainResult, encode_reports, evaluate_loss, generate, train_steps
from fedmira.common.errors import ConfigError, DataError
from fedmira.common.metrics import rouge_l
from fedmira.common.model import LoadedModel, apply_lora, load_base_model, set_lora_a_trainable
from fedmira.common.optim import Schedule, round_steps
from fedmira.common.parallel import parallel_train_steps, site_devices
from fedmira.common.privacy import AccountantState, DPResult, dp_train_steps, plan_state, unit_ids
from fedmira.common.prompts import RAG_TEMPLATES, Example
from fedmira.common.reports import Report, load_reports
from fedmira.common.retrieval import Neighbor, SiteIndex, neighbors_for
from fedmira.common.transport import state_payload_bytes


@dataclass
class SiteData:
    """A hospital's reports, already split; encoded examples are cached per tokenizer."""

    site_id: str
    train: list[Report]
    val: list[Report]
    _encoded: dict[str, list[Example]] = field(default_factory=dict, repr=False)
    _indexes: dict[str, SiteIndex] = field(default_factory=dict, repr=False)

    def examples(self, split: str, tokenizer: Any, cfg: ExperimentConfig, limit: int = 0) -> list[Example]:
        """Encode the reports of ``split`` (cached per split, limit and data settings)."""
        reports = self.reports(split, limit)
        key = f"{split}:{limit}:{stable_hash(cfg.locked_part()['data'])}"
        if key not in self._encoded:
            near = self.neighbors(split, cfg, limit)
            self._encoded[key] = encode_reports(reports, tokenizer, cfg.data, near)
        return self._encoded[key]

    def reports(self, split: str, limit: int = 0) -> list[Report]:
        """Return the ``train`` reports or else the ``val`` ones, the first ``limit`` when set."""
        reports = self.train if split == "train" else self.val
        return reports[:limit] if limit else reports

    def neighbors(self, split: str, cfg: ExperimentConfig,
                  limit: int = 0) -> list[tuple[Neighbor, ...]] | None:
        """Prior cases for ``site_aware_rag`` prompts, from this site's own train split only.

        The index is built here, at the site, from the site's reports and never leaves the
        process. Training reports are leave-one-out (never themselves, never their patient's).
        """
        if cfg.data.template not in RAG_TEMPLATES or cfg.data.neighbors == 0:
            return None
        if cfg.data.retriever not in self._indexes:
            self._indexes[cfg.data.retriever] = SiteIndex(self.train, cfg.data.retriever)
        return neighbors_for(self.reports(split, limit), self._indexes[cfg.data.retriever],
                             cfg.data.neighbors, leave_one_out=split == "train",
                             order=cfg.data.neighbor_order, pool=cfg.data.neighbor_pool)


def load_site(folder: str | Path, site_id: str | None = None) -> SiteData:
    """Read ``folder/train.jsonl`` and ``folder/val.jsonl`` (val may be absent)."""
    folder = Path(folder)
    train_path = folder / "train.jsonl"
    if not train_path.is_file():
        raise DataError(
            f"Site folder {folder} has no train.jsonl; run `fedmira partition` or check data-path.")
    train = load_reports(train_path, fmt="jsonl").reports
    val_path = folder / "val.jsonl"
    val = load_reports(val_path, fmt="jsonl").reports if val_path.is_file() else []
    if not train:
        raise DataError(f"Site folder {folder} holds no usable training reports.")
    return SiteData(site_id or folder.name, train, val)


@dataclass
class Worker:
    """A loaded base model with a LoRA adapter, ready for any site's round."""

    loaded: LoadedModel
    model: Any
    initial_load_s: float
    lora_key: str = ""


class ModelCache:
    """One base model per process, wrapped with the LoRA adapter each call asks for."""

    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}

    def get(self, model_cfg: ModelConfig, lora_cfg: LoraConfig, seed: int = 0) -> tuple[Worker, bool]:
        """Get the worker for these configs and whether this call loaded the base model (cold start).

        A simulation process serves sites of different LoRA ranks (hetero_svd): another LoRA
        shape only re-wraps the cached base model (PEFT ``unload``), it never reloads it.
        """
        key = stable_hash(repr(model_cfg))
        lora_key = stable_hash([repr(lora_cfg), seed])
        worker = self._workers.get(key)
        if worker is not None:
            if worker.lora_key != lora_key:
                worker.model = apply_lora(worker.model.unload(), lora_cfg, seed=seed)
                worker.lora_key = lora_key
            return worker, False
        start = time.perf_counter()
        loaded = load_base_model(model_cfg)
        model = apply_lora(loaded.model, lora_cfg, seed=seed)
        self._workers.clear()  # one model per process: a new config replaces the old one
        self._workers[key] = Worker(loaded, model, time.perf_counter() - start, lora_key)
        return self._workers[key], True


#: The message a node answers with its site id only (``@app.query("site")`` in the ClientApp), so
#: the coordinator samples by site, not by the random node ids of a run (server/site_order.py).
QUERY_SITE = "query.site"

#: Flags a strategy puts in every message to a site (``server/strategy.py`` ``client_flags``):
#: ``own-rank`` (hetero_svd) lets the site train at its own LoRA rank; ``freeze-lora-a``
#: (ffa_lora) keeps the A factors at the shared initialisation and sends B only.
CLIENT_FLAGS = ("own-rank", "freeze-lora-a")

#: The flags of the strategies that send any (their classes in ``server/`` take theirs from
#: here), for the places that act out a round without a message: a hospital's dry run and
#: ``fedmira audit``.
STRATEGY_FLAGS: dict[str, dict[str, bool]] = {
    "ffa_lora": {"freeze-lora-a": True},
    "hetero_svd": {"own-rank": True},
}


def round_flags(strategy: str) -> dict[str, bool]:
    """Return the flags a message of ``strategy`` carries (none for most)."""
    return dict(STRATEGY_FLAGS.get(strategy, {}))


def site_rank(cfg: ExperimentConfig, node_config: Mapping[str, Any], index: int, *, own_rank: bool) -> int:
    """Return the LoRA rank this site trains at.

    Only when the message allows ``own_rank`` (hetero_svd) may ranks differ: then a deployed
    site's node config ``lora-rank`` wins, else ``strategy.site_ranks`` cycled over the site
    index, else ``lora.r``. Otherwise the strategy averages same-shaped adapters, so every site
    uses ``lora.r``.

    Raises
    ------
    ConfigError
        When the rank is not an integer in ``[1, lora.r]``.
    """
    if not own_rank:
        return cfg.lora.r
    if "lora-rank" in node_config:
        value = node_config["lora-rank"]
        value = int(value) if isinstance(value, str) and value.strip().isdigit() else value
        where = "node config `lora-rank`"
    elif cfg.strategy.site_ranks:
        value = cfg.strategy.site_ranks[index % len(cfg.strategy.site_ranks)]
        where = "strategy.site_ranks"
    else:
        return cfg.lora.r
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cfg.lora.r:
        raise ConfigError(f"{where} = {value!r} for this site must be an integer in [1, lora.r={cfg.lora.r}] "
                          "(lora.r is the global adapter's rank).")
    return value


def site_lora(cfg: ExperimentConfig, rank: int) -> LoraConfig:
    """``cfg.lora`` at this site's rank (alpha unchanged: PEFT scales by alpha / rank)."""
    return cfg.lora if rank == cfg.lora.r else dataclasses.replace(cfg.lora, r=rank)


def fit_rank(state: Mapping[str, torch.Tensor], rank: int) -> Mapping[str, torch.Tensor]:
    """Cut the global adapter to this site's rank (hetero_svd's first message is at full rank)."""
    if adapter_rank(state) <= rank:
        return state
    arrays = truncate_adapter({k: v.numpy() for k, v in state.items()}, rank)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def set_threads(cfg: ExperimentConfig) -> None:
    """CPU threads for this site's work: ``train.threads``, else the simulated site's CPU share.

    Ray starts simulation workers with a single OpenMP thread, which leaves cores idle when a
    site was given several (``mode.client_cpus``); a deployed site keeps torch's default.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    elif cfg.mode.name == "simulation":
        torch.set_num_threads(cfg.mode.client_cpus)


class _Position(TypedDict):
    """Where a round's training call sits in the run's schedule (``train_steps`` keywords)."""

    global_step: int
    total_steps: int | None


def local_train(
    worker: Worker, site: SiteData, cfg: ExperimentConfig, global_state: Mapping[str, torch.Tensor],
    *, lr: float, steps: int, seed: int, proximal_mu: float = 0.0,
    ledger: AccountantState | None = None, global_round: int = 0,
    optimizer_store: MutableMapping[str, torch.Tensor] | None = None, freeze_a: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, float | int]]:
    """Train the global adapter on the site's train split; returns the adapter to send + metrics.

    The worker's LoRA rank is the site's (see :func:`site_rank`); a global adapter of higher
    rank is cut to it first. ``proximal_mu > 0`` adds FedProx's term around the global adapter.
    With ``freeze_a`` (the message's ``freeze-lora-a``, sent by ffa_lora) the A factors stay
    frozen and only the B tensors are returned.
    With ``privacy.enabled`` the round is DP-SGD and ``ledger`` (planned by :func:`plan_ledger`)
    records the released steps; a site whose budget is spent trains no step and reports
    ``num-examples`` 0 with ``dp-budget-spent`` 1, so the server leaves it out of the mean.

    With ``train.epochs`` the round takes that many passes over the site's reports. Round
    ``global_round`` continues the run's learning-rate schedule (it does not restart), and with
    ``train.keep_optimizer_state`` AdamW resumes from the moments in ``optimizer_store`` (the
    node's own state; replaced with the new moments, never part of the reply).
    """
    set_threads(cfg)
    ffa = freeze_a
    rank = worker.model.peft_config["default"].r
    set_adapter_state(worker.model, fit_rank(global_state, rank))
    set_lora_a_trainable(worker.model, not ffa)
    tok = worker.loaded.tokenizer
    examples = site.examples("train", tok, cfg)
    reference = [p.detach().clone() for p in worker.model.parameters() if p.requires_grad]
    proximal = (proximal_mu, reference) if proximal_mu > 0 else None
    steps = round_steps(cfg.train, len(examples), steps)
    schedule = round_schedule(global_round, steps, cfg.strategy.rounds)
    keep = cfg.train.keep_optimizer_state and optimizer_store is not None
    saved = dict(optimizer_store) if keep and optimizer_store else None
    position: _Position = {"global_step": schedule.offset, "total_steps": schedule.total}
    dp_metrics: dict[str, float | int] = {}
    result: TrainResult | DPResult
    if cfg.privacy.enabled:
        if ledger is None:
            raise ValueError("privacy.enabled needs the site's privacy ledger (see plan_ledger)")
        result, dp_metrics = _dp_train(worker, site, cfg, examples, ledger, lr=lr, steps=steps, seed=seed,
                                       global_round=global_round, proximal=proximal, position=position,
                                       optimizer_state=saved)
    elif len(devices := site_devices(cfg.train.devices, cfg.model.device)) > 1:
        # train.devices: the round runs in one process per device; the site's own model takes
        # the result, so what follows (the reply, evaluation) is as after a one-process round.
        result, trained = parallel_train_steps(
            cfg.model, site_lora(cfg, rank), get_adapter_state(worker.model), examples, cfg.train, devices,
            int(tok.pad_token_id), freeze_a=ffa, seed=seed, lr=lr, steps=steps, proximal=proximal,
            autocast=worker.loaded.autocast, optimizer_state=saved, **position,
        )
        set_adapter_state(worker.model, trained)
    else:
        result = train_steps(
            worker.model, examples, cfg.train, worker.loaded.device, int(tok.pad_token_id),
            seed=seed, lr=lr, steps=steps, proximal=proximal, autocast=worker.loaded.autocast,
            optimizer_state=saved, **position,
        )
    if keep and optimizer_store is not None and result.optimizer_state:
        optimizer_store.clear()
        optimizer_store.update(result.optimizer_state)
    state = get_adapter_state(worker.model)
    if ffa:  # A is the shared seeded init the server already holds: sending it is waste
        state = {k: v for k, v in state.items() if not k.endswith(LORA_A)}
    metrics: dict[str, float | int] = {
        "num-examples": len(examples),
        "train-loss": result.mean_loss,
        "tokens": result.tokens,
        "tokens-per-s": result.tokens_per_s,
        "train-s": result.seconds,
        "bytes-sent": state_payload_bytes(state, cfg.strategy.transport_dtype),
        "bytes-received": adapter_num_bytes(global_state),
        "lora-rank": rank,
        "steps": result.steps,
        "lr": result.lr,
        "lr-sum": result.lr_sum,
        **({"opt-state-restored": int(result.optimizer_state_restored)}
           if cfg.train.keep_optimizer_state else {}),
        **dp_metrics,
    }
    if dp_metrics and dp_metrics["dp-steps"] == 0:  # budget spent: nothing trained, weight 0
        metrics["num-examples"] = 0
    return state, metrics


def round_schedule(global_round: int, steps: int, rounds: int) -> Schedule:
    """Place round ``global_round`` (1-based) of ``rounds``, ``steps`` each, in the run's schedule.

    Outside a federated run (round 0) the call has its own schedule.
    """
    if global_round < 1:
        return Schedule()
    return Schedule(offset=(global_round - 1) * steps, total=max(rounds, global_round) * steps)


def plan_ledger(ledger: AccountantState | None, site: SiteData, cfg: ExperimentConfig) -> AccountantState:
    """Return the site's ledger, planned at its first DP round (noise solved for its own data size)."""
    if ledger is not None and ledger.planned:
        return ledger
    units = len(set(unit_ids(site.train, cfg.privacy.unit)))
    per_round = round_steps(cfg.train, len(site.train))
    return plan_state(cfg.privacy, cfg.train, units, cfg.strategy.rounds * per_round)


def _dp_train(
    worker: Worker, site: SiteData, cfg: ExperimentConfig, examples: list[Example], ledger: AccountantState,
    *, lr: float, steps: int, seed: int, global_round: int,
    proximal: tuple[float, list[torch.Tensor]] | None, position: _Position,
    optimizer_state: dict[str, torch.Tensor] | None,
) -> tuple[DPResult, dict[str, float | int]]:
    """DP-SGD for this round; the ledger (updated in place) and the numbers the site reports."""
    p = cfg.privacy
    result = dp_train_steps(
        worker.model, examples, unit_ids(site.train, p.unit), cfg.train, ledger, worker.loaded.device,
        int(worker.loaded.tokenizer.pad_token_id), max_grad_norm=p.max_grad_norm, budget=p.budget,
        seed=seed, lr=lr, steps=steps, global_round=global_round, secure_mode=p.secure_mode,
        proximal=proximal, optimizer_state=optimizer_state, clipping=p.clipping, **position,
    )
    return result, {
        "dp-epsilon": result.epsilon, "dp-delta": ledger.delta, "dp-steps": result.steps,
        "dp-steps-total": ledger.steps, "dp-noise-multiplier": ledger.noise_multiplier,
        "dp-sample-rate": ledger.sample_rate, "dp-clipped-fraction": result.clipped_fraction,
        "dp-budget": p.budget, "dp-budget-spent": int(result.budget_spent),
    }


def local_evaluate(
    worker: Worker, site: SiteData, cfg: ExperimentConfig, global_state: Mapping[str, torch.Tensor],
) -> dict[str, float | int]:
    """Evaluate the global adapter: validation loss (and ROUGE-L on a small decoded sample)."""
    set_threads(cfg)
    set_adapter_state(worker.model, fit_rank(global_state, worker.model.peft_config["default"].r))
    tok, device = worker.loaded.tokenizer, worker.loaded.device
    start = time.perf_counter()
    examples = site.examples("val", tok, cfg, limit=cfg.eval.max_loss_samples)
    if not examples:
        return {"num-examples": 0, "eval-s": 0.0}
    loss, n_tokens = evaluate_loss(worker.model, examples, device, int(tok.pad_token_id), cfg.eval.batch_size,
                                   autocast=worker.loaded.autocast)
    metrics: dict[str, float | int] = {"num-examples": len(examples), "val-loss": loss,
                                       "val-tokens": n_tokens}
    sample = site.val[: cfg.eval.rouge_samples]
    if sample:
        gen = GenerateConfig(max_new_tokens=cfg.eval.max_new_tokens, num_beams=1,
                             batch_size=cfg.eval.batch_size)
        near = site.neighbors("val", cfg, cfg.eval.rouge_samples)
        hyps = generate(worker.model, tok, sample, cfg.data, gen, device, neighbors=near,
                        autocast=worker.loaded.autocast)
        metrics["rouge-l"] = sum(rouge_l(r.impression, h) for r, h in zip(sample, hyps)) / len(sample)
    metrics["eval-s"] = time.perf_counter() - start
    return metrics
