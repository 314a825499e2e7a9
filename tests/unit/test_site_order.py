"""Site sampling is by site, not by node id: the same seed samples the same hospitals in every run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmira.client import client_app
from fedmira.common.compose import compose_config
from fedmira.common.site import QUERY_SITE
from fedmira.server.fedavg import FedmiraFedAvg

SITES = [f"site_{i:02d}" for i in range(1, 11)]
ARRAYS = ArrayRecord({"layers.0.q_proj.lora_A.weight": Array(np.zeros((2, 4), dtype=np.float32))})


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages need the process's task identity (set by Flower's runtime)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


class SiteGrid:
    """Nodes with this run's random ids, each answering ``query.site`` with its site id."""

    def __init__(self, seed: int, broken: Iterable[str] = ()) -> None:
        ids = np.random.default_rng(seed).choice(10**9, size=len(SITES), replace=False)
        self.site = {int(n): s for n, s in zip(ids, SITES)}
        self.broken = set(broken)
        self.asked: list[int] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.site)  # as a SuperLink lists them: by node id, i.e. at random here

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for m in messages:
            assert m.metadata.message_type == QUERY_SITE
            node = int(m.metadata.dst_node_id)
            self.asked.append(node)
            meta = Metadata(run_id=1, message_id=f"q{node}", src_node_id=0, dst_node_id=node,
                            reply_to_message_id="", group_id="1", created_at=time.time(), ttl=60.0,
                            message_type=QUERY_SITE)
            sent = Message(content=m.content, metadata=meta)  # type: ignore[call-overload]
            if self.site[node] in self.broken:
                replies.append(Message(error=Error(code=0, reason="ClientApp raised"), reply_to=sent))
            else:
                replies.append(Message(RecordDict({"site": ConfigRecord({"site-id": self.site[node]})}),
                                       reply_to=sent))
        return replies


def _sampled(grid: SiteGrid, rounds: int = 3, **kw: float) -> list[list[str]]:
    strategy = FedmiraFedAvg(round_config_fn=lambda g: {}, seed=5, **kw)
    picks = []
    for r in range(1, rounds + 1):
        messages = list(strategy.configure_train(r, ARRAYS, ConfigRecord(), grid))
        picks.append(sorted(grid.site[int(m.metadata.dst_node_id)] for m in messages))
    return picks


def test_the_same_seed_samples_the_same_sites_whatever_the_node_ids(task_identity: None) -> None:
    """Two runs (different random node ids) sample the same 3 sites of 10 in every round; sites
    are asked who they are once, in round 1."""
    one, two = SiteGrid(seed=1), SiteGrid(seed=2)
    first, second = _sampled(one, fraction_train=0.3), _sampled(two, fraction_train=0.3)
    assert first == second
    assert all(len(p) == 3 for p in first) and len({tuple(p) for p in first}) > 1  # rounds differ
    assert sorted(one.asked) == sorted(one.site)  # each node once, not once per round


def test_a_node_that_cannot_answer_is_still_sampled_after_the_known_sites(task_identity: None) -> None:
    grid = SiteGrid(seed=3, broken={"site_04"})
    picks = _sampled(grid, rounds=6, fraction_train=0.5)
    assert any("site_04" in p for p in picks)
    again = _sampled(SiteGrid(seed=4, broken={"site_04"}), rounds=6, fraction_train=0.5)
    assert again == picks  # a lone unknown node still lands last, so the order holds


def test_nothing_is_asked_when_every_site_takes_part(task_identity: None) -> None:
    grid = SiteGrid(seed=5)
    picks = _sampled(grid, rounds=1)
    assert picks == [SITES] and grid.asked == []


def test_evaluation_sampling_is_by_site_too(task_identity: None) -> None:
    picks = []
    for seed in (6, 7):
        grid = SiteGrid(seed=seed)
        strategy = FedmiraFedAvg(round_config_fn=lambda g: {}, seed=5, fraction_evaluate=0.4, total_rounds=1)
        messages = strategy.configure_evaluate(1, ARRAYS, ConfigRecord(), grid)
        picks.append(sorted(grid.site[int(m.metadata.dst_node_id)] for m in messages))
    assert picks[0] == picks[1] and len(picks[0]) == 4


def test_the_client_answers_with_its_site_id_only(tmp_path: Path) -> None:
    cfg = compose_config(["+debug=tiny"])
    folder = tmp_path / "tpl_07"
    folder.mkdir()
    context = Context(run_id=1, node_id=9, state=RecordDict(), run_config=cfg.to_run_config(),
                      node_config={"data-path": str(folder), "site-id": "hospital_b", "site-index": 3})
    meta = Metadata(run_id=1, message_id="q", src_node_id=0, dst_node_id=9, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type=QUERY_SITE)
    query = Message(content=RecordDict({"config": ConfigRecord({"global-round": 1})}), metadata=meta)  # type: ignore[call-overload]
    reply = client_app.site_identity(query, context)
    assert dict(reply.content.config_records["site"]) == {"site-id": "hospital_b"}
    assert not reply.content.array_records and not reply.content.metric_records
