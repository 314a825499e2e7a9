"""What a federated run remembers about each round: names, exclusions, bytes, metrics, epsilon.

:class:`RoundLedger` is the bookkeeping a strategy *has*: it never decides anything, it records
what the strategy saw and turns it into the run folder's per-round record
(:meth:`RoundLedger.round_record`). It holds site ids, node ids, numbers and reasons, never
report text.
"""

from __future__ import annotations

import math
from logging import WARNING
from typing import Any

from flwr.app import Message, MetricRecord
from flwr.common.logger import log

from fedmira.common.privacy import SiteLevelLedger
from fedmira.server.replies import record_bytes, site_of

Rejection = dict[str, Any]  # {"site": str, "node": int, "reason": str}


class RoundLedger:
    """Per-round records of a strategy, keyed by fedmira's global round number.

    Parameters
    ----------
    comm_offset : tuple of int
        Bytes (up, down) of the rounds committed before a resume, for cumulative totals.
    """

    def __init__(self, comm_offset: tuple[int, int] = (0, 0)) -> None:
        self.comm_offset = comm_offset
        #: node id -> the site id it last reported
        self.node_sites: dict[int, str] = {}
        #: Deployment: node id -> hospital name of the allow-list, to name a node that has not
        #: replied yet (a site lost in round 1 of a resumed run); see ``name_of``.
        self.node_names: dict[int, str] = {}
        self.comm: dict[int, dict[str, dict[int, int]]] = {}
        self.site_metrics: dict[str, dict[int, dict[str, dict[str, Any]]]] = {"train": {}, "evaluate": {}}
        self.rejected: dict[int, list[Rejection]] = {}
        self.aggregates: dict[str, dict[int, MetricRecord | None]] = {"train": {}, "evaluate": {}}
        #: the last epsilon each site reported (record-level DP)
        self.site_epsilon: dict[str, float] = {}

    # ------------------------------------------------------------------ names and exclusions
    def learn_site(self, node: int, site: str) -> None:
        """Remember the site id a node reported."""
        self.node_sites[node] = site

    def name_of(self, node: int) -> str:
        """Return a node's site id as it last reported it, else its allow-list name, else ``node-N``."""
        return self.node_sites.get(node) or self.node_names.get(node) or f"node-{node}"

    def reject(self, g: int, site: str, node: int, why: str) -> None:
        """Log an exclusion and record it for round ``g``.

        One entry per exclusion; the node id makes a site excluded twice in a round (its
        training timed out and its evaluation failed) count once (``excluded_count``).
        """
        log(WARNING, "Round %d: excluded %s: %s", g, site, why)
        self.record(g, site, node, why)

    def record(self, g: int, site: str, node: int, why: str) -> None:
        """Record an exclusion of round ``g`` that the caller has logged in its own words."""
        self.rejected.setdefault(g, []).append({"site": site, "node": int(node), "reason": why})

    def refused(self, g: int, node: int) -> bool:
        """Tell whether round ``g`` already refused ``node`` for being off the allow-list."""
        return any(r.get("node") == node and "allow-list" in r["reason"] for r in self.rejected.get(g, []))

    def exclusions(self, g: int) -> str:
        """Return ``; excluded: a (why), b (why)`` for round ``g``'s exclusions, one per node."""
        seen: dict[Any, str] = {}
        for r in self.rejected.get(g, []):
            seen.setdefault(r.get("node", r["site"]), f"{r['site']} ({r['reason']})")
        return f"; excluded: {', '.join(seen.values())}" if seen else ""

    # ------------------------------------------------------------------ metrics and epsilon
    def keep_site_metrics(
        self, kind: str, g: int, replies: list[Message], norms: dict[int, float] | None = None,
    ) -> None:
        """Keep each replying site's metrics (and training update norm, by node) for round ``g``."""
        per_site: dict[str, dict[str, Any]] = {}
        for m in replies:
            rec = next(iter(m.content.metric_records.values()), None)
            if rec is None:
                continue
            entry = {k: v for k, v in rec.items() if not isinstance(v, list)}
            node = int(m.metadata.src_node_id)
            if norms and node in norms:
                entry["update-norm"] = norms[node]
            per_site[site_of(m)] = entry
        self.site_metrics[kind][g] = per_site

    def note_epsilons(self, replies: list[Message]) -> None:
        """Remember each site's reported DP epsilon (sites report it only when sampled)."""
        for m in replies:
            rec = next(iter(m.content.metric_records.values()), None)
            value = rec.get("dp-epsilon") if rec is not None else None
            if isinstance(value, (int, float)):
                self.site_epsilon[site_of(m)] = float(value)

    def privacy_record(self, site_dp: SiteLevelLedger | None) -> dict[str, Any]:
        """Return epsilon so far: per site (record-level, last reported) and over sites (site-level)."""
        out: dict[str, Any] = {}
        if self.site_epsilon:
            out["record_level"] = {"max_epsilon": max(self.site_epsilon.values()),
                                   "sites": dict(sorted(self.site_epsilon.items()))}
        if site_dp is not None:
            out["site_level"] = site_dp.summary()
        return out

    def restore_privacy(self, record: dict[str, Any], site_dp: SiteLevelLedger | None) -> None:
        """Continue the privacy bookkeeping of a resumed run from its last committed round."""
        self.site_epsilon.update(record.get("record_level", {}).get("sites", {}))
        history = record.get("site_level", {}).get("history")
        if site_dp is not None and history:
            site_dp.history = [list(h) for h in history]

    # ------------------------------------------------------------------ communication
    def count(self, g: int, direction: str, messages: list[Message]) -> None:
        """Add each message's adapter bytes to its node's tally for round ``g`` (``up`` | ``down``)."""
        for m in messages:
            node = m.metadata.dst_node_id if direction == "down" else m.metadata.src_node_id
            size = sum(record_bytes(r) for r in m.content.array_records.values())
            self.add_bytes(g, direction, int(node), size)

    def add_bytes(self, g: int, direction: str, node: int, size: int) -> None:
        """Add ``size`` bytes to ``node``'s tally for round ``g`` (also SecAgg+'s key and share bytes)."""
        tally = self.comm.setdefault(g, {"up": {}, "down": {}})[direction]
        tally[node] = tally.get(node, 0) + size

    def comm_record(self, g: int) -> dict[str, Any]:
        """Return adapter bytes up/down in round ``g``, per site, and cumulative since the run began."""
        rounds = self.comm.get(g, {"up": {}, "down": {}})
        sites: dict[str, dict[str, int]] = {}
        for direction in ("up", "down"):
            for node, size in rounds[direction].items():
                entry = sites.setdefault(self.name_of(node), {"up_bytes": 0, "down_bytes": 0})
                entry[f"{direction}_bytes"] += size
        done = [r for r in self.comm if r <= g]
        cum_up = self.comm_offset[0] + sum(sum(self.comm[r]["up"].values()) for r in done)
        cum_down = self.comm_offset[1] + sum(sum(self.comm[r]["down"].values()) for r in done)
        return {
            "up_bytes": sum(rounds["up"].values()), "down_bytes": sum(rounds["down"].values()),
            "cumulative_up_bytes": cum_up, "cumulative_down_bytes": cum_down,
            "cumulative_bytes": cum_up + cum_down, "sites": dict(sorted(sites.items())),
        }

    # ------------------------------------------------------------------ the run folder's record
    def round_record(self, g: int, privacy: dict[str, Any]) -> dict[str, Any]:
        """Return everything the run folder keeps about global round ``g`` (JSON-serialisable)."""
        return {
            "train": _clean(self.aggregates["train"].get(g)),
            "evaluate": _clean(self.aggregates["evaluate"].get(g)),
            "train_sites": {s: _clean(m) for s, m in self.site_metrics["train"].get(g, {}).items()},
            "evaluate_sites": {s: _clean(m) for s, m in self.site_metrics["evaluate"].get(g, {}).items()},
            "rejected": self.rejected.get(g, []),
            "comm": self.comm_record(g),
            **({"privacy": privacy} if privacy else {}),
        }


def _clean(m: MetricRecord | dict[str, Any] | None) -> dict[str, Any]:
    """Drop NaN values (JSON has none; a NaN metric means the site had nothing to score)."""
    return {k: v for k, v in dict(m or {}).items() if not (isinstance(v, float) and math.isnan(v))}
