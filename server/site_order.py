"""Sample hospitals by who they are, not by the node ids Flower drew for this run.

Flower samples a round's sites with ``random.sample(grid.get_node_ids(), k)``, and fedmira
seeds ``random`` per round, but node ids are random per run (the simulation engine draws
them afresh; a SuperNode gets a new one when it re-registers). The same seed therefore picked
*different hospitals* in two runs with ``fraction_train < 1``, so two strategies could not be
compared on the same sites. :class:`SiteOrder` lists the nodes sorted by the site id each one
reports, so the seeded sample names the same sites in every run.

A node reports its site id in every reply (the ``site`` record); a node not heard from yet is
asked once with a ``query.site`` message, whose reply holds that id and nothing else. Only
when sites are sampled (a fraction below 1) is anything asked. A node that cannot answer is
listed after the known sites, by node id, and can still be sampled.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any, Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.server import Grid

from fedmira.common.site import QUERY_SITE
from fedmira.server.replies import reason_of


class SiteOrder:
    """Node id -> site id, learned from replies and, for nodes not heard from, one query."""

    def __init__(self, timeout: float = 120.0) -> None:
        self.site_of: dict[int, str] = {}
        self.timeout = timeout

    def learn(self, replies: Iterable[Message]) -> None:
        """Remember the site id each successful reply reports."""
        for m in replies:
            if m.has_error() or int(m.metadata.src_node_id) == SUPERLINK_NODE_ID:
                continue
            site = m.content.config_records.get("site")
            if site is not None and "site-id" in site:
                self.site_of[int(m.metadata.src_node_id)] = str(site["site-id"])

    def ask(self, grid: Grid, g: int) -> None:
        """Ask the nodes of ``grid`` whose site is not known yet (one message each, once)."""
        unknown = [n for n in grid.get_node_ids() if n not in self.site_of]
        if not unknown:
            return
        messages = [Message(content=RecordDict({"config": ConfigRecord({"global-round": g})}),
                            message_type=QUERY_SITE, dst_node_id=n) for n in unknown]
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        self.learn(replies)
        for r in replies:
            if r.has_error():
                log(WARNING, "Round %d: node %s did not say which site it is (%s); it is sampled after "
                    "the known sites", g, r.metadata.src_node_id, reason_of(r))

    def ordered(self, grid: Grid) -> Grid:
        """Return ``grid`` listing its nodes by site id (then unknown nodes by node id)."""
        return OrderedGrid(grid, self.site_of)  # type: ignore[return-value]


class OrderedGrid:
    """A Grid whose ``get_node_ids`` is sorted by site id; the rest is the wrapped Grid's."""

    def __init__(self, grid: Grid, site_of: dict[int, str]) -> None:
        self._grid, self._site_of = grid, site_of

    def get_node_ids(self) -> list[int]:
        """Return the nodes, known sites first in site-id order, then the others by node id."""
        nodes = list(self._grid.get_node_ids())
        return sorted(nodes, key=lambda n: (n not in self._site_of, self._site_of.get(n, ""), n))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
