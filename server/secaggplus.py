"""SecAgg+ on the Message API: the key and unmask stages around a strategy's training round.

``common.secagg`` has the protocol as plain functions; this file only sends its contents as
Messages. With ``strategy.secure_aggregation=secaggplus`` a training round of
:class:`~fedmira.server.strategy.FedmiraStrategy` is:

0. ``advertise_keys`` and 1. ``share_keys``: ``train.secagg`` messages (a ConfigRecord
   ``secagg`` each way) to the sampled sites, sent from ``configure_train`` before any
   training starts. A site that fails or is silent here is left out of the round.
2. the strategy's own ``train`` message to every site that shared keys, with the ciphertexts
   addressed to it added as the ConfigRecord ``secagg``: the site trains, then replies with its
   masked vector (uint32 arrays under the adapter's keys plus :data:`WEIGHT_KEY`) and its clear
   metrics.
3. ``unmask``: ``train.secagg`` messages to the survivors, sent from ``aggregate_train``; the
   shares they return remove the masks from the sum.

Flower's own ``SecAggPlusWorkflow`` cannot be used: it drives a legacy ``Strategy`` through a
``LegacyContext`` and its ``secaggplus_mod`` reads replies as legacy ``FitRes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import WARNING
from typing import Callable, Mapping, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedmira.common.secagg import (
    RECORD,
    STAGE_MESSAGE_TYPE,
    WEIGHT_KEY,
    CoordinatorRound,
    SecAggError,
    SecAggParams,
    SecureSum,
)
from fedmira.server.replies import Shapes, reason_of, reply_arrays, shapes_of

#: Array types a masked vector may travel in (uint32 under the default 2**32 modulus).
MASKED_DTYPES = ("uint32", "int64")

T = TypeVar("T")
Reject = Callable[[int, str], None]
Listed = Callable[[list[Message]], list[Message]]
#: ``count(direction, node, bytes)``: add a stage message's bytes to the ledger's tally.
Count = Callable[[str, int, int], None]


def config_bytes(record: ConfigRecord) -> int:
    """Approximate wire size of a ConfigRecord: bytes as their length, numbers as 8 bytes."""
    size = 0
    for value in record.values():
        for v in value if isinstance(value, list) else [value]:
            size += len(v) if isinstance(v, (bytes, str)) else 8
    return size


def masked_vector(msg: Message, expected: Shapes) -> list[np.ndarray] | str:
    """Return a masked reply's arrays in protocol order (weight, then keys sorted), or why not.

    Only keys, shapes and dtypes are checked: the values are uniformly random by design.
    """
    record = reply_arrays(msg)
    want = {WEIGHT_KEY: (1,), **expected}
    got = shapes_of(record)
    if got != want:
        diff = sorted(set(got) ^ set(want))[:2] or [k for k in got if got[k] != want.get(k)][:2]
        return f"masked vector keys/shapes differ from the global adapter (e.g. {diff})"
    bad = [k for k, a in record.items() if a.dtype not in MASKED_DTYPES]
    if bad:
        return f"masked vector {bad[0]} travels as {record[bad[0]].dtype}, not {' or '.join(MASKED_DTYPES)}"
    return [record[WEIGHT_KEY].numpy()] + [record[k].numpy() for k in sorted(expected)]


@dataclass
class SecAggPlusRounds:
    """The coordinator's SecAgg+ stages for one strategy, one round at a time.

    Parameters
    ----------
    params : SecAggParams
        The protocol's settings (``strategy.secagg_*``); ``auto_weight`` refits ``max_weight``
        every round to the largest count advertised.
    timeout : float
        Seconds to wait for each key or unmask stage (``strategy.secagg_timeout_s``).
    seed : int
        Seed of the neighbour graph (combined with the global round).
    """

    params: SecAggParams
    timeout: float
    seed: int = 0
    auto_weight: bool = True
    round: CoordinatorRound | None = field(default=None, init=False)
    grid: Grid | None = field(default=None, init=False)

    def before_train(self, g: int, grid: Grid, train: list[Message], listed: Listed, reject: Reject,
                     count: Count) -> list[Message]:
        """Run stages 0 and 1 with the sampled sites; return the train messages of those that shared.

        ``listed`` drops replies of nodes off the allow-list, ``reject(node, why)`` records a
        site left out, ``count(direction, node, bytes)`` adds the stage's bytes to the ledger.

        Raises
        ------
        SecAggError
            Fewer sampled sites than ``reconstruction_threshold``.
        """
        self.grid = grid
        self.round = CoordinatorRound([int(m.metadata.dst_node_id) for m in train], self.params,
                                      seed=self.seed * 100003 + g)
        keys = self._exchange(g, "advertise_keys", self.round.setup(), listed, reject, count,
                              lambda r: (_blob(r["pk1"]), _blob(r["pk2"]), float(r["num-examples"])))
        if self.auto_weight:
            self.round.fit_weight({nid: k[2] for nid, k in keys.items()})
        public = {nid: (k[0], k[1]) for nid, k in keys.items()}
        shares = self._exchange(g, "share_keys", self.round.on_keys(public), listed, reject, count,
                                lambda r: dict(zip(_ints(r["dst_ids"]), _blobs(r["ciphertexts"]))))
        inbox = self.round.on_shares(shares)
        out = []
        for m in train:
            nid = int(m.metadata.dst_node_id)
            if nid in inbox:  # Flower's FedAvg shares one RecordDict among its messages: copy it
                record = ConfigRecord({"stage": "masked_vector", "global-round": g, **inbox[nid]})  # type: ignore[arg-type]
                content = RecordDict({**dict(m.content.items()), RECORD: record})
                out.append(Message(content=content, message_type=m.metadata.message_type, dst_node_id=nid))
        return out

    def unmask(self, g: int, masked: Mapping[int, list[np.ndarray]], listed: Listed,
               count: Count) -> SecureSum:
        """Run stage 3 with the sites whose masked vector arrived; return the unmasked mean.

        A survivor that does not answer here is no exclusion: its vector is in the sum and its
        mask is rebuilt from its neighbours' shares.

        Raises
        ------
        SecAggError
            Fewer shares than the threshold came back for some site (too many dropped).
        """
        if self.round is None:
            raise SecAggError("unmask came before the round's key exchange.")
        contents = self.round.on_masked(masked)

        def late(node: int, why: str) -> None:
            log(WARNING, "Round %d: node %d %s; its mask is rebuilt from its neighbours' shares",
                g, node, why)

        shares = self._exchange(g, "unmask", contents, listed, late, count,
                                lambda r: dict(zip(_ints(r["owner_ids"]), _blobs(r["shares"]))))
        return self.round.on_unmask(shares)

    def _exchange(self, g: int, stage: str, contents: Mapping[int, Mapping[str, object]], listed: Listed,
                  reject: Reject, count: Count, parse: Callable[[ConfigRecord], T]) -> dict[int, T]:
        """Send one stage's contents; return each answering site's reply, parsed by ``parse``.

        A site that raised, sent a malformed reply or did not answer within the stage timeout is
        passed to ``reject`` and is absent from the result (a dropout to the protocol).
        """
        if self.grid is None:
            raise SecAggError(f"SecAgg+ {stage} came before the round's key exchange.")
        messages = [Message(content=RecordDict({RECORD: ConfigRecord(
                        {"stage": stage, "global-round": g, **c})}),  # type: ignore[arg-type]
                        message_type=STAGE_MESSAGE_TYPE, dst_node_id=nid)
                    for nid, c in contents.items()]
        for m in messages:
            count("down", int(m.metadata.dst_node_id), config_bytes(m.content[RECORD]))  # type: ignore[arg-type]
        replies = listed(list(self.grid.send_and_receive(messages, timeout=self.timeout)))
        by_id = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages}
        out: dict[int, T] = {}
        heard: set[int] = set()
        for r in replies:
            node = int(r.metadata.src_node_id)
            if node == SUPERLINK_NODE_ID:  # the SuperLink's own error reply about a node
                node = by_id.get(r.metadata.reply_to_message_id, SUPERLINK_NODE_ID)
            if node not in contents:
                continue  # not asked: a forged or late reply
            heard.add(node)
            if r.has_error():
                reject(node, f"SecAgg+ {stage}: {reason_of(r)}")
                continue
            record = r.content.config_records.get(RECORD)
            if record is None or record.get("stage") != stage:
                reject(node, f"SecAgg+ {stage}: the reply holds no `{RECORD}` record of this stage")
                continue
            count("up", node, config_bytes(record))
            try:
                out[node] = parse(record)
            except (KeyError, TypeError, ValueError, SecAggError) as exc:
                reject(node, f"SecAgg+ {stage}: malformed reply ({type(exc).__name__}: {exc})"[:200])
        for node in sorted(set(contents) - heard):
            reject(node, f"SecAgg+ {stage}: no reply within strategy.secagg_timeout_s={self.timeout:g}")
        return out


def _blob(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def _ints(value: object) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise TypeError("expected a list of node ids")
    return [int(v) for v in value]


def _blobs(value: object) -> list[bytes]:
    if not isinstance(value, list):
        raise TypeError("expected a list of bytes")
    return [_blob(v) for v in value]
