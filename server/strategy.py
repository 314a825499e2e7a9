"""FedAvg over LoRA adapters, with the checks a hospital network needs; the base of every strategy.

Every fedmira strategy is two thin layers around Flower's own strategy classes:

- :class:`FedmiraBase` (top) overrides hooks and calls ``super()``:

  - each round's settings (learning rate, local steps, the global round number, which survives
    a resume) travel in the message's ConfigRecord;
  - site sampling is seeded per round, so a resumed run samples the same sites;
  - a reply is rejected, logged with its site and excluded when it is an error, when its
    adapter has other keys or shapes than expected, holds NaN/Inf or an undecodable dtype, or
    when its update norm is far beyond the others' (``norm_factor``); sites that did not answer
    before the round timeout are logged as such;
  - a round with fewer valid replies than ``min_train_sites`` fails loudly instead of silently
    aggregating one site;
  - per-site metrics and bytes up/down (per round and cumulative) are kept for the run folder
    (site ids only: no report text ever).

- :class:`AdapterAggregation` (bottom) replaces the weighted mean of Flower's ``FedAvg`` with
  ``common.aggregation`` on float32-decoded replies (``mean | median | trimmed_mean``; replies
  may arrive in 16 bits). Flower's averaging would read bfloat16 bit patterns as integers.

Flower's strategy for an algorithm sits between the two, so its own logic runs unchanged:
``class FedmiraFedProx(FedmiraBase, FedProx, AdapterAggregation)`` gives the method order
FedmiraBase -> FedProx -> AdapterAggregation -> FedAvg (tests/unit/test_strategies.py checks
it). :class:`FedmiraFedAvg` is the plain case.
"""

from __future__ import annotations

import math
import random
import secrets
from logging import INFO, WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, SType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmira.common.aggregation import ArrayDict, combine, norm_outliers, update_norms
from fedmira.common.privacy import SiteLevelLedger, site_level_aggregate
from fedmira.common.transport import decode_array, npy_values, payload_bytes

SUM_KEYS = ("num-examples", "bytes-sent", "bytes-received", "tokens", "val-tokens", "cold-start")
NOT_AVERAGED = ("site-index", "lora-rank")  # identifiers, not quantities


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
        elif key not in NOT_AVERAGED:
            out[key] = float(sum(w * float(v) for w, v in zip(weights, values)) / total)  # type: ignore[arg-type]
    out["num-sites"] = len(records)
    return MetricRecord(out)  # type: ignore[arg-type]


class _AllowedGrid:
    """A Grid whose ``get_node_ids`` lists only allow-listed nodes; everything else is the
    wrapped Grid's."""

    def __init__(self, grid: Grid, allowed: frozenset[int], refuse: Callable[[int], None]) -> None:
        self._grid, self._allowed, self._refuse = grid, allowed, refuse

    def get_node_ids(self) -> list[int]:
        nodes = list(self._grid.get_node_ids())
        for node in nodes:
            if node not in self._allowed:
                self._refuse(node)
        return [n for n in nodes if n in self._allowed]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _site_of(msg: Message) -> str:
    site = msg.content.config_records.get("site")
    return str(site["site-id"]) if site is not None else f"node-{msg.metadata.src_node_id}"


def _reason(msg: Message) -> str:
    reason = msg.error.reason  # optional in Flower's Error
    return reason[:200] if reason else f"error code {msg.error.code}, no reason given"


def _metric(msg: Message, key: str) -> float | None:
    """A numeric metric of the reply, or None when it has none."""
    rec = next(iter(msg.content.metric_records.values()), None)
    value = rec.get(key) if rec is not None else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _num_examples(msg: Message, key: str) -> float:
    rec = next(iter(msg.content.metric_records.values()), None)
    value = rec.get(key, 0) if rec is not None else 0
    return float(value) if isinstance(value, (int, float)) else 0.0


def array_values(arr: Array) -> np.ndarray:
    """An Array's values: straight from its ``.npy`` bytes when possible, else ``Array.numpy()``."""
    if arr.stype == SType.NUMPY:
        values = npy_values(arr.data, arr.dtype, tuple(arr.shape))
        if values is not None:
            return values
    return arr.numpy()


def decode_record(record: ArrayRecord) -> ArrayDict:
    """Every tensor of an ArrayRecord as float32 NumPy arrays (16-bit transport decoded)."""
    return {k: decode_array(array_values(a)) for k, a in record.items()}


def _payload(record: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's tensors on the wire (at whatever dtype they travel)."""
    return sum(payload_bytes(tuple(a.shape), a.dtype) for a in record.values())


def _as_float32(arrays: ArrayRecord) -> ArrayRecord:
    """The global adapter stays float32 whatever a layer computed (Flower's FedAdam promotes to
    float64 under NumPy 2, which would double the downlink and the checkpoints)."""
    if all(a.dtype == "float32" for a in arrays.values()):
        return arrays
    return ArrayRecord({k: Array(a.numpy().astype(np.float32)) for k, a in arrays.items()})


class AdapterStrategy(FedAvg):
    """What both layers share: settings and each reply's adapter, decoded to float32 once."""

    aggregation: str = "mean"
    trim_fraction: float = 0.1
    norm_factor: float = 10.0

    def reply_state(self, msg: Message) -> ArrayDict:
        """The reply's adapter tensors as float32 NumPy arrays (cached for the round)."""
        cache: dict[int, ArrayDict] = self.__dict__.setdefault("_states", {})
        if id(msg) not in cache:
            cache[id(msg)] = decode_record(next(iter(msg.content.array_records.values())))
        return cache[id(msg)]

    def forget_replies(self) -> None:
        """Drop the decoded replies (called once a round is aggregated)."""
        self.__dict__.setdefault("_states", {}).clear()


class AdapterAggregation(AdapterStrategy):
    """Bottom layer: aggregates the (already checked) replies with ``common.aggregation``."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies:
            return None, None
        states = [self.reply_state(m) for m in replies]
        weights = [_num_examples(m, self.weighted_by_key) for m in replies]
        arrays = self.aggregate_arrays(states, weights)
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)
        return ArrayRecord({k: Array(v) for k, v in arrays.items()}), metrics

    def aggregate_arrays(self, states: list[ArrayDict], weights: list[float]) -> ArrayDict:
        """Combine same-shaped adapters (ffa_lora and hetero_svd override this).

        With site-level DP the combination is the clipped, noised, unweighted mean of the
        updates around the global adapter (``common.privacy.site_level_aggregate``).
        """
        site_dp: SiteLevelLedger | None = getattr(self, "site_dp", None)
        if site_dp is not None:
            glob: ArrayDict = getattr(self, "global_arrays")  # noqa: B009  (a sibling's; composition: issue 15)
            reference = {k: glob[k] for k in states[0]}
            out, _ = site_level_aggregate(reference, states, clip=site_dp.clip,
                                          noise_multiplier=site_dp.noise_multiplier, rng=self.dp_rng())
            return out
        return combine(states, weights, self.aggregation, self.trim_fraction)

    def dp_rng(self) -> np.random.Generator:
        """Server noise: seeded per round for research runs, from OS entropy in secure mode."""
        if getattr(self, "secure_mode", False):
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng([getattr(self, "seed", 0), getattr(self, "current_round", 0), 7])


class FedmiraBase(AdapterStrategy):
    """Top layer: per-round settings, reply checks, per-site metrics and communication bytes.

    Every training and evaluation message carries :attr:`client_flags`: what the site must do
    differently for this algorithm (freeze A, train at its own rank). The client obeys them; it
    never looks at the strategy's name.

    Parameters
    ----------
    round_config_fn : callable
        ``(global_round) -> dict`` of settings sent to sites with each training message.
    round_offset : int
        Rounds already completed before this start (resume): Flower counts from 1 again,
        fedmira's metrics and checkpoints use ``round_offset + server_round``. The layers below
        receive the global round in ``aggregate_train`` (FedAdam's bias correction counts it).
    evaluate_every, total_rounds : int
        Federated evaluation runs on rounds divisible by ``evaluate_every`` and on the last.
    seed : int
        Seed of site sampling (combined with the global round).
    aggregation, trim_fraction : str, float
        How replies are combined: ``mean | median | trimmed_mean`` (see common.aggregation).
    norm_factor : float
        Reject an update whose norm exceeds this factor x the others' median (0: off).
    comm_offset : tuple of int
        Bytes (up, down) of the rounds committed before a resume, for cumulative totals.
    site_dp : SiteLevelLedger, optional
        Site-level DP: clip each update, unweighted mean, Gaussian noise; its epsilon is
        accounted per round. Norm-outlier rejection is off then (clipping bounds every site).
    secure_mode : bool
        Server noise from OS entropy instead of the run seed.
    """

    def __init__(
        self,
        *,
        round_config_fn: Callable[[int], dict[str, Any]],
        round_offset: int = 0,
        evaluate_every: int = 1,
        total_rounds: int = 1,
        seed: int = 0,
        aggregation: str = "mean",
        trim_fraction: float = 0.1,
        norm_factor: float = 10.0,
        comm_offset: tuple[int, int] = (0, 0),
        site_dp: SiteLevelLedger | None = None,
        secure_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_metrics_aggr_fn=weighted_metrics,
                         evaluate_metrics_aggr_fn=weighted_metrics, **kwargs)
        self.round_config_fn = round_config_fn
        self.round_offset = round_offset
        self.evaluate_every = evaluate_every
        self.total_rounds = total_rounds
        self.seed = seed
        self.aggregation, self.trim_fraction, self.norm_factor = aggregation, trim_fraction, norm_factor
        self.comm_offset = comm_offset
        self.current_round = round_offset
        self.expected: dict[str, tuple[int, ...]] = {}
        self.global_arrays: ArrayDict = {}
        self.sent_train: set[int] = set()
        #: The instructions of the round in flight (their ids are set when the grid pushes
        #: them), to tell which node an error reply of the SuperLink itself is about.
        self._instructions: list[Message] = []
        self.node_sites: dict[int, str] = {}
        #: Deployment: node id -> hospital name of the allow-list, to name a node that has not
        #: replied yet (a site lost in round 1 of a resumed run); see ``name_of``.
        self.node_names: dict[int, str] = {}
        self.comm: dict[int, dict[str, dict[int, int]]] = {}
        self.site_metrics: dict[str, dict[int, dict[str, dict[str, Any]]]] = {"train": {}, "evaluate": {}}
        self.rejected: dict[int, list[dict[str, Any]]] = {}
        self.aggregates: dict[str, dict[int, MetricRecord | None]] = {"train": {}, "evaluate": {}}
        self._norms: dict[int, float] = {}
        self.site_dp, self.secure_mode = site_dp, secure_mode
        self.site_epsilon: dict[str, float] = {}  # last epsilon each site reported (record-level DP)
        self.available = 0
        #: Deployment: the node ids of the allow-listed hospitals (re-read every round); None:
        #: every node the SuperLink admitted takes part (simulation).
        self.allowed_nodes: Callable[[], frozenset[int]] | None = None

    #: Flags every message to a site carries (see :data:`common.site.CLIENT_FLAGS`).
    client_flags: dict[str, bool] = {}

    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    # ------------------------------------------------------------------ hooks for subclasses
    def expected_shapes(self, arrays: ArrayRecord) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a reply must have, given the global adapter sent."""
        return {k: tuple(a.shape) for k, a in arrays.items()}

    def expected_for(self, msg: Message, arrays: ArrayRecord) -> dict[str, tuple[int, ...]]:
        """Keys and shapes this particular reply must have (hetero_svd: at the site's rank)."""
        return self.expected

    def reference_for(self, state: ArrayDict) -> ArrayDict:
        """What the site started from, to measure its update (zero if unknown)."""
        return {k: self.global_arrays.get(k, np.zeros_like(v)) for k, v in state.items()}

    def personalize(self, messages: list[Message]) -> list[Message]:
        """Per-site payloads (hetero_svd: each site's rank); the same message for all here."""
        return messages

    def strategy_state(self) -> tuple[ArrayDict, dict[str, str]] | None:
        """Server state to checkpoint with each round (server optimizers); None: stateless."""
        return None

    def load_strategy_state(self, tensors: ArrayDict, metadata: dict[str, str]) -> None:
        """Restore :meth:`strategy_state` on resume."""
        raise ValueError(f"{type(self).__name__} keeps no server state, but a strategy state was found")

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        g = self.global_round(server_round)
        self.current_round = g
        self.expected = self.expected_shapes(arrays)
        self.global_arrays = decode_record(arrays)
        config = ConfigRecord({**dict(config), **self.round_config_fn(g), **self.client_flags,
                               "global-round": g})
        random.seed(self.seed * 100003 + g)  # Flower samples with the global `random`
        grid = self._allowed_grid(g, grid)
        messages = self.personalize(list(super().configure_train(server_round, arrays, config, grid)))
        self.available = max(len(list(grid.get_node_ids())), len(messages), 1)
        self.sent_train = {m.metadata.dst_node_id for m in messages}
        self._instructions = messages
        self._count(g, "down", messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        g = self.global_round(server_round)
        self.current_round = g
        replies = self._listed_replies(g, list(replies))
        self._note_replies(g, replies)
        valid = [m for m in replies if not m.has_error() and self._adapter_ok(g, m)]
        self._note_epsilons(valid)
        idle = [m for m in valid if _num_examples(m, self.weighted_by_key) == 0]
        for m in idle:
            log(INFO, "Round %d: %s trained no step: its privacy budget is spent", g, _site_of(m))
        valid = [m for m in valid if m not in idle]
        valid = self._drop_outliers(g, valid) if self.site_dp is None else valid
        if len(valid) + len(idle) < self.min_train_nodes:  # a spent budget is an answer, not a failure
            self.forget_replies()
            raise RoundFailed(
                f"Round {g}: only {len(valid) + len(idle)} of {max(len(self.sent_train), len(replies))} "
                f"sampled sites returned a usable adapter, fewer than strategy.min_train_sites="
                f"{self.min_train_nodes}{self._exclusions(g)}. Bring the sites back (or lower "
                "strategy.min_train_sites), then resume the run."
            )
        if not valid:
            self._keep_site_metrics("train", g, idle)
            self.forget_replies()
            log(WARNING, "Round %d: every sampled site has spent its privacy budget; the global "
                         "adapter is unchanged", g)
            self.aggregates["train"][g] = None
            return ArrayRecord({k: Array(v) for k, v in self.global_arrays.items()}), None
        self._keep_site_metrics("train", g, valid + idle)
        try:
            arrays, metrics = super().aggregate_train(g, valid)
        finally:
            self.forget_replies()
        if self.site_dp is not None:
            self.site_dp.record(max(len(self.sent_train), len(valid)) / self.available)  # sampling rate
        arrays = _as_float32(arrays) if arrays is not None else None
        self.aggregates["train"][g] = metrics
        return arrays, metrics

    def _note_replies(self, g: int, replies: list[Message]) -> None:
        """Learn node -> site, count upload bytes, log errors and sites that never answered."""
        unknown = 0  # SuperLink error replies whose node cannot be told: among the silent below
        for m in replies:
            if self._from_superlink(m) and self.node_of(m) == SUPERLINK_NODE_ID:
                unknown += 1
            elif m.has_error():
                self._reject(g, m, f"{'unavailable' if self._from_superlink(m) else 'site raised'}: {_reason(m)}")
            else:
                self.node_sites[m.metadata.src_node_id] = _site_of(m)
        self._count(g, "up", [m for m in replies if not m.has_error()])
        answered = {self.node_of(m) for m in replies}
        why = "no reply before the round timeout (strategy.round_timeout_s)"
        if unknown:
            why = "no reply: the SuperLink reported it unavailable or the round timeout passed"
        for node in sorted(self.sent_train - answered):
            site = self.name_of(node)
            log(WARNING, "Round %d: excluded %s: %s", g, site, why)
            self._record_rejection(g, site, node, why)

    def _note_epsilons(self, replies: list[Message]) -> None:
        """Remember each site's reported DP epsilon (sites report it only when sampled)."""
        for m in replies:
            rec = next(iter(m.content.metric_records.values()), {})
            if "dp-epsilon" in rec:
                self.site_epsilon[_site_of(m)] = float(rec["dp-epsilon"])  # type: ignore[arg-type]

    def privacy_record(self) -> dict[str, Any]:
        """Epsilon so far: per site (record-level, last reported) and over sites (site-level)."""
        out: dict[str, Any] = {}
        if self.site_epsilon:
            out["record_level"] = {"max_epsilon": max(self.site_epsilon.values()),
                                   "sites": dict(sorted(self.site_epsilon.items()))}
        if self.site_dp is not None:
            out["site_level"] = self.site_dp.summary()
        return out

    def restore_privacy(self, record: dict[str, Any]) -> None:
        """Continue the privacy bookkeeping of a resumed run from its last committed round."""
        self.site_epsilon.update(record.get("record_level", {}).get("sites", {}))
        history = record.get("site_level", {}).get("history")
        if self.site_dp is not None and history:
            self.site_dp.history = [list(h) for h in history]

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
        expected = self.expected_for(msg, arrays)
        got = {k: tuple(a.shape) for k, a in arrays.items()}
        if got != expected:
            diff = sorted(set(got) ^ set(expected))[:2] or [k for k in got if got[k] != expected.get(k)][:2]
            self._reject(g, msg, f"adapter keys/shapes differ from the global adapter (e.g. {diff})")
            return False
        return self._values_ok(g, msg)

    def _values_ok(self, g: int, msg: Message) -> bool:
        """Decodable (float or bfloat16 bits) and finite; decoding is kept for aggregation."""
        try:
            state = self.reply_state(msg)
        except (ValueError, TypeError) as exc:  # an undecodable dtype or a corrupt payload
            self._reject(g, msg, f"adapter tensor not readable: {exc}")
            return False
        for key, arr in state.items():
            if not np.isfinite(arr).all():
                self._reject(g, msg, f"adapter tensor {key} holds NaN/Inf")
                return False
        return True

    def _drop_outliers(self, g: int, valid: list[Message]) -> list[Message]:
        """Reject replies whose update norm is > norm_factor x the median of the others."""
        if self.norm_factor <= 0 or len(valid) < 2:
            return valid
        states = [self.reply_state(m) for m in valid]
        norms = update_norms(states, [self.reference_for(s) for s in states])
        self._norms = {id(m): n for m, n in zip(valid, norms)}
        # Sites that did different work (train.epochs: steps in proportion to data; warm-up)
        # move different distances; AdamW moves about lr per step, so when every reply says
        # how much lr it spent, norms are compared per unit of it.
        work = [_metric(m, "lr-sum") for m in valid]
        per_lr = all(w is not None and w > 0 for w in work)
        scores = [n / w for n, w in zip(norms, work)] if per_lr else norms  # type: ignore[operator]
        what = "update norm per unit of learning rate" if per_lr else "update norm"
        kept = []
        for i, outlier in enumerate(norm_outliers(scores, self.norm_factor)):
            if not outlier:
                kept.append(valid[i])
                continue
            others = float(np.median(scores[:i] + scores[i + 1:]))
            self._reject(g, valid[i], f"{what} {scores[i]:.4g} > strategy.norm_factor="
                                      f"{self.norm_factor:g} x the others' median {others:.4g}")
        return kept

    @staticmethod
    def _from_superlink(msg: Message) -> bool:
        """An error reply the SuperLink wrote itself (node unavailable, message expired): its
        source is Flower's SUPERLINK_NODE_ID, not the node it is about."""
        return msg.has_error() and msg.metadata.src_node_id == SUPERLINK_NODE_ID

    def node_of(self, msg: Message) -> int:
        """The node a reply is about: its sender, or for the SuperLink's own error reply the
        node the answered instruction went to."""
        if self._from_superlink(msg):
            for ins in self._instructions:
                if ins.metadata.message_id and ins.metadata.message_id == msg.metadata.reply_to_message_id:
                    return int(ins.metadata.dst_node_id)
        return int(msg.metadata.src_node_id)

    def _reject(self, g: int, msg: Message, why: str) -> None:
        node = self.node_of(msg)
        site = self.name_of(node) if msg.has_error() else _site_of(msg)
        log(WARNING, "Round %d: excluded %s: %s", g, site, why)
        self._record_rejection(g, site, node, why)

    def _exclusions(self, g: int) -> str:
        """``; excluded: a (why), b (why)`` for round ``g``'s exclusions, one per node."""
        seen: dict[Any, str] = {}
        for r in self.rejected.get(g, []):
            seen.setdefault(r.get("node", r["site"]), f"{r['site']} ({r['reason']})")
        return f"; excluded: {', '.join(seen.values())}" if seen else ""

    def name_of(self, node: int) -> str:
        """A node's site id as it last reported it, else its allow-list name, else ``node-N``."""
        return self.node_sites.get(node) or self.node_names.get(node) or f"node-{node}"

    def _record_rejection(self, g: int, site: str, node: int, why: str) -> None:
        """One entry per exclusion; the node id makes a site excluded twice in a round (its
        training timed out and its evaluation failed) count once (``excluded_count``)."""
        self.rejected.setdefault(g, []).append({"site": site, "node": int(node), "reason": why})

    def _keep_site_metrics(self, kind: str, g: int, replies: list[Message]) -> None:
        per_site: dict[str, dict[str, Any]] = {}
        for m in replies:
            rec = next(iter(m.content.metric_records.values()), None)
            if rec is not None:
                per_site[_site_of(m)] = {k: v for k, v in rec.items() if not isinstance(v, list)}
                if kind == "train" and id(m) in self._norms:
                    per_site[_site_of(m)]["update-norm"] = self._norms[id(m)]
        self._norms = {}
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
        config = ConfigRecord({**dict(config), **self.client_flags, "global-round": g})
        grid = self._allowed_grid(g, grid)
        messages = self.personalize(list(super().configure_evaluate(server_round, arrays, config, grid)))
        self._instructions = messages
        self._count(g, "down", messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        g = self.global_round(server_round)
        replies = self._listed_replies(g, list(replies))
        for m in replies:
            if self._from_superlink(m) and self.node_of(m) == SUPERLINK_NODE_ID:
                continue  # about a node that cannot be told; it is simply not among the scored
            if m.has_error():
                self._reject(g, m, f"evaluation {'unavailable' if self._from_superlink(m) else 'raised'}: "
                                   f"{_reason(m)}")
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

    # ------------------------------------------------------------------ allow-list
    def _allowed_grid(self, g: int, grid: Grid) -> Grid:
        """``grid`` whose node list holds only allow-listed nodes (others refused and logged)."""
        if self.allowed_nodes is None:
            return grid
        return _AllowedGrid(grid, self.allowed_nodes(), lambda node: self._refuse_node(g, node))

    def _listed_replies(self, g: int, replies: list[Message]) -> list[Message]:
        """Drop replies from nodes off the allow-list (defence in depth: such a node was never
        sent a task, so its reply is forged or late)."""
        if self.allowed_nodes is None:
            return replies
        allowed = self.allowed_nodes()
        kept = []
        for m in replies:
            if self._from_superlink(m) or m.metadata.src_node_id in allowed:
                kept.append(m)  # the SuperLink's own error replies come from no node
            else:
                self._refuse_node(g, m.metadata.src_node_id)
        return kept

    def _refuse_node(self, g: int, node: int) -> None:
        """Log a node off the allow-list once per round, by node id (its claimed site id is not
        trusted)."""
        site = f"node-{node}"
        if any(r.get("node") == node and "allow-list" in r["reason"] for r in self.rejected.get(g, [])):
            return
        why = "not on the allow-list: its key was registered outside `fedmira coordinator`"
        log(WARNING, "Round %d: excluded %s: node %d is not on the allow-list (its key was "
                     "registered outside `fedmira coordinator`); it gets no task and no adapter", g, site, node)
        self._record_rejection(g, site, node, why)

    # ------------------------------------------------------------------ communication
    def _count(self, g: int, direction: str, messages: list[Message]) -> None:
        """Add each message's adapter bytes to its node's tally for round ``g``."""
        tally = self.comm.setdefault(g, {"up": {}, "down": {}})[direction]
        for m in messages:
            node = m.metadata.dst_node_id if direction == "down" else m.metadata.src_node_id
            size = sum(_payload(r) for r in m.content.array_records.values())
            tally[node] = tally.get(node, 0) + size

    def comm_record(self, g: int) -> dict[str, Any]:
        """Adapter bytes up/down in round ``g``, per site, and cumulative since the run began."""
        rounds = self.comm.get(g, {"up": {}, "down": {}})
        sites: dict[str, dict[str, int]] = {}
        for direction in ("up", "down"):
            for node, size in rounds[direction].items():
                site = self.name_of(node)
                entry = sites.setdefault(site, {"up_bytes": 0, "down_bytes": 0})
                entry[f"{direction}_bytes"] += size
        done = [r for r in self.comm if r <= g]
        cum_up = self.comm_offset[0] + sum(sum(self.comm[r]["up"].values()) for r in done)
        cum_down = self.comm_offset[1] + sum(sum(self.comm[r]["down"].values()) for r in done)
        return {
            "up_bytes": sum(rounds["up"].values()), "down_bytes": sum(rounds["down"].values()),
            "cumulative_up_bytes": cum_up, "cumulative_down_bytes": cum_down,
            "cumulative_bytes": cum_up + cum_down, "sites": dict(sorted(sites.items())),
        }

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
            "comm": self.comm_record(g),
            **({"privacy": p} if (p := self.privacy_record()) else {}),
        }


class FedmiraFedAvg(FedmiraBase, AdapterAggregation):
    """FedAvg on adapters: example-weighted mean (or median / trimmed mean) of the LoRA tensors.

    Cheapest and simplest; note that averaging A and B separately is not averaging the
    updates B·A (see ffa_lora and hetero_svd for exact alternatives).
    """
