"""Deployment's allow-list inside a round: only the hospitals `fedmira coordinator` listed take part.

The SuperLink admits any node whose key is registered; the allow-list (written by the
coordinator, re-read every round) says which of them are hospitals of this network. A node off
it is never sampled, and a reply claiming to come from it is refused and logged once per round,
by node id (its claimed site id is not trusted).
"""

from __future__ import annotations

from logging import WARNING
from typing import Any, Callable

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedmira.server.ledger import RoundLedger
from fedmira.server.replies import from_superlink


class AllowedGrid:
    """A Grid whose ``get_node_ids`` lists only allow-listed nodes; the rest is the wrapped Grid's."""

    def __init__(self, grid: Grid, allowed: frozenset[int], refuse: Callable[[int], None]) -> None:
        self._grid, self._allowed, self._refuse = grid, allowed, refuse

    def get_node_ids(self) -> list[int]:
        """Return the allow-listed nodes; refuse (and log) the others."""
        nodes = list(self._grid.get_node_ids())
        for node in nodes:
            if node not in self._allowed:
                self._refuse(node)
        return [n for n in nodes if n in self._allowed]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def listed_replies(
    replies: list[Message], allowed: frozenset[int], refuse: Callable[[int], None],
) -> list[Message]:
    """Return the replies of allow-listed nodes; ``refuse`` each other sender.

    Defence in depth: a node off the list was never sent a task, so its reply is forged or late.
    The SuperLink's own error replies come from no node and are kept.
    """
    kept = []
    for m in replies:
        if from_superlink(m) or m.metadata.src_node_id in allowed:
            kept.append(m)
        else:
            refuse(m.metadata.src_node_id)
    return kept


def refuse_node(ledger: RoundLedger, g: int, node: int) -> None:
    """Log a node off the allow-list once per round and record it as excluded, by node id."""
    if ledger.refused(g, node):
        return
    site = f"node-{node}"
    log(WARNING, "Round %d: excluded %s: node %d is not on the allow-list (its key was registered "
                 "outside `fedmira coordinator`); it gets no task and no adapter", g, site, node)
    ledger.record(g, site, node, "not on the allow-list: its key was registered outside "
                                 "`fedmira coordinator`")
