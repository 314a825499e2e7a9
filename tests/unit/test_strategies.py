"""Every strategy of ``server/`` on hand-built replies: exact aggregates, rejections, bytes, state.

Replies are real Flower ``Message`` objects (helpers from test_strategy.py). Expected values are
computed independently here (FedAdam's step by its formula, FFA-LoRA's frozen A bit for bit,
hetero_svd against the dense sum of the updates).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi

from fedmira.common.aggregation import dense_update, hetero_aggregate, truncate_adapter
from fedmira.common.config import STRATEGY_NAMES, ExperimentConfig
from fedmira.common.rundir import excluded_count, load_strategy_state, save_strategy_state
from fedmira.common.transport import encode_tensor
from fedmira.server.fedadagrad import FedmiraFedAdagrad
from fedmira.server.fedadam import FedmiraFedAdam
from fedmira.server.fedavg import FedmiraFedAvg
from fedmira.server.fedyogi import FedmiraFedYogi
from fedmira.server.ffa_lora import FedmiraFFALoRA
from fedmira.server.hetero_svd import FedmiraHeteroSVD
from fedmira.server.strategies import STRATEGIES, build_strategy
from fedmira.server.strategy import FedmiraStrategy, RoundFailed
from tests.unit.test_strategy import SHAPES, _arrays, _error_reply, _grid, _numpy, _reply, task_identity  # noqa: F401

KEY_A, KEY_B = sorted(SHAPES)  # "...lora_A.weight" (2, 4), "...lora_B.weight" (4, 2)
ALPHA = 16.0


def _cfg(name: str, **strategy: Any) -> ExperimentConfig:
    base = ExperimentConfig()
    return base.replace(strategy=dataclasses.replace(base.strategy, name=name, **strategy))


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _settings(g: int) -> dict[str, Any]:
    return {"lr": 0.01, "local-steps": 2}


def _mean(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    return {k: sum(wk * s[k].astype(np.float64) for wk, s in zip(w, states)) for k in states[0]}


# --------------------------------------------------------------------------- the factory
@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_builds_on_one_fedmira_class_around_flowers_algorithm(name: str) -> None:
    """Issue 15: composition, not a multiple-inheritance sandwich. Each strategy class inherits
    from FedmiraStrategy only (no second fedmira class anywhere in its MRO) and *has* Flower's
    algorithm, which samples, sets the messages and takes the server step."""
    strategy = build_strategy(_cfg(name), round_offset=2, comm_offset=(5, 7))
    cls = type(strategy)
    assert cls.__bases__ == (FedmiraStrategy,)
    fedmira_classes = [c for c in cls.__mro__ if c.__module__.startswith("fedmira.")]
    assert fedmira_classes == [cls, FedmiraStrategy]
    flower = {"fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
    assert type(strategy.algorithm) is flower.get(name, FedAvg)
    assert not isinstance(strategy, FedAvg)  # Flower's class is a part, not a parent
    assert strategy.round_offset == 2 and strategy.ledger.comm_offset == (5, 7)
    assert strategy.min_train_nodes == ExperimentConfig().strategy.min_train_sites
    assert set(STRATEGIES) == set(STRATEGY_NAMES)


def test_factory_passes_algorithm_settings() -> None:
    prox = build_strategy(_cfg("fedprox", proximal_mu=0.3))
    assert prox.algorithm.proximal_mu == 0.3  # type: ignore[attr-defined]
    adam = build_strategy(_cfg("fedadam", server_lr=0.2, beta_1=0.5, beta_2=0.6, tau=0.01))
    settings = (adam.algorithm.eta, adam.algorithm.beta_1, adam.algorithm.beta_2, adam.algorithm.tau)  # type: ignore[attr-defined]
    assert settings == (0.2, 0.5, 0.6, 0.01)
    hetero = build_strategy(_cfg("hetero_svd", site_ranks=[2, 4]))
    assert isinstance(hetero, FedmiraHeteroSVD) and hetero.max_rank == 8 and hetero.alpha == 16
    robust = build_strategy(_cfg("fedavg", aggregation="trimmed_mean", trim_fraction=0.2, norm_factor=3.0))
    assert (robust.aggregation, robust.trim_fraction, robust.norm_factor) == ("trimmed_mean", 0.2, 3.0)


def test_fedprox_sends_mu_with_the_round_settings(task_identity: None) -> None:
    strategy = build_strategy(_cfg("fedprox", proximal_mu=0.25))
    messages = list(strategy.configure_train(1, _record(_arrays(0)), ConfigRecord(), _grid([1, 2])))
    config = messages[0].content["config"]
    assert config["proximal-mu"] == 0.25 and config["local-steps"] == ExperimentConfig().train.steps


# --------------------------------------------------------------------------- robustness
def test_an_update_far_beyond_the_others_is_rejected_and_the_rest_averaged(task_identity: None) -> None:
    strategy = FedmiraFedAvg(round_config_fn=_settings, norm_factor=10.0)
    glob = _arrays(0)
    strategy.configure_train(1, _record(glob), ConfigRecord(), _grid([1, 2, 3, 4]))
    states = [{k: glob[k] + 0.1 * v for k, v in _arrays(s).items()} for s in (1, 2, 3)]
    huge = {k: glob[k] + 50.0 * v for k, v in _arrays(4).items()}
    replies = [_reply(i + 1, s, i + 1, 1.0) for i, s in enumerate(states)]
    arrays, metrics = strategy.aggregate_train(1, [*replies, _reply(4, huge, 100, 1.0, site="site_big")])

    assert metrics is not None and metrics["num-sites"] == 3
    for key, value in _numpy(arrays).items():  # type: ignore[arg-type]
        np.testing.assert_allclose(value, _mean(states, [1, 2, 3])[key], rtol=1e-6)
    (rejected,) = strategy.ledger.rejected[1]
    assert rejected["site"] == "site_big" and "strategy.norm_factor=10" in rejected["reason"]
    norms = {s: m["update-norm"] for s, m in strategy.round_record(1)["train_sites"].items()}
    assert set(norms) == {"site_01", "site_02", "site_03"} and all(0 < n < 1 for n in norms.values())


def test_norms_are_compared_per_unit_of_learning_rate(task_identity: None) -> None:
    """Sites that took different work (train.epochs, warm-up) are not outliers for it: a site
    of 20 full-rate steps moves far more than one of 2 warm-up steps, per lr it does not."""
    strategy = FedmiraFedAvg(round_config_fn=_settings, norm_factor=10.0)
    glob = _arrays(0)
    strategy.configure_train(1, _record(glob), ConfigRecord(), _grid([1, 2, 3]))
    work = [(1, 0.06), (2, 0.002), (3, 0.002)]  # (node, lr-sum): node 1 did 30x the work
    replies = []
    for node, lr_sum in work:
        state = {k: glob[k] + (lr_sum * 30) * v for k, v in _arrays(node).items()}
        reply = _reply(node, state, 10, 1.0)
        reply.content["metrics"]["lr-sum"] = lr_sum
        replies.append(reply)
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None and metrics["num-sites"] == 3 and not strategy.ledger.rejected.get(1)
    # a reply that moved 50x more per unit of lr than the others is still caught
    strategy.configure_train(2, _record(glob), ConfigRecord(), _grid([1, 2, 3]))
    replies[0] = _reply(1, {k: glob[k] + 0.06 * 30 * 50 * v for k, v in _arrays(1).items()}, 10, 1.0)
    replies[0].content["metrics"]["lr-sum"] = 0.06
    _, metrics = strategy.aggregate_train(2, replies)
    assert metrics is not None and metrics["num-sites"] == 2
    assert "per unit of learning rate" in strategy.ledger.rejected[2][0]["reason"]


def test_a_nan_site_is_excluded_and_the_round_completes(task_identity: None) -> None:
    strategy = FedmiraFedAvg(round_config_fn=_settings, min_train_nodes=2)
    strategy.configure_train(1, _record(_arrays(0)), ConfigRecord(), _grid([1, 2, 3]))
    nan = _arrays(3)
    nan[KEY_A][0, 1] = np.nan
    arrays, metrics = strategy.aggregate_train(
        1, [_reply(1, _arrays(1), 1, 1.0), _reply(2, _arrays(2), 3, 1.0),
            _reply(3, nan, 5, 1.0, site="site_nan")])
    assert arrays is not None and metrics is not None and metrics["num-sites"] == 2
    for key, value in _numpy(arrays).items():
        np.testing.assert_allclose(value, _mean([_arrays(1), _arrays(2)], [1, 3])[key], rtol=1e-6)
    assert strategy.ledger.rejected[1][0]["site"] == "site_nan"


@pytest.mark.parametrize(("method", "expected"), [
    ("median", 2.0), ("trimmed_mean", (1.0 + 2.0 + 3.0) / 3), ("mean", (1 + 2 + 3 + 0 + 80) / 5)])
def test_robust_aggregation_through_the_strategy(method: str, expected: float) -> None:
    """Five sites, one wild (80): median and a 20%-trimmed mean ignore it, the mean does not."""
    strategy = FedmiraFedAvg(round_config_fn=_settings, aggregation=method, trim_fraction=0.2, norm_factor=0)
    strategy.expected = dict(SHAPES)
    replies = [_reply(i + 1, {k: np.full(s, v, np.float32) for k, s in SHAPES.items()}, 1, 1.0)
               for i, v in enumerate([1.0, 2.0, 3.0, 0.0, 80.0])]
    arrays, _ = strategy.aggregate_train(1, replies)
    for value in _numpy(arrays).values():  # type: ignore[arg-type]
        np.testing.assert_allclose(value, np.full(value.shape, expected), rtol=1e-6)


def test_sixteen_bit_replies_are_decoded_to_float32_before_averaging() -> None:
    strategy = FedmiraFedAvg(round_config_fn=_settings)
    strategy.expected = dict(SHAPES)
    s1, s2 = _arrays(1), _arrays(2)
    bf = {k: encode_tensor(torch.from_numpy(v), "bfloat16") for k, v in s1.items()}
    half = {k: v.astype(np.float16) for k, v in s2.items()}
    arrays, _ = strategy.aggregate_train(1, [_reply(1, bf, 1, 1.0), _reply(2, half, 3, 1.0)])
    rounded1 = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in s1.items()}
    rounded2 = {k: v.astype(np.float16).astype(np.float32) for k, v in s2.items()}
    for key, value in _numpy(arrays).items():  # type: ignore[arg-type]
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, _mean([rounded1, rounded2], [1, 3])[key], rtol=1e-6)


def test_an_integer_payload_is_rejected_naming_the_dtype() -> None:
    strategy = FedmiraFedAvg(round_config_fn=_settings, min_train_nodes=1)
    strategy.expected = dict(SHAPES)
    ints = {k: np.zeros(s, np.int32) for k, s in SHAPES.items()}
    replies = [_reply(1, _arrays(1), 1, 1.0), _reply(2, ints, 1, 1.0, site="x")]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None and metrics["num-sites"] == 1
    assert "int32" in strategy.ledger.rejected[1][0]["reason"]


def test_sites_that_miss_the_timeout_are_logged(
    task_identity: None, caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = FedmiraFedAvg(round_config_fn=_settings, min_train_nodes=1)
    strategy.configure_train(1, _record(_arrays(0)), ConfigRecord(), _grid([1, 2, 3]))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        replies = [_reply(1, _arrays(1), 1, 1.0), _reply(2, _arrays(2), 1, 1.0)]
        _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None and metrics["num-sites"] == 2
    why = "no reply before the round timeout (strategy.round_timeout_s)"
    assert strategy.ledger.rejected[1] == [{"site": "node-3", "node": 3, "reason": why}]
    with pytest.raises(RoundFailed):  # and a round with nobody back still fails loudly
        strategy.configure_train(2, _record(_arrays(0)), ConfigRecord(), _grid([1, 2, 3]))
        strategy.aggregate_train(2, [])


def test_a_site_lost_in_training_and_evaluation_counts_once_by_its_allow_list_name(
    task_identity: None,
) -> None:
    """Issue 14: one lost hospital was "2 site(s) excluded" (its node id, then its site id). Named
    from the allow-list before it ever replied (round 1 of a resumed run), counted by node."""
    strategy = FedmiraFedAvg(round_config_fn=_settings, min_train_nodes=1, evaluate_every=1,
                             total_rounds=1)
    strategy.ledger.node_names = {3: "hospital_03"}
    strategy.configure_train(1, _record(_arrays(0)), ConfigRecord(), _grid([1, 2, 3]))
    strategy.aggregate_train(1, [_reply(1, _arrays(1), 1, 1.0), _reply(2, _arrays(2), 1, 1.0)])
    strategy.aggregate_evaluate(1, [_error_reply(3, "TimeoutError: node offline")])
    rejected = strategy.round_record(1)["rejected"]
    assert [(r["site"], r["node"]) for r in rejected] == [("hospital_03", 3), ("hospital_03", 3)]
    assert excluded_count(rejected) == 1
    assert excluded_count([{"site": "a"}, {"site": "a"}, {"site": "b"}]) == 2  # records of older runs


def _superlink_error(about: str) -> Any:
    """What Flower's SuperLink returns for a node that stopped sending heartbeats: an error reply
    from SUPERLINK_NODE_ID (1) to the instruction id, not from the node itself."""
    import time as _time

    from flwr.app import Error, Message, Metadata, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    ins = Message(content=RecordDict(), metadata=Metadata(
        run_id=1, message_id=about, src_node_id=0, dst_node_id=SUPERLINK_NODE_ID, reply_to_message_id="",
        group_id="1", created_at=_time.time(), ttl=3600.0, message_type="train"))
    return Message(error=Error(code=0, reason="Error: Node Unavailable - no heartbeat"), reply_to=ins)


@pytest.mark.parametrize("ids_known", [True, False])
def test_the_superlinks_node_unavailable_reply_excludes_that_node_once_not_node_1(
    task_identity: None, ids_known: bool,
) -> None:
    """Found by the loopback rehearsal: a hospital killed mid-round came back as an error reply
    from node 1 (the SuperLink), which the allow-list refused as "node-1", and the hospital was
    excluded a second time for its timeout: "2 site(s) excluded" for one lost site."""
    strategy = FedmiraFedAvg(round_config_fn=_settings, min_train_nodes=1, norm_factor=0)
    strategy.allowed_nodes = lambda: frozenset({2, 3, 4})
    strategy.ledger.node_names = {4: "hospital_04"}
    messages = strategy.configure_train(1, _record(_arrays(0)), ConfigRecord(), _grid([2, 3, 4]))
    for m in messages:  # what the grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"ins-{m.metadata.dst_node_id}" if ids_known else ""
    replies = [_reply(2, _arrays(1), 1, 1.0), _reply(3, _arrays(2), 1, 1.0), _superlink_error("ins-4")]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None and metrics["num-sites"] == 2
    (entry,) = strategy.ledger.rejected[1]
    assert (entry["site"], entry["node"]) == ("hospital_04", 4)
    assert ("Node Unavailable" in entry["reason"]) is ids_known and "allow-list" not in entry["reason"]


def test_messages_carry_the_flags_of_their_algorithm(task_identity: None) -> None:
    """The client obeys these flags (issue 15: it no longer compares strategy names)."""
    expected = (("fedavg", {}), ("ffa_lora", {"freeze-lora-a": True}), ("hetero_svd", {"own-rank": True}))
    for name, flags in expected:
        strategy = build_strategy(_cfg(name, **({"site_ranks": [2, 4]} if name == "hetero_svd" else {})))
        train = strategy.configure_train(1, _record(_arrays(0)), ConfigRecord(), _grid([1, 2]))
        for m in train:
            conf = dict(m.content["config"])
            assert {k: conf[k] for k in ("freeze-lora-a", "own-rank") if k in conf} == flags, name
        strategy.evaluate_every = 1
        for m in strategy.configure_evaluate(1, _record(_arrays(0)), ConfigRecord(), _grid([1, 2])):
            assert all(m.content["config"][k] == v for k, v in flags.items()), name


# --------------------------------------------------------------------------- communication
def test_bytes_up_and_down_per_site_and_cumulative(task_identity: None) -> None:
    strategy = FedmiraFedAvg(round_config_fn=_settings, comm_offset=(100, 200), evaluate_every=1,
                             total_rounds=2)
    glob = _record(_arrays(0))
    full = sum(int(np.prod(s)) * 4 for s in SHAPES.values())  # 64 bytes
    for server_round in (1, 2):
        strategy.configure_train(server_round, glob, ConfigRecord(), _grid([1, 2]))
        bf = {k: encode_tensor(torch.from_numpy(v), "bfloat16") for k, v in _arrays(server_round).items()}
        strategy.aggregate_train(server_round, [_reply(1, _arrays(1), 1, 1.0), _reply(2, bf, 1, 1.0)])
        strategy.configure_evaluate(server_round, glob, ConfigRecord(), _grid([1, 2]))

    comm = strategy.round_record(2)["comm"]
    json.dumps(comm)
    assert comm["sites"] == {"site_01": {"up_bytes": full, "down_bytes": 2 * full},
                             "site_02": {"up_bytes": full // 2, "down_bytes": 2 * full}}
    assert comm["up_bytes"] == full + full // 2 and comm["down_bytes"] == 4 * full
    assert comm["cumulative_up_bytes"] == 100 + 2 * (full + full // 2)
    assert comm["cumulative_down_bytes"] == 200 + 2 * 4 * full
    assert comm["cumulative_bytes"] == comm["cumulative_up_bytes"] + comm["cumulative_down_bytes"]
    assert strategy.round_record(1)["comm"]["cumulative_up_bytes"] == 100 + full + full // 2


# --------------------------------------------------------------------------- server optimizers
def _adam_step(current: dict[str, np.ndarray], mean: dict[str, np.ndarray], t: int, eta: float,
               b1: float, b2: float, tau: float) -> dict[str, np.ndarray]:
    """FedAdam (Reddi et al.) as Flower implements it, from zero moments, at round t."""
    out = {}
    for k, x in current.items():
        delta = mean[k] - x
        m, v = (1 - b1) * delta, (1 - b2) * delta**2
        eta_t = eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        out[k] = x + eta_t * m / (np.sqrt(v) + tau)
    return out


def test_fedadam_step_uses_the_global_round(task_identity: None) -> None:
    """After a resume (offset 4) the bias correction must be that of round 5, not round 1."""
    strategy = FedmiraFedAdam(round_config_fn=_settings, round_offset=4, eta=0.1, eta_l=0.01,
                              beta_1=0.9, beta_2=0.99, tau=1e-3)
    glob = _arrays(0)
    strategy.configure_train(1, _record(glob), ConfigRecord(), _grid([1, 2]))
    states = [_arrays(1), _arrays(2)]
    arrays, _ = strategy.aggregate_train(1, [_reply(1, states[0], 1, 1.0), _reply(2, states[1], 3, 1.0)])
    want = _adam_step(glob, _mean(states, [1, 3]), 5, 0.1, 0.9, 0.99, 1e-3)
    for key, value in _numpy(arrays).items():  # type: ignore[arg-type]
        assert value.dtype == np.float32  # Flower's math promotes to float64; the global stays fp32
        np.testing.assert_allclose(value, want[key], rtol=1e-5)


@pytest.mark.parametrize("cls", [FedmiraFedAdam, FedmiraFedYogi, FedmiraFedAdagrad])
def test_server_optimizer_state_survives_a_checkpoint(cls: type, task_identity: None, tmp_path: Path) -> None:
    """Rounds 1+2 in one process == round 1, save, new process restores, round 2."""
    kw = {"round_config_fn": _settings, "eta": 0.05, "eta_l": 0.01, "tau": 1e-3}

    def one_round(strategy: Any, server_round: int, glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        strategy.configure_train(server_round, _record(glob), ConfigRecord(), _grid([1, 2]))
        g = strategy.global_round(server_round)  # the sites' replies depend on the round
        replies = [_reply(1, _arrays(10 * g + 1), 1, 1.0), _reply(2, _arrays(10 * g + 2), 2, 1.0)]
        return _numpy(strategy.aggregate_train(server_round, replies)[0])

    straight = cls(**kw)
    after_1 = one_round(straight, 1, _arrays(0))
    after_2 = one_round(straight, 2, after_1)

    first = cls(**kw)
    np.testing.assert_array_equal(one_round(first, 1, _arrays(0))[KEY_A], after_1[KEY_A])
    tensors, meta = first.strategy_state()
    assert meta == {"strategy": cls.__name__, "t": "1"} and any(k.startswith("v_t/") for k in tensors)
    save_strategy_state(tmp_path, tensors, meta)
    resumed = cls(round_offset=1, **kw)
    resumed.load_strategy_state(*load_strategy_state(tmp_path))  # type: ignore[misc]
    for key, value in one_round(resumed, 1, after_1).items():
        np.testing.assert_allclose(value, after_2[key], rtol=1e-6)


def test_strategy_state_of_another_strategy_is_refused() -> None:
    adam = FedmiraFedAdam(round_config_fn=_settings)
    with pytest.raises(ValueError, match="FedmiraFedYogi"):
        adam.load_strategy_state({}, {"strategy": "FedmiraFedYogi", "t": "1"})
    assert FedmiraFedAvg(round_config_fn=_settings).strategy_state() is None
    assert load_strategy_state(Path("/nonexistent")) is None


# --------------------------------------------------------------------------- FFA-LoRA
def test_ffa_lora_averages_b_and_keeps_a_bit_for_bit(task_identity: None) -> None:
    strategy = FedmiraFFALoRA(round_config_fn=_settings, min_train_nodes=1)
    glob = _arrays(0)
    strategy.configure_train(1, _record(glob), ConfigRecord(), _grid([1, 2, 3]))
    b1, b2 = {KEY_B: _arrays(1)[KEY_B]}, {KEY_B: _arrays(2)[KEY_B]}
    with_a = _arrays(3)  # a site that (wrongly) trained and sent A too
    arrays, metrics = strategy.aggregate_train(
        1, [_reply(1, b1, 1, 1.0), _reply(2, b2, 3, 1.0), _reply(3, with_a, 5, 1.0, site="site_a")])

    got = _numpy(arrays)  # type: ignore[arg-type]
    assert np.array_equal(got[KEY_A], glob[KEY_A])
    np.testing.assert_allclose(got[KEY_B], _mean([b1, b2], [1, 3])[KEY_B], rtol=1e-6)
    assert metrics is not None and metrics["num-sites"] == 2
    (rejected,) = strategy.ledger.rejected[1]
    assert rejected["site"] == "site_a" and KEY_A in rejected["reason"]
    # the update the global adapter applies is exactly the mean of the sites' updates
    dense = [b[KEY_B].astype(np.float64) @ glob[KEY_A] for b in (b1, b2)]
    np.testing.assert_allclose(got[KEY_B] @ got[KEY_A], (dense[0] + 3 * dense[1]) / 4, rtol=1e-5)


# --------------------------------------------------------------------------- heterogeneous ranks
LAYERS = {"m0.q_proj": (12, 10), "m0.v_proj": (6, 10)}


def _lora(rank: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for m, (d, n) in LAYERS.items():
        out[f"{m}.lora_A.weight"] = rng.standard_normal((rank, n)).astype(np.float32)
        out[f"{m}.lora_B.weight"] = rng.standard_normal((d, rank)).astype(np.float32)
    return out


def test_hetero_svd_sums_mixed_rank_updates_and_sends_each_site_its_rank(task_identity: None) -> None:
    strategy = FedmiraHeteroSVD(round_config_fn=_settings, alpha=ALPHA, max_rank=8, min_train_nodes=1)
    glob = hetero_aggregate([_lora(8, 0)], [1], alpha=ALPHA, rank=8)  # a global adapter in SVD form
    sent = strategy.configure_train(1, _record(glob), ConfigRecord(), _grid([1, 2, 3, 4]))
    # ranks are not known yet: everybody gets the full rank-8 adapter
    assert all(m.content["arrays"]["m0.q_proj.lora_A.weight"].shape == (8, 10) for m in sent)

    s4, s8 = _lora(4, 1), _lora(8, 2)
    nan = _lora(4, 3)
    nan["m0.v_proj.lora_B.weight"][0, 0] = np.nan
    too_big = _lora(16, 4)
    arrays, metrics = strategy.aggregate_train(1, [
        _reply(1, s4, 1, 1.0), _reply(2, s8, 3, 1.0), _reply(3, nan, 9, 1.0, site="site_nan"),
        _reply(4, too_big, 9, 1.0, site="site_r16")])

    assert metrics is not None and metrics["num-sites"] == 2
    reasons = {r["site"]: r["reason"] for r in strategy.ledger.rejected[1]}
    assert set(reasons) == {"site_nan", "site_r16"} and "lora.r=8" in reasons["site_r16"]
    got = dense_update(_numpy(arrays), ALPHA)  # type: ignore[arg-type]
    want = {m: 0.25 * dense_update(s4, ALPHA)[m] + 0.75 * dense_update(s8, ALPHA)[m] for m in LAYERS}
    for m in LAYERS:
        u, s, vt = np.linalg.svd(want[m], full_matrices=False)
        best = (u[:, :8] * s[:8]) @ vt[:8]
        assert np.linalg.norm(got[m] - best) / np.linalg.norm(best) < 1e-5
    assert strategy.rule.node_ranks == {1: 4, 2: 8}

    # Round 2: node 1 gets the rank-4 cut (what it would have cut itself), node 2 full rank
    new = _numpy(arrays)  # type: ignore[arg-type]
    messages = strategy.configure_train(2, arrays, ConfigRecord(), _grid([1, 2]))
    sent = {m.metadata.dst_node_id: m for m in messages}
    cut = {k: v.numpy() for k, v in sent[1].content["arrays"].items()}
    assert cut["m0.q_proj.lora_A.weight"].shape == (4, 10)
    for k, v in truncate_adapter(new, 4).items():
        np.testing.assert_array_equal(cut[k], v)
    assert sent[2].content["arrays"]["m0.q_proj.lora_B.weight"].shape == (12, 8)
    assert sent[1].content["config"]["global-round"] == 2
    down = strategy.round_record(2)["comm"]["sites"]
    assert down["site_01"]["down_bytes"] * 2 == down["site_02"]["down_bytes"]


# --------------------------------------------------------------------------- allow-list
def test_a_node_off_the_allow_list_is_never_sampled_and_its_reply_is_refused(
        task_identity: None, caplog: pytest.LogCaptureFixture) -> None:
    """Deployment: a node whose key a third party registered (node 9) gets no task, and a reply
    claiming to come from it is excluded; the round goes on with the allow-listed nodes."""
    strategy = FedmiraFedAvg(round_config_fn=_settings, norm_factor=0, min_train_nodes=2)
    strategy.allowed_nodes = lambda: frozenset({1, 2})
    glob = _arrays(0)
    with caplog.at_level(logging.WARNING):
        messages = list(strategy.configure_train(1, _record(glob), ConfigRecord(), _grid([1, 2, 9])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    assert "node 9 is not on the allow-list" in caplog.text
    replies = [_reply(1, _arrays(1), 1, 1.0), _reply(2, _arrays(2), 1, 1.0), _reply(9, _arrays(3), 50, 1.0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None and metrics["num-sites"] == 2
    for key, value in _numpy(arrays).items():  # type: ignore[arg-type]
        np.testing.assert_allclose(value, _mean([_arrays(1), _arrays(2)], [1, 1])[key], rtol=1e-6)
    refused = [r for r in strategy.ledger.rejected[1] if "allow-list" in r["reason"]]
    assert [r["site"] for r in refused] == ["node-9"]  # once, by node id: its site id is not trusted
    evaluate = list(strategy.configure_evaluate(4, _record(glob), ConfigRecord(), _grid([1, 2, 9])))
    assert 9 not in {m.metadata.dst_node_id for m in evaluate}


def test_without_an_allow_list_every_node_takes_part(task_identity: None) -> None:
    strategy = FedmiraFedAvg(round_config_fn=_settings)
    messages = list(strategy.configure_train(1, _record(_arrays(0)), ConfigRecord(), _grid([1, 2, 9])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 9]


# --------------------------------------------------------------------------- composition
def test_hetero_svd_refuses_a_same_shape_combiner_such_as_site_level_dp() -> None:
    from fedmira.common.privacy import SiteLevelLedger

    with pytest.raises(ValueError, match="privacy.site_level does not work with strategy=hetero_svd"):
        FedmiraHeteroSVD(round_config_fn=_settings, alpha=ALPHA, max_rank=8,
                         site_dp=SiteLevelLedger(noise_multiplier=1.0, clip=0.5, delta=1e-3))


def test_the_server_step_does_not_log_its_combined_reply_as_a_site(
    task_identity: None, caplog: pytest.LogCaptureFixture,
) -> None:
    """Flower's algorithm gets the round's combined adapter as one reply; its "Received 1
    results" line would tell an operator that one site answered when two did."""
    strategy = FedmiraFedAdam(round_config_fn=_settings, eta=0.1, eta_l=0.01)
    strategy.configure_train(1, _record(_arrays(0)), ConfigRecord(), _grid([1, 2]))
    with caplog.at_level(logging.INFO, logger="flwr"):
        replies = [_reply(1, _arrays(1), 1, 1.0), _reply(2, _arrays(2), 3, 1.0)]
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and metrics["num-sites"] == 2
    assert not any("Received" in r.getMessage() for r in caplog.records)
    assert strategy.algorithm.m_t is not None  # the step ran: Flower's FedAdam keeps its moments
