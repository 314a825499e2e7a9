"""Privacy through the apps: budget-spent replies, site-level DP in the strategy, the site's ledger
kept in Flower's node state and its file across rounds and a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from fedmira.client import client_app
from fedmira.common.adapters import get_adapter_state
from fedmira.common.compose import compose_config
from fedmira.common.config import ExperimentConfig
from fedmira.common.model import apply_lora, load_base_model
from fedmira.common.privacy import SiteLevelLedger, epsilon_for, site_level_aggregate
from fedmira.common.reports import write_jsonl
from fedmira.common.site import ModelCache
from fedmira.server.fedavg import FedmiraFedAvg

SHAPES = {"layers.0.q_proj.lora_A.weight": (2, 4), "layers.0.q_proj.lora_B.weight": (4, 2)}


def _instruction(node_id: int) -> Message:
    metadata = Metadata(run_id=1, message_id=f"ins-{node_id}", src_node_id=0, dst_node_id=node_id,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                        message_type=MessageType.TRAIN)
    return Message(content=RecordDict(), metadata=metadata)


def _reply(node_id: int, arrays: dict[str, np.ndarray], n: int, **metrics: float) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, **metrics}),
        "site": ConfigRecord({"site-id": f"site_{node_id}"}),
    })
    return Message(content, reply_to=_instruction(node_id))


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _strategy(**kw: Any) -> FedmiraFedAvg:
    strategy = FedmiraFedAvg(round_config_fn=lambda g: {"lr": 0.01, "local-steps": 1}, **kw)
    strategy.expected = dict(SHAPES)
    strategy.global_arrays = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    strategy.available = 4
    return strategy


def test_budget_spent_sites_are_left_out_and_their_epsilon_reported() -> None:
    strategy = _strategy(min_train_nodes=2)  # a spent site is not a failure: 1 trained + 1 spent is enough
    replies = [_reply(1, _arrays(1), 5, **{"dp-epsilon": 3.0}),
               _reply(2, _arrays(2), 0, **{"dp-epsilon": 8.0, "dp-budget-spent": 1})]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and metrics["num-sites"] == 1
    for key, value in arrays.items():
        np.testing.assert_allclose(value.numpy(), _arrays(1)[key])  # only the site that trained
    record = strategy.round_record(1)
    assert record["privacy"]["record_level"] == {"max_epsilon": 8.0, "sites": {"site_1": 3.0, "site_2": 8.0}}
    assert set(record["train_sites"]) == {"site_1", "site_2"}


def test_when_every_site_is_spent_the_adapter_is_unchanged() -> None:
    strategy = _strategy(min_train_nodes=1)
    strategy.global_arrays = _arrays(9)
    replies = [_reply(1, _arrays(1), 0, **{"dp-epsilon": 8.0, "dp-budget-spent": 1})]
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert metrics is None and arrays is not None
    for key, value in arrays.items():
        np.testing.assert_array_equal(value.numpy(), _arrays(9)[key])


def test_site_level_dp_in_the_strategy_clips_and_accounts() -> None:
    ledger = SiteLevelLedger(noise_multiplier=1.0, clip=0.5, delta=1e-3)
    strategy = _strategy(site_dp=ledger, seed=3)
    replies = [_reply(i, _arrays(i), 10 * i) for i in (1, 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    strategy.current_round = 1  # the same seeded noise as the strategy drew
    expected, _ = site_level_aggregate(strategy.global_arrays, [_arrays(1), _arrays(2)], clip=0.5,
                                       noise_multiplier=1.0, rng=strategy.rule.combiner.rng(1))  # type: ignore[attr-defined]
    for key, value in arrays.items():
        np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-6)
    assert ledger.history == [[1.0, 2 / 4, 1]]
    summary = strategy.round_record(1)["privacy"]["site_level"]
    assert summary["epsilon"] == pytest.approx(epsilon_for([(1.0, 0.5, 1)], 1e-3))
    resumed = _strategy(site_dp=SiteLevelLedger(noise_multiplier=1.0, clip=0.5, delta=1e-3))
    resumed.restore_privacy(json.loads(json.dumps(strategy.round_record(1)["privacy"])))
    assert resumed.site_dp is not None and resumed.site_dp.rounds == 1


# --------------------------------------------------------------------------- the ClientApp
@pytest.fixture
def site_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from fedmira.common.synthetic import make_synthetic_corpus

    monkeypatch.setattr(client_app, "_MODELS", ModelCache())
    monkeypatch.setattr(client_app, "_SITES", {})
    reports = list(make_synthetic_corpus(num_sites=2, num_reports=30, seed=3))[:12]
    folder = tmp_path / "site_x"
    write_jsonl(reports[:10], folder / "train.jsonl")
    write_jsonl(reports[10:], folder / "val.jsonl")
    return folder


def _train(cfg: ExperimentConfig, state: dict[str, torch.Tensor], ctx: Context, g: int) -> MetricRecord:
    metadata = Metadata(run_id=1, message_id=f"m{g}", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id=str(g), created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN)
    conf = {"lr": 5e-3, "local-steps": cfg.train.steps, "global-round": g}
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(conf)})
    msg = Message(content=content, metadata=metadata)
    reply = client_app.train(msg, ctx)
    assert not reply.has_error(), reply.error
    return reply.content["metrics"]


def test_the_site_ledger_grows_per_round_stops_at_the_budget_and_survives_a_restart(
    site_dir: Path, tmp_path: Path,
) -> None:
    cfg = compose_config(["+debug=tiny", "privacy=dp", "privacy.target_epsilon=0",
                          "privacy.noise_multiplier=1.0", "privacy.max_epsilon=5.0", "train.steps=2",
                          "train.batch_size=2", "strategy.rounds=4", f"run.dir={tmp_path / 'run-1'}"])
    state = get_adapter_state(apply_lora(load_base_model(cfg.model).model, cfg.lora, seed=cfg.train.seed))
    node = {"data-path": str(site_dir), "site-id": "site_x", "state-dir": str(tmp_path / "state")}
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())
    eps = []
    for g in (1, 2):
        metrics = _train(cfg, state, ctx, g)
        eps.append(float(metrics["dp-epsilon"]))
        assert metrics["dp-sample-rate"] == pytest.approx(2 / 10) and metrics["num-examples"] == 10
    # 3.45, 4.24
    assert eps == pytest.approx([epsilon_for([(1.0, 0.2, 2)], 1e-5), epsilon_for([(1.0, 0.2, 4)], 1e-5)])
    ledger_path = tmp_path / "state" / "privacy" / "run-1.json"
    saved = json.loads(ledger_path.read_text())
    assert saved["history"] == [[1.0, 0.2, 4]] and saved["rounds"] == [1, 2]
    assert set(saved) == {"mechanism", "delta", "unit", "units", "noise_multiplier", "sample_rate",
                          "planned_steps", "history", "rounds", "version"}  # numbers only, no report text
    # a SuperNode restart: fresh node state, the file is what is left
    restarted = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                        run_config=cfg.to_run_config())
    spent = None
    for g in range(3, 12):
        metrics = _train(cfg, state, restarted, g)
        assert float(metrics["dp-epsilon"]) <= 5.0 + 1e-9
        if metrics["dp-budget-spent"] == 1 and metrics["dp-steps"] == 0:
            spent = g
            assert metrics["num-examples"] == 0  # the server leaves it out of the mean
            break
    assert spent is not None, "the budget was never reached"
    assert float(metrics["dp-epsilon"]) > eps[1]


def test_model_card_states_privacy_and_epsilon_per_site() -> None:
    from fedmira.common.export import _privacy_section, privacy_line

    cfg = compose_config(["privacy=dp", "privacy.target_epsilon=3"])
    assert privacy_line(cfg).startswith("DP-SGD per record (target epsilon 3, delta 1e-05")
    assert "no differential privacy" in privacy_line(compose_config([]))
    assert "site-level DP (clip 1" in privacy_line(compose_config(["privacy=site_dp"]))
    lines = _privacy_section({"record_level": {"max_epsilon": 2.5, "sites": {"site_01": 2.5}},
                              "site_level": {"epsilon": 1.25, "delta": 1e-3, "rounds": 3}})
    assert "| site_01 | 2.500     |" in lines
    assert any("epsilon 1.250 at delta 0.001 after 3 rounds" in x for x in lines)
