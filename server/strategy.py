"""FedAvg over LoRA adapters, with the checks a hospital network needs.

A thin subclass of Flower's :class:`~flwr.serverapp.strategy.FedAvg` that overrides hooks and
calls ``super()``:

- each round's settings (learning rate, local steps, the global round number, which survives a
  resume) travel in the message's ConfigRecord;
- site sampling is seeded per round, so a resumed run samples the same sites;
- a reply is rejected, logged with its site and excluded when it is an error, or when its
  adapter has other keys or shapes than the global one, or holds NaN/Inf;
- a round with fewer valid replies than ``min_train_sites`` fails loudly instead of silently
  aggregating one site;
- per-site metrics are kept for the run folder (site ids only: no report text ever).
"""

from __future__ import annotations

import math
import random
from logging import WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

SUM_KEYS = ("num-examples", "bytes-sent", "bytes-received", "tokens", "val-tokens", "cold-start")


class RoundFailed(RuntimeError):
    """Too few sites answered a round for its result to be trusted."""


def weighted_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of every metric; counts and bytes are summed instead."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weight_key]) for m in metrics]
    total = sum(weights) or 1.0
    out: dict[str, float | int] = {}
    for key in metrics[0].keys():
        values = [m[key] for m in metrics if key in m]
        if key in SUM_KEYS:
            out[key] = int(sum(values))  # type: ignore[arg-type]
        elif key != "site-index":
            out[key] = float(sum(w * float(v) for w, v in zip(weights, values)) / total)  # type: ignore[arg-type]
    out["num-sites"] = len(records)
    return MetricRecord(out)  # type: ignore[arg-type]


def _site_of(msg: Message) -> str:
    site = msg.content.config_records.get("site")
    return str(site["site-id"]) if site is not None else f"node-{msg.metadata.src_node_id}"


def _reason(msg: Message) -> str:
    reason = msg.error.reason  # optional in Flower's Error
    return reason[:200] if reason else f"error code {msg.error.code}, no reason given"


def _num_examples(msg: Message, key: str) -> float:
    rec = next(iter(msg.content.metric_records.values()), None)
    value = rec.get(key, 0) if rec is not None else 0
    return float(value) if isinstance(value, (int, float)) else 0.0


class FedmiraFedAvg(FedAvg):
    """FedAvg on adapters with per-round settings, reply checks and per-site metrics.

    Parameters
    ----------
    round_config_fn : callable
        ``(global_round) -> dict`` of settings sent to sites with each training message.
    round_offset : int
        Rounds already completed before this start (resume): Flower counts from 1 again,
        fedmira's metrics and checkpoints use ``round_offset + server_round``.
    evaluate_every, total_rounds : int
        Federated evaluation runs on rounds divisible by ``evaluate_every`` and on the last.
    seed : int
        Seed of site sampling (combined with the global round).
    """

    def __init__(
        self,
        *,
        round_config_fn: Callable[[int], dict[str, Any]],
        round_offset: int = 0,
        evaluate_every: int = 1,
        total_rounds: int = 1,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_metrics_aggr_fn=weighted_metrics,
                         evaluate_metrics_aggr_fn=weighted_metrics, **kwargs)
        self.round_config_fn = round_config_fn
        self.round_offset = round_offset
        self.evaluate_every = evaluate_every
        self.total_rounds = total_rounds
        self.seed = seed
        self.expected: dict[str, tuple[int, ...]] = {}
        self.site_metrics: dict[str, dict[int, dict[str, dict[str, Any]]]] = {"train": {}, "evaluate": {}}
        self.rejected: dict[int, list[dict[str, str]]] = {}
        self.aggregates: dict[str, dict[int, MetricRecord | None]] = {"train": {}, "evaluate": {}}

    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        g = self.global_round(server_round)
        self.expected = {k: tuple(a.shape) for k, a in arrays.items()}
        config = ConfigRecord({**dict(config), **self.round_config_fn(g), "global-round": g})
        random.seed(self.seed * 100003 + g)  # Flower samples with the global `random`
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        g = self.global_round(server_round)
        replies = list(replies)
        valid = [m for m in replies if not m.has_error() and self._adapter_ok(g, m)]
        for m in replies:
            if m.has_error():
                self._reject(g, m, f"site raised: {_reason(m)}")
        if len(valid) < self.min_train_nodes:
            raise RoundFailed(
                f"Round {g}: only {len(valid)} of {len(replies)} sites returned a usable adapter, "
                f"fewer than strategy.min_train_sites={self.min_train_nodes}. See the log above."
            )
        self._keep_site_metrics("train", g, valid)
        arrays, metrics = super().aggregate_train(server_round, valid)
        self.aggregates["train"][g] = metrics
        return arrays, metrics

    def _adapter_ok(self, g: int, msg: Message) -> bool:
        metrics = msg.content.metric_records
        if len(metrics) != 1 or self.weighted_by_key not in next(iter(metrics.values())):
            self._reject(g, msg, f"expected one MetricRecord with `{self.weighted_by_key}`")
            return False
        records = msg.content.array_records
        if len(records) != 1:
            self._reject(g, msg, f"expected one ArrayRecord, got {len(records)}")
            return False
        arrays = next(iter(records.values()))
        got = {k: tuple(a.shape) for k, a in arrays.items()}
        if got != self.expected:
            diff = sorted(set(got) ^ set(self.expected))[:2] or [
                k for k in got if got[k] != self.expected.get(k)][:2]
            self._reject(g, msg, f"adapter keys/shapes differ from the global adapter (e.g. {diff})")
            return False
        for key, arr in arrays.items():
            if not np.isfinite(arr.numpy()).all():
                self._reject(g, msg, f"adapter tensor {key} holds NaN/Inf")
                return False
        return True

    def _reject(self, g: int, msg: Message, why: str) -> None:
        site = _site_of(msg) if not msg.has_error() else f"node-{msg.metadata.src_node_id}"
        log(WARNING, "Round %d: excluded %s: %s", g, site, why)
        self.rejected.setdefault(g, []).append({"site": site, "reason": why})

    def _keep_site_metrics(self, kind: str, g: int, replies: list[Message]) -> None:
        per_site: dict[str, dict[str, Any]] = {}
        for m in replies:
            rec = next(iter(m.content.metric_records.values()), None)
            if rec is not None:
                per_site[_site_of(m)] = {k: v for k, v in rec.items() if not isinstance(v, list)}
        self.site_metrics[kind][g] = per_site

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        g = self.global_round(server_round)
        due = self.evaluate_every > 0 and (g % self.evaluate_every == 0 or g == self.total_rounds)
        if not due:
            return []
        # The same sites every evaluation round, so the validation curve compares like with like.
        random.seed(self.seed * 100003 + 7919)
        config = ConfigRecord({**dict(config), "global-round": g})
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        g = self.global_round(server_round)
        replies = list(replies)
        for m in replies:
            if m.has_error():
                self._reject(g, m, f"evaluation raised: {_reason(m)}")
        valid = [m for m in replies if not m.has_error()]
        self._keep_site_metrics("evaluate", g, valid)
        # A site without validation reports answers num-examples 0 and fewer metric keys;
        # Flower refuses to aggregate replies whose keys differ, so leave it out here.
        scored = [m for m in valid if _num_examples(m, self.weighted_by_key) > 0]
        if not scored:
            return None
        metrics = super().aggregate_evaluate(server_round, scored)
        self.aggregates["evaluate"][g] = metrics
        return metrics

    def round_record(self, g: int) -> dict[str, Any]:
        """Everything the run folder keeps about global round ``g`` (JSON-serialisable)."""
        def clean(m: MetricRecord | dict[str, Any] | None) -> dict[str, Any]:
            return {k: v for k, v in dict(m or {}).items() if not (isinstance(v, float) and math.isnan(v))}

        return {
            "train": clean(self.aggregates["train"].get(g)),
            "evaluate": clean(self.aggregates["evaluate"].get(g)),
            "train_sites": {s: clean(m) for s, m in self.site_metrics["train"].get(g, {}).items()},
            "evaluate_sites": {s: clean(m) for s, m in self.site_metrics["evaluate"].get(g, {}).items()},
            "rejected": self.rejected.get(g, []),
        }
