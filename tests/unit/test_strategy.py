"""FedmiraFedAvg on hand-built replies: exact weighted means, reply checks, bookkeeping.

Replies are real Flower ``Message`` objects built as the Message API builds them: an instruction
with explicit ``Metadata`` (no SuperLink needed) and ``Message(content | error, reply_to=...)``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedmira.server.fedavg import FedmiraFedAvg
from fedmira.server.strategy import RoundFailed, weighted_metrics

SHAPES = {"layers.0.q_proj.lora_A.weight": (2, 4), "layers.0.q_proj.lora_B.weight": (4, 2)}
NBYTES = sum(int(np.prod(s)) * 4 for s in SHAPES.values())


def _instruction(node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    metadata = Metadata(
        run_id=1, message_id=f"ins-{node_id}", src_node_id=0, dst_node_id=node_id,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=RecordDict(), metadata=metadata)


def _arrays(seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _reply(
    node_id: int, arrays: dict[str, Any], n: int, loss: float, *, site: str | None = None,
    message_type: str = MessageType.TRAIN,
) -> Message:
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})  # numpy or torch
    metrics = MetricRecord({"num-examples": n, "train-loss": loss, "bytes-sent": NBYTES,
                            "cold-start": 0, "site-index": node_id})
    content = RecordDict({
        "arrays": record,
        "metrics": metrics,
        "site": ConfigRecord({"site-id": site or f"site_0{node_id}"}),
    })
    return Message(content, reply_to=_instruction(node_id, message_type))


def _error_reply(node_id: int, reason: str | None = "ValueError: CUDA out of memory") -> Message:
    return Message(error=Error(code=0, reason=reason), reply_to=_instruction(node_id))


def _strategy(**kw: Any) -> FedmiraFedAvg:
    kw.setdefault("round_config_fn", lambda g: {"lr": 0.01, "local-steps": 3})
    strategy = FedmiraFedAvg(**kw)
    strategy.expected = dict(SHAPES)  # what configure_train records from the global adapter
    return strategy


def _three_good() -> tuple[list[Message], list[dict[str, np.ndarray]]]:
    states = [_arrays(1), _arrays(2), _arrays(3)]
    # one site sends torch tensors, as the real ClientApp does
    torch_state = {k: torch.from_numpy(v.copy()) for k, v in states[2].items()}
    replies = [
        _reply(1, states[0], 1, 2.0),
        _reply(2, states[1], 2, 4.0),
        _reply(3, torch_state, 3, 1.0),
    ]
    return replies, states


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages need the process's task identity (set by Flower's runtime)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def _grid(node_ids: list[int]) -> Mock:
    grid = Mock()
    grid.get_node_ids.return_value = list(node_ids)
    grid.send_and_receive.return_value = []  # site queries (sampled rounds) go unanswered
    return grid


# --------------------------------------------------------------------------- aggregation
def test_weighted_fedavg_of_three_replies_is_exact() -> None:
    strategy = _strategy()
    replies, states = _three_good()

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None and metrics is not None
    got = _numpy(arrays)
    assert set(got) == set(SHAPES)
    for key in SHAPES:
        expected = (1 * states[0][key] + 2 * states[1][key] + 3 * states[2][key]) / 6
        np.testing.assert_allclose(got[key], expected, rtol=1e-6)
        assert got[key].shape == SHAPES[key]
    assert metrics["train-loss"] == pytest.approx((1 * 2.0 + 2 * 4.0 + 3 * 1.0) / 6, rel=1e-12)
    assert metrics["num-examples"] == 6
    assert metrics["bytes-sent"] == 3 * NBYTES
    assert metrics["cold-start"] == 0
    assert metrics["num-sites"] == 3
    assert "site-index" not in metrics
    assert strategy.ledger.rejected == {}


def test_error_reply_is_excluded_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    strategy = _strategy()
    replies, states = _three_good()
    replies = [replies[0], _error_reply(7), replies[1]]

    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None and metrics is not None
    for key, value in _numpy(arrays).items():
        np.testing.assert_allclose(value, (1 * states[0][key] + 2 * states[1][key]) / 3, rtol=1e-6)
    assert metrics["num-sites"] == 2 and metrics["num-examples"] == 3
    assert strategy.ledger.rejected[1] == [
        {"site": "node-7", "node": 7, "reason": "site raised: ValueError: CUDA out of memory"}
    ]
    assert any("node-7" in r.getMessage() and "CUDA out of memory" in r.getMessage() for r in caplog.records)


def test_error_reply_without_reason_is_excluded() -> None:
    """``Error.reason`` is optional in Flower; a reason-less error must not crash the round."""
    strategy = _strategy()
    replies, _ = _three_good()
    _, metrics = strategy.aggregate_train(1, [replies[0], replies[1], _error_reply(9, reason=None)])

    assert metrics is not None and metrics["num-sites"] == 2
    assert strategy.ledger.rejected[1][0]["site"] == "node-9"


def test_bad_adapters_are_excluded_with_a_reason_naming_them() -> None:
    strategy = _strategy()
    replies, states = _three_good()
    key_a, key_b = sorted(SHAPES)

    nan_state = _arrays(10)
    nan_state[key_b][1, 0] = np.nan
    extra_state = {**_arrays(11), "layers.0.v_proj.lora_A.weight": np.zeros((2, 4), np.float32)}
    missing_state = {key_a: _arrays(12)[key_a]}
    shape_state = {key_a: _arrays(13)[key_a], key_b: np.zeros((4, 3), np.float32)}
    bad = [
        _reply(4, nan_state, 100, 9.0, site="site_nan"),
        _reply(5, extra_state, 100, 9.0, site="site_extra"),
        _reply(6, missing_state, 100, 9.0, site="site_missing"),
        _reply(8, shape_state, 100, 9.0, site="site_shape"),
    ]

    mixed = [bad[0], replies[0], bad[1], replies[1], bad[2], replies[2], bad[3]]
    arrays, metrics = strategy.aggregate_train(1, mixed)

    assert arrays is not None and metrics is not None
    for key, value in _numpy(arrays).items():
        expected = (1 * states[0][key] + 2 * states[1][key] + 3 * states[2][key]) / 6
        np.testing.assert_allclose(value, expected, rtol=1e-6)
    assert metrics["num-sites"] == 3 and metrics["num-examples"] == 6
    reasons = {r["site"]: r["reason"] for r in strategy.ledger.rejected[1]}
    assert set(reasons) == {"site_nan", "site_extra", "site_missing", "site_shape"}
    assert key_b in reasons["site_nan"] and "NaN" in reasons["site_nan"]
    assert "layers.0.v_proj.lora_A.weight" in reasons["site_extra"]
    assert key_b in reasons["site_missing"]
    assert key_b in reasons["site_shape"]
    assert set(strategy.ledger.site_metrics["train"][1]) == {"site_01", "site_02", "site_03"}


def test_inf_and_two_array_records_are_excluded() -> None:
    strategy = _strategy()
    replies, _ = _three_good()
    inf_state = _arrays(20)
    inf_state[sorted(SHAPES)[0]][0, 0] = np.inf
    two = _reply(5, _arrays(21), 4, 1.0, site="site_two")
    two.content["more"] = ArrayRecord({k: Array(v) for k, v in _arrays(22).items()})

    _, metrics = strategy.aggregate_train(1, [*replies, _reply(4, inf_state, 4, 1.0, site="site_inf"), two])

    assert metrics is not None and metrics["num-sites"] == 3
    reasons = {r["site"]: r["reason"] for r in strategy.ledger.rejected[1]}
    assert "Inf" in reasons["site_inf"]
    assert "one ArrayRecord" in reasons["site_two"]


def test_too_few_valid_replies_raise_round_failed() -> None:
    strategy = _strategy(min_train_nodes=2)
    replies, _ = _three_good()
    nan_state = _arrays(30)
    nan_state[sorted(SHAPES)[0]][:] = np.nan

    with pytest.raises(RoundFailed, match=r"strategy\.min_train_sites=2") as info:
        strategy.aggregate_train(1, [replies[0], _error_reply(5), _reply(6, nan_state, 5, 1.0)])
    assert "only 1 of 3" in str(info.value)
    assert len(strategy.ledger.rejected[1]) == 2


def test_round_record_and_round_offset() -> None:
    strategy = _strategy(round_offset=2)
    replies, _ = _three_good()

    _, metrics = strategy.aggregate_train(1, [*replies, _error_reply(9)])

    assert set(strategy.ledger.rejected) == {3} and set(strategy.ledger.site_metrics["train"]) == {3}
    record = strategy.round_record(3)
    json.dumps(record)  # goes to the run folder as JSON
    assert record["train"]["num-sites"] == 3
    assert record["train"]["train-loss"] == pytest.approx(13 / 6)
    assert set(record["train_sites"]) == {"site_01", "site_02", "site_03"}
    assert record["train_sites"]["site_02"]["num-examples"] == 2
    assert record["train_sites"]["site_02"]["train-loss"] == 4.0
    why = "site raised: ValueError: CUDA out of memory"
    assert record["rejected"] == [{"site": "node-9", "node": 9, "reason": why}]
    assert record["evaluate"] == {} and record["evaluate_sites"] == {}
    assert strategy.round_record(1)["train"] == {} and strategy.round_record(1)["rejected"] == []


def test_weighted_metrics_sums_counts_and_weights_the_rest() -> None:
    records = [
        RecordDict({"m": MetricRecord({"num-examples": 1, "val-loss": 3.0, "val-tokens": 10})}),
        RecordDict({"m": MetricRecord({"num-examples": 3, "val-loss": 1.0, "val-tokens": 30})}),
    ]
    out = weighted_metrics(records, "num-examples")
    assert dict(out) == {"num-examples": 4, "val-loss": pytest.approx(1.5), "val-tokens": 40, "num-sites": 2}


def test_evaluate_tolerates_a_site_without_validation_reports() -> None:
    """A site with no val split answers ``num-examples: 0`` and fewer keys (local_evaluate)."""
    strategy = _strategy()

    def ev(node: int, metrics: dict[str, Any]) -> Message:
        content = RecordDict({"metrics": MetricRecord({**metrics, "setup-s": 0.1, "cold-start": 0,
                                                       "site-index": node}),
                              "site": ConfigRecord({"site-id": f"site_0{node}"})})
        return Message(content, reply_to=_instruction(node, MessageType.EVALUATE))

    replies = [
        ev(1, {"num-examples": 1, "val-loss": 2.0, "val-tokens": 5, "rouge-l": 0.5, "eval-s": 1.0}),
        ev(2, {"num-examples": 0, "eval-s": 0.0}),
        ev(3, {"num-examples": 3, "val-loss": 4.0, "val-tokens": 7, "rouge-l": 0.1, "eval-s": 1.0}),
        Message(error=Error(code=0, reason="boom"), reply_to=_instruction(4, MessageType.EVALUATE)),
    ]

    metrics = strategy.aggregate_evaluate(1, replies)

    assert metrics is not None
    assert metrics["val-loss"] == pytest.approx((2.0 + 3 * 4.0) / 4)
    assert metrics["rouge-l"] == pytest.approx((0.5 + 3 * 0.1) / 4)
    assert metrics["num-examples"] == 4 and metrics["num-sites"] == 2
    record = strategy.round_record(1)
    assert set(record["evaluate_sites"]) == {"site_01", "site_02", "site_03"}
    assert record["rejected"][0]["site"] == "node-4"


# --------------------------------------------------------------------------- configuration
def test_configure_train_sends_round_settings_and_records_shapes(task_identity: None) -> None:
    strategy = FedmiraFedAvg(round_config_fn=lambda g: {"lr": 0.5 / g, "local-steps": 4}, round_offset=2,
                             total_rounds=5)
    arrays = ArrayRecord({k: Array(v) for k, v in _arrays(0).items()})

    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), _grid([11, 12, 13])))

    assert strategy.expected == SHAPES
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
    config = messages[0].content["config"]
    assert config["global-round"] == 3 and config["lr"] == pytest.approx(0.5 / 3)
    assert config["local-steps"] == 4 and config["server-round"] == 1
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)


def test_configure_train_samples_the_same_sites_for_the_same_round(task_identity: None) -> None:
    arrays = ArrayRecord({k: Array(v) for k, v in _arrays(0).items()})
    picks = []
    for _ in range(2):
        strategy = FedmiraFedAvg(round_config_fn=lambda g: {}, fraction_train=0.5, seed=5)
        messages = strategy.configure_train(1, arrays, ConfigRecord(), _grid(list(range(10, 20))))
        picks.append([m.metadata.dst_node_id for m in messages])
    assert picks[0] == picks[1] and len(picks[0]) == 5


@pytest.mark.parametrize("offset", [0, 1])
def test_configure_evaluate_only_on_due_rounds(task_identity: None, offset: int) -> None:
    strategy = _strategy(evaluate_every=2, total_rounds=5, round_offset=offset)
    arrays = ArrayRecord({k: Array(v) for k, v in _arrays(0).items()})
    grid = _grid([21, 22, 23, 24])

    sent = {}
    for server_round in range(1, 6 - offset):
        messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        sent[server_round + offset] = messages

    assert {g for g, msgs in sent.items() if msgs} == {2, 4, 5}  # every 2nd round and the last
    for g in (2, 4, 5):
        assert len(sent[g]) == 4
        assert all(m.metadata.message_type == MessageType.EVALUATE for m in sent[g])
        assert sent[g][0].content["config"]["global-round"] == g



def test_reply_without_metric_record_is_excluded_not_fatal() -> None:
    """A reply lacking its MetricRecord (or num-examples) is rejected; the round goes on."""
    strategy = _strategy(min_train_nodes=1)
    strategy.expected = dict(SHAPES)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in _arrays(1).items()}),
                          "site": ConfigRecord({"site-id": "site_z"})})
    msg = Message(content, reply_to=_instruction(5))
    assert strategy.check_reply(1, msg) is None
    assert "MetricRecord" in strategy.ledger.rejected[1][0]["reason"]
