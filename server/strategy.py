"""The strategy core: one Flower ``Strategy`` that *has* its parts instead of inheriting them.

:class:`FedmiraStrategy` is the only fedmira class a strategy inherits from (one file per
algorithm: ``server/fedavg.py``, ``fedprox.py``, ``fedadam.py``, ...; each names its Flower
algorithm and, where it differs, its rule). It composes:

- ``algorithm``: Flower's own strategy for the algorithm (FedAvg, FedProx, FedAdam, FedYogi,
  FedAdagrad). It samples the sites, writes its settings into the messages (FedProx's
  ``proximal-mu``) and, for the server optimizers, takes the server step: it is handed the
  round's combined adapter as one reply of weight 1 (Flower's mean of one reply is that reply,
  bit for bit), so Flower's FedOpt math runs unchanged on fedmira's robust aggregate;
- ``rule`` (``server/rules.py``): which keys and shapes a reply must hold and how the checked
  replies become one adapter (robust mean; FFA-LoRA's frozen A; hetero_svd's exact sum of
  mixed-rank updates); site-level DP is a combiner given to the rule (``server/site_dp.py``);
- ``ledger`` (``server/ledger.py``): names, exclusions, bytes, per-site metrics and epsilon per
  round, and the run folder's round record.

What the core itself does, every round: each round's settings (learning rate, local steps, the
global round number, which survives a resume, and the algorithm's client flags) travel in the
message's ConfigRecord; site sampling is seeded per round, so a resumed run samples the same
sites; a reply is rejected, logged with its site and excluded when it is an error, when its
adapter has other keys or shapes than expected, holds NaN/Inf or an undecodable dtype, or when
its update norm is far beyond the others' (``norm_factor``); sites that did not answer before
the round timeout are logged as such; a round with fewer valid replies than
``min_train_sites`` fails loudly instead of silently aggregating one site. In deployment only
allow-listed nodes are sampled and heard.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from logging import INFO, WARNING
from typing import Any, Callable, ClassVar, Iterable, Iterator, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from fedmira.common.aggregation import ArrayDict
from fedmira.common.privacy import SiteLevelLedger
from fedmira.common.secagg import SecAggError
from fedmira.server.allow_list import AllowedGrid, listed_replies, refuse_node
from fedmira.server.fedopt import fedopt_state, load_fedopt_state
from fedmira.server.ledger import RoundLedger
from fedmira.server.replies import (
    CheckedReply,
    check_reply,
    check_structure,
    decode_record,
    from_superlink,
    norm_outliers_of,
    num_examples,
    reason_of,
    reply_arrays,
    site_of,
)
from fedmira.server.rules import AdapterRule, Combiner, RobustMean
from fedmira.server.secaggplus import SecAggPlusRounds, masked_vector
from fedmira.server.site_dp import SiteLevelDP
from fedmira.server.site_order import SiteOrder

SUM_KEYS = ("num-examples", "bytes-sent", "bytes-received", "tokens", "val-tokens", "cold-start")
NOT_AVERAGED = ("site-index", "lora-rank")  # identifiers, not quantities


class RoundFailed(RuntimeError):
    """Too few sites answered a round for its result to be trusted."""


def weighted_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Return the example-weighted mean of every metric; counts and bytes are summed instead."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weight_key]) for m in metrics]  # type: ignore[arg-type]  # a number, checked
    total = sum(weights) or 1.0
    out: dict[str, float | int] = {}
    for key in metrics[0].keys():
        values = [m[key] for m in metrics if key in m]
        if key in SUM_KEYS:
            out[key] = int(sum(values))  # type: ignore[arg-type]  # counts: numbers
        elif key not in NOT_AVERAGED:
            out[key] = float(sum(w * float(v) for w, v in zip(weights, values)) / total)  # type: ignore[arg-type]
    out["num-sites"] = len(records)
    return MetricRecord(out)  # type: ignore[arg-type]  # MetricRecord's value type is invariant


def _as_float32(arrays: ArrayRecord) -> ArrayRecord:
    """Keep the global adapter float32 whatever a layer computed.

    Flower's FedAdam promotes to float64 under NumPy 2, which would double the downlink and the
    checkpoints.
    """
    if all(a.dtype == "float32" for a in arrays.values()):
        return arrays
    return ArrayRecord({k: Array(a.numpy().astype(np.float32)) for k, a in arrays.items()})


def _combined_reply(arrays: ArrayDict, weighted_by_key: str) -> Message:
    """Return the round's combined adapter as one reply of weight 1, for Flower's algorithm.

    Built with explicit metadata (the constructor path Flower's runtime uses; fedmira pins flwr
    <1.43 and the strategy tests run it): the message never travels, so it needs no run's task
    identity.
    """
    metadata = Metadata(run_id=0, message_id="", src_node_id=0, dst_node_id=0, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=0.0, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({weighted_by_key: 1})})
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload]  # see above


class _NoReplyCount(logging.Filter):
    """Hide Flower's "Received 1 results" line for the combined reply (it is not a site's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("%s: Received")


@contextlib.contextmanager
def _quiet_reply_count() -> Iterator[None]:
    quiet = _NoReplyCount()
    FLOWER_LOGGER.addFilter(quiet)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(quiet)


class FedmiraStrategy(Strategy):
    """Flower's algorithm, fedmira's reply checks, rule and ledger, composed.

    Subclasses set :attr:`algorithm_cls` and, where the algorithm asks sites for something
    else, :attr:`client_flags` and :meth:`rule_for`.

    Parameters
    ----------
    round_config_fn : callable
        ``(global_round) -> dict`` of settings sent to sites with each training message.
    round_offset : int
        Rounds already completed before this start (resume): Flower counts from 1 again,
        fedmira's metrics and checkpoints use ``round_offset + server_round``. The server
        optimizers step at the global round (FedAdam's bias correction counts it).
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
    secagg : SecAggPlusRounds, optional
        SecAgg+ (``server/secaggplus.py``): sites send masked vectors and the strategy learns
        only their weighted mean; per-site norms cannot be seen, so ``norm_factor`` is unused.
    **algorithm_kwargs
        Flower's arguments for :attr:`algorithm_cls` (``fraction_train``, ``min_train_nodes``,
        ``proximal_mu``, ``eta``, ...).
    """

    #: Flower's strategy for the algorithm: sampling, message settings, server step.
    algorithm_cls: ClassVar[type[FedAvg]] = FedAvg
    #: Flags every message to a site carries (see :data:`common.site.CLIENT_FLAGS`).
    client_flags: ClassVar[dict[str, bool]] = {}

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
        secagg: SecAggPlusRounds | None = None,
        **algorithm_kwargs: Any,
    ) -> None:
        self.algorithm = self.algorithm_cls(train_metrics_aggr_fn=weighted_metrics,
                                            evaluate_metrics_aggr_fn=weighted_metrics, **algorithm_kwargs)
        self.round_config_fn = round_config_fn
        self.round_offset, self.evaluate_every, self.total_rounds = round_offset, evaluate_every, total_rounds
        self.seed = seed
        self.aggregation, self.trim_fraction, self.norm_factor = aggregation, trim_fraction, norm_factor
        self.site_dp = site_dp
        if secagg is not None and (site_dp is not None or aggregation != "mean"):
            raise ValueError("SecAgg+ needs aggregation=mean and no site-level DP (the server sees no "
                             "single update); see strategy.secure_aggregation")
        self.secagg = secagg
        self.ledger = RoundLedger(comm_offset)
        combiner: Combiner = (SiteLevelDP(site_dp, seed=seed, secure_mode=secure_mode) if site_dp is not None
                              else RobustMean(aggregation, trim_fraction))
        self.rule = self.rule_for(combiner)
        # The round in flight.
        self.current_round = round_offset
        self.expected: dict[str, tuple[int, ...]] = {}
        self.global_arrays: ArrayDict = {}
        self.sent_train: set[int] = set()
        self.available = 0
        #: The instructions of the round in flight (their ids are set when the grid pushes
        #: them), to tell which node an error reply of the SuperLink itself is about.
        self._instructions: list[Message] = []
        #: Deployment: the node ids of the allow-listed hospitals (re-read every round); None:
        #: every node the SuperLink admitted takes part (simulation).
        self.allowed_nodes: Callable[[], frozenset[int]] | None = None
        #: Which site each node is: sampling goes by site, so a seed picks the same hospitals
        #: in every run although node ids are random per run (server/site_order.py).
        self.site_order = SiteOrder()

    def rule_for(self, combiner: Combiner) -> AdapterRule:
        """Return this algorithm's aggregation rule around ``combiner`` (whole adapters here)."""
        return AdapterRule(combiner)

    @property
    def weighted_by_key(self) -> str:
        """The metric replies are weighted by (Flower's ``num-examples``)."""
        return self.algorithm.weighted_by_key

    @property
    def min_train_nodes(self) -> int:
        """Fewest usable training replies a round accepts (``strategy.min_train_sites``)."""
        return self.algorithm.min_train_nodes

    def global_round(self, server_round: int) -> int:
        """Return fedmira's round number for Flower's ``server_round`` of this start."""
        return self.round_offset + server_round

    def summary(self) -> None:
        """Log what the strategy is made of, then Flower's summary of its algorithm."""
        log(INFO, "\t├──> fedmira: %s with %s, norm_factor %g%s", type(self.rule).__name__,
            type(self.rule.combiner).__name__, self.norm_factor, ", site-level DP" if self.site_dp else "")
        if self.secagg is not None:
            p = self.secagg.params
            log(INFO, "\t├──> SecAgg+: %d shares, threshold %d, clipping %g, %d levels; the server "
                      "sees only the sum (norm-outlier rejection off)", p.num_shares,
                p.reconstruction_threshold, p.clipping_range, p.quantization_range)
        self.algorithm.summary()

    # ------------------------------------------------------------------ server state
    def strategy_state(self) -> tuple[ArrayDict, dict[str, str]] | None:
        """Return the server state to checkpoint with each round (server optimizers); None: stateless."""
        if isinstance(self.algorithm, FedOpt):
            return fedopt_state(self.algorithm, type(self).__name__, self.current_round)
        return None

    def load_strategy_state(self, tensors: ArrayDict, metadata: dict[str, str]) -> None:
        """Restore :meth:`strategy_state` on resume.

        Raises
        ------
        ValueError
            When this strategy keeps no state, or another strategy wrote it.
        """
        if not isinstance(self.algorithm, FedOpt):
            raise ValueError(f"{type(self).__name__} keeps no server state, but a strategy state was found")
        load_fedopt_state(self.algorithm, tensors, metadata, type(self).__name__)

    def privacy_record(self) -> dict[str, Any]:
        """Return epsilon so far: per site (record-level, last reported) and over sites (site-level)."""
        return self.ledger.privacy_record(self.site_dp)

    def restore_privacy(self, record: dict[str, Any]) -> None:
        """Continue the privacy bookkeeping of a resumed run from its last committed round."""
        self.ledger.restore_privacy(record, self.site_dp)

    def round_record(self, g: int) -> dict[str, Any]:
        """Return everything the run folder keeps about global round ``g`` (JSON-serialisable)."""
        return self.ledger.round_record(g, self.privacy_record())

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the round's sites and send each the global adapter and the round's settings."""
        g = self.global_round(server_round)
        self.current_round = g
        self.expected = self.rule.expected_shapes(arrays)
        self.global_arrays = decode_record(arrays)
        config = ConfigRecord({**dict(config), **self.round_config_fn(g), **self.client_flags,
                               "global-round": g})
        real_grid, grid = grid, self._site_ordered(g, self._allowed_grid(g, grid), "fraction_train")
        random.seed(self.seed * 100003 + g)  # Flower samples with the global `random`
        sampled = list(self.algorithm.configure_train(server_round, arrays, config, grid))
        messages = self.rule.personalize(sampled)
        self.available = max(len(list(grid.get_node_ids())), len(messages), 1)
        if self.secagg is not None:
            messages = self._secagg_keys(g, real_grid, messages)
        self.sent_train = {m.metadata.dst_node_id for m in messages}
        self._instructions = messages
        self.ledger.count(g, "down", messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, combine the usable ones and take the algorithm's server step."""
        g = self.global_round(server_round)
        self.current_round = g
        listed = self._listed_replies(g, list(replies))
        self.site_order.learn(listed)
        self._note_replies(g, listed)
        if self.secagg is not None:
            return self._aggregate_secure(g, listed)
        checked = [c for m in listed if not m.has_error() and (c := self.check_reply(g, m)) is not None]
        self.ledger.note_epsilons([c.msg for c in checked])
        idle = [c for c in checked if c.weight == 0]
        for c in idle:
            log(INFO, "Round %d: %s trained no step: its privacy budget is spent", g, c.site)
        valid = [c for c in checked if c.weight != 0]
        norms: dict[int, float] = {}
        if self.site_dp is None:
            valid, norms = self._drop_outliers(g, valid)
        self._require(g, len(valid) + len(idle), len(listed))  # a spent budget is an answer, not a failure
        self.ledger.keep_site_metrics("train", g, [c.msg for c in valid + idle], norms)
        if not valid:
            return self._unchanged(g)
        merged = self.rule.combine([c.state for c in valid], [c.weight for c in valid], self.global_arrays, g)
        arrays = self._server_step(g, merged)
        metrics = weighted_metrics([c.msg.content for c in valid], self.weighted_by_key)
        if self.site_dp is not None:
            self.site_dp.record(max(len(self.sent_train), len(valid)) / self.available)  # sampling rate
        self.ledger.aggregates["train"][g] = metrics
        return _as_float32(arrays), metrics

    # ------------------------------------------------------------------ SecAgg+
    def _secagg_keys(self, g: int, grid: Grid, messages: list[Message]) -> list[Message]:
        """Run SecAgg+'s key stages; return the train messages of the sites that shared keys."""
        assert self.secagg is not None
        try:
            out = self.secagg.before_train(
                g, grid, messages, lambda r: self._listed_replies(g, r),
                lambda node, why: self.ledger.reject(g, self.ledger.name_of(node), node, why),
                lambda d, node, n: self.ledger.add_bytes(g, d, node, n))
        except SecAggError as exc:
            raise RoundFailed(f"Round {g}: SecAgg+ could not start: {exc}") from exc
        if len(out) < self.min_train_nodes:
            raise RoundFailed(
                f"Round {g}: only {len(out)} of {len(messages)} sampled sites finished the SecAgg+ key "
                f"exchange, fewer than strategy.min_train_sites={self.min_train_nodes}"
                f"{self.ledger.exclusions(g)}. Bring the sites back (or lower strategy.min_train_sites), "
                "then resume the run.")
        return out

    def _aggregate_secure(self, g: int, listed: list[Message]
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the masked replies and take the algorithm's server step on its mean.

        Each reply's structure is checked (keys, shapes and integer dtypes of the masked vector:
        its values are random by design); a malformed one is excluded and, to the protocol, a
        dropout. A site whose privacy budget is spent masks zeros at weight 0 (it stays in the
        protocol); when every site is spent the sum is known to be zero and nothing is unmasked.
        """
        assert self.secagg is not None
        masked: dict[int, list[np.ndarray]] = {}
        answered: list[Message] = []
        for m in listed:
            if m.has_error():
                continue
            why = check_structure(m, self.weighted_by_key)
            vec = masked_vector(m, self.expected) if why is None else why
            if isinstance(vec, str):
                self._reject(g, m, vec)
                continue
            masked[int(m.metadata.src_node_id)] = vec
            answered.append(m)
        idle = [m for m in answered if num_examples(m, self.weighted_by_key) == 0]
        for m in idle:
            log(INFO, "Round %d: %s trained no step: its privacy budget is spent", g, site_of(m))
        self._require(g, len(answered), len(listed))
        if len(idle) == len(answered):  # the spent sites' epsilons and metrics are still the round's
            self.ledger.note_epsilons(idle)
            self.ledger.keep_site_metrics("train", g, idle, {})
            return self._unchanged(g)
        try:
            total = self.secagg.unmask(g, masked, lambda r: self._listed_replies(g, r),
                                       lambda d, node, n: self.ledger.add_bytes(g, d, node, n))
        except SecAggError as exc:
            raise RoundFailed(f"Round {g}: SecAgg+ could not unmask the sum: {exc} Resume the run to "
                              "repeat the round.") from exc
        summed = [m for m in answered if int(m.metadata.src_node_id) in total.survivors]
        for m in answered:
            if int(m.metadata.src_node_id) not in total.survivors:
                self._reject(g, m, "masked vector of another layout than the other sites'")
        self._require(g, len(summed), len(listed))
        spent = {id(m) for m in idle}
        valid, idle = [m for m in summed if id(m) not in spent], [m for m in summed if id(m) in spent]
        self.ledger.note_epsilons(valid + idle)
        self.ledger.keep_site_metrics("train", g, valid + idle, {})
        mean = dict(zip(sorted(self.expected), total.mean))
        merged = self.rule.combine([mean], [total.total_weight], self.global_arrays, g)
        arrays = self._server_step(g, merged)
        metrics = weighted_metrics([m.content for m in valid], self.weighted_by_key)
        self.ledger.aggregates["train"][g] = metrics
        return _as_float32(arrays), metrics

    def _require(self, g: int, usable: int, heard: int) -> None:
        """Fail the round when fewer than ``min_train_sites`` usable replies came."""
        if usable < self.min_train_nodes:
            raise RoundFailed(
                f"Round {g}: only {usable} of {max(len(self.sent_train), heard)} "
                f"sampled sites returned a usable adapter, fewer than strategy.min_train_sites="
                f"{self.min_train_nodes}{self.ledger.exclusions(g)}. Bring the sites back (or lower "
                "strategy.min_train_sites), then resume the run.")

    def _unchanged(self, g: int) -> tuple[ArrayRecord, None]:
        """Every sampled site has spent its privacy budget: keep the global adapter."""
        log(WARNING, "Round %d: every sampled site has spent its privacy budget; the global "
                     "adapter is unchanged", g)
        self.ledger.aggregates["train"][g] = None
        return ArrayRecord({k: Array(v) for k, v in self.global_arrays.items()}), None

    def _server_step(self, g: int, merged: ArrayDict) -> ArrayRecord:
        """Return Flower's algorithm's new global adapter from the round's combined one.

        FedAvg and FedProx would return their mean of one reply, the adapter itself, so they are
        not asked (it would cost a serialisation round trip of every tensor, about a third of
        the aggregation time for 42 sites); FedAdam, FedYogi and FedAdagrad take their step on
        it, at the global round.
        """
        if not isinstance(self.algorithm, FedOpt):
            return ArrayRecord({k: Array(v) for k, v in merged.items()})
        with _quiet_reply_count():
            arrays, _ = self.algorithm.aggregate_train(g, [_combined_reply(merged, self.weighted_by_key)])
        if arrays is None:  # Flower returns None only without replies
            raise RuntimeError(f"{type(self.algorithm).__name__} returned no adapter for one reply")
        return arrays

    def check_reply(self, g: int, msg: Message) -> CheckedReply | None:
        """Return the reply decoded when it is usable; else reject it (logged) and return None."""
        why = check_structure(msg, self.weighted_by_key)
        if why is None:
            why = self.rule.refuse(reply_arrays(msg), self.expected)
        if why is None:
            expected = self.rule.expected_for(reply_arrays(msg), self.expected)
            result = check_reply(msg, expected, self.weighted_by_key)
            if isinstance(result, CheckedReply):
                self.rule.accept(result)
                return result
            why = result
        self._reject(g, msg, why)
        return None

    def _drop_outliers(
        self, g: int, valid: list[CheckedReply],
    ) -> tuple[list[CheckedReply], dict[int, float]]:
        """Reject replies whose update norm is > norm_factor x the others' median; norms by node."""
        if self.norm_factor <= 0 or len(valid) < 2:
            return valid, {}
        references = [self.rule.reference_for(c.state, self.global_arrays) for c in valid]
        norms, outliers = norm_outliers_of(valid, references, self.norm_factor)
        for i, why in outliers.items():
            self._reject(g, valid[i].msg, why)
        kept = [c for i, c in enumerate(valid) if i not in outliers]
        return kept, {c.node: n for c, n in zip(valid, norms)}

    def _note_replies(self, g: int, replies: list[Message]) -> None:
        """Learn node -> site, count upload bytes, log errors and sites that never answered."""
        unknown = 0  # SuperLink error replies whose node cannot be told: among the silent below
        for m in replies:
            if from_superlink(m) and self.node_of(m) == SUPERLINK_NODE_ID:
                unknown += 1
            elif m.has_error():
                self._reject(g, m, f"{'unavailable' if from_superlink(m) else 'site raised'}: {reason_of(m)}")
            else:
                self.ledger.learn_site(m.metadata.src_node_id, site_of(m))
        self.ledger.count(g, "up", [m for m in replies if not m.has_error()])
        answered = {self.node_of(m) for m in replies}
        why = "no reply before the round timeout (strategy.round_timeout_s)"
        if unknown:
            why = "no reply: the SuperLink reported it unavailable or the round timeout passed"
        for node in sorted(self.sent_train - answered):
            self.ledger.reject(g, self.ledger.name_of(node), node, why)

    def node_of(self, msg: Message) -> int:
        """Return the node a reply is about.

        That is its sender, or for the SuperLink's own error reply the node the answered
        instruction went to.
        """
        if from_superlink(msg):
            for ins in self._instructions:
                if ins.metadata.message_id and ins.metadata.message_id == msg.metadata.reply_to_message_id:
                    return int(ins.metadata.dst_node_id)
        return int(msg.metadata.src_node_id)

    def _reject(self, g: int, msg: Message, why: str) -> None:
        node = self.node_of(msg)
        site = self.ledger.name_of(node) if msg.has_error() else site_of(msg)
        self.ledger.reject(g, site, node, why)

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """On due rounds, send the same sites each time the global adapter to score."""
        g = self.global_round(server_round)
        due = self.evaluate_every > 0 and (g % self.evaluate_every == 0 or g == self.total_rounds)
        if not due:
            return []
        config = ConfigRecord({**dict(config), **self.client_flags, "global-round": g})
        grid = self._site_ordered(g, self._allowed_grid(g, grid), "fraction_evaluate")
        # The same sites every evaluation round, so the validation curve compares like with like.
        random.seed(self.seed * 100003 + 7919)
        sampled = list(self.algorithm.configure_evaluate(server_round, arrays, config, grid))
        messages = self.rule.personalize(sampled)
        self._instructions = messages
        self.ledger.count(g, "down", messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each site's scores and return their example-weighted mean."""
        g = self.global_round(server_round)
        listed = self._listed_replies(g, list(replies))
        self.site_order.learn(listed)
        for m in listed:
            if from_superlink(m) and self.node_of(m) == SUPERLINK_NODE_ID:
                continue  # about a node that cannot be told; it is simply not among the scored
            if m.has_error():
                self._reject(g, m, f"evaluation {'unavailable' if from_superlink(m) else 'raised'}: "
                                   f"{reason_of(m)}")
        valid = [m for m in listed if not m.has_error()]
        self.ledger.keep_site_metrics("evaluate", g, valid)
        # A site without validation reports answers num-examples 0 and fewer metric keys;
        # Flower refuses to aggregate replies whose keys differ, so leave it out here.
        scored = [m for m in valid if num_examples(m, self.weighted_by_key) > 0]
        if not scored:
            return None
        metrics = self.algorithm.aggregate_evaluate(server_round, scored)
        self.ledger.aggregates["evaluate"][g] = metrics
        return metrics

    def _site_ordered(self, g: int, grid: Grid, fraction: str) -> Grid:
        """Return ``grid`` listing nodes by site when the round samples (``fraction`` < 1).

        With every site taking part the order does not matter and nothing is asked.
        """
        if float(getattr(self.algorithm, fraction, 1.0)) >= 1.0:
            return grid
        self.site_order.ask(grid, g)
        return self.site_order.ordered(grid)

    # ------------------------------------------------------------------ allow-list
    def _allowed_grid(self, g: int, grid: Grid) -> Grid:
        """Return ``grid`` listing only allow-listed nodes (others refused and logged)."""
        if self.allowed_nodes is None:
            return grid
        allowed = AllowedGrid(grid, self.allowed_nodes(), lambda node: refuse_node(self.ledger, g, node))
        return cast(Grid, allowed)  # a proxy: Flower's FedAvg calls only get_node_ids on it

    def _listed_replies(self, g: int, replies: list[Message]) -> list[Message]:
        """Drop replies from nodes off the allow-list (forged or late: they were sent no task)."""
        if self.allowed_nodes is None:
            return replies
        return listed_replies(replies, self.allowed_nodes(), lambda node: refuse_node(self.ledger, g, node))
