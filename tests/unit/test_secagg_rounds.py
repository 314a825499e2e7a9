"""SecAgg+ rounds through the real strategy and the real ClientApp handlers, in one process.

A small in-process grid delivers each Message to ``client_app.train`` / ``secagg_stage`` /
``evaluate`` with one Context per node (so each site keeps its protocol state between stages,
as a SuperNode does), and records every reply the server receives. With it the tests show:
the SecAgg+ aggregate equals plain FedAvg within the stated quantization bound; no message the
server receives holds a site's adapter; sites that drop at any stage are recovered or fail
the round cleanly; and the refusals.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

import fedmira.client.client_app as client_app
from fedmira.common.adapters import get_adapter_state
from fedmira.common.compose import compose_config
from fedmira.common.config import ExperimentConfig
from fedmira.common.errors import ConfigError
from fedmira.common.model import apply_lora, load_base_model
from fedmira.common.reports import write_jsonl
from fedmira.common.secagg import RECORD, WEIGHT_KEY, SecAggParams, error_bound
from fedmira.common.site import ModelCache
from fedmira.common.synthetic import make_synthetic_corpus
from fedmira.server.strategies import build_strategy
from fedmira.server.strategy import RoundFailed

NODES = (101, 102, 103, 104)


class LocalGrid:
    """A Grid that runs the ClientApp handlers in this process, one Context per node.

    ``drop`` maps a stage (``advertise_keys | share_keys | masked_vector | unmask | evaluate``) to
    the nodes that fail it: they answer with an error reply, as a crashed ClientApp does.
    ``silent`` nodes at a stage answer nothing (a timeout).
    """

    def __init__(self, cfg: ExperimentConfig, folders: dict[int, Path]) -> None:
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, state=RecordDict(), run_config=cfg.to_run_config(),
                         node_config={"data-path": str(f), "site-id": f.name, "site-index": i})
            for i, (nid, f) in enumerate(folders.items())}
        self.drop: dict[str, set[int]] = {}
        self.silent: dict[str, set[int]] = {}
        self.received: list[Message] = []
        self._ids = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for m in messages:
            self._ids += 1
            nid = int(m.metadata.dst_node_id)
            meta = Metadata(run_id=1, message_id=f"m{self._ids}", src_node_id=1, dst_node_id=nid,
                            reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                            message_type=m.metadata.message_type)
            msg = Message(content=copy.deepcopy(m.content), metadata=meta)  # type: ignore[call-overload]
            stage = self._stage(msg)
            if nid in self.silent.get(stage, set()):
                continue
            if nid in self.drop.get(stage, set()):
                reply = Message(Error(code=0, reason=f"dropped at {stage}"), reply_to=msg)
            else:
                reply = self._handle(msg, self.contexts[nid])
            replies.append(reply)
        self.received += replies
        return replies

    @staticmethod
    def _handle(msg: Message, context: Context) -> Message:
        handler = {"train.secagg": client_app.secagg_stage, "train": client_app.train}.get(
            msg.metadata.message_type, client_app.evaluate)
        try:
            return handler(msg, context)
        except Exception as exc:  # as Flower's ClientApp does: the server gets an error reply
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)), reply_to=msg)

    @staticmethod
    def _stage(msg: Message) -> str:
        if msg.metadata.message_type == "evaluate":
            return "evaluate"
        record = msg.content.config_records.get(RECORD)
        return str(record["stage"]) if record is not None else "train"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    reports = list(make_synthetic_corpus(num_sites=2, num_reports=60, seed=5))
    root = tmp_path_factory.mktemp("secagg_sites")
    out = {}
    for i, nid in enumerate(NODES):
        mine = reports[i * 12:(i + 1) * 12]
        cut = 6 + 2 * i  # different sizes: the weights matter
        folder = root / f"site_{i}"
        write_jsonl(mine[:cut], folder / "train.jsonl")
        write_jsonl(mine[cut:], folder / "val.jsonl")
        out[nid] = folder
    return out


@pytest.fixture(scope="module", autouse=True)
def fresh_caches() -> Any:
    mp = pytest.MonkeyPatch()
    mp.setattr(client_app, "_MODELS", ModelCache())
    mp.setattr(client_app, "_SITES", {})
    for name in ("_run_id", "_node_id", "_task_id"):  # the ServerApp's identity, as in a real run
        mp.setattr(TaskIdentity, name, 1 if name == "_run_id" else 0)
    yield
    mp.undo()


def _cfg(*overrides: str) -> ExperimentConfig:
    return compose_config(["+debug=tiny", "strategy.rounds=1", "strategy.min_train_sites=2",
                           "eval.every=0", *overrides])


def _initial(cfg: ExperimentConfig) -> ArrayRecord:
    model = apply_lora(load_base_model(cfg.model).model, cfg.lora, seed=cfg.train.seed)
    return ArrayRecord(get_adapter_state(model))


def _run(cfg: ExperimentConfig, folders: dict[int, Path], **faults: dict[str, set[int]]
         ) -> tuple[dict[str, np.ndarray], LocalGrid, Any]:
    grid = LocalGrid(cfg, folders)
    grid.drop, grid.silent = faults.get("drop", {}), faults.get("silent", {})
    strategy = build_strategy(cfg)
    result = strategy.start(grid=grid, initial_arrays=_initial(cfg), num_rounds=cfg.strategy.rounds,  # type: ignore[arg-type]
                            timeout=60, train_config=ConfigRecord())
    arrays = {k: v.numpy() for k, v in result.arrays.items()}
    return arrays, grid, strategy


SECAGG = ("strategy.secure_aggregation=secaggplus",)


@pytest.fixture(scope="module")
def plain(folders: dict[int, Path]) -> tuple[dict[str, np.ndarray], LocalGrid, Any]:
    return _run(_cfg(), folders)


@pytest.fixture(scope="module")
def secure(folders: dict[int, Path]) -> tuple[dict[str, np.ndarray], LocalGrid, Any]:
    return _run(_cfg(*SECAGG), folders)


def _counts(folders: dict[int, Path], nodes: Iterable[int]) -> list[int]:
    return [sum(1 for _ in open(folders[n] / "train.jsonl")) for n in nodes]


def _bound(cfg: ExperimentConfig, counts: list[int]) -> float:
    s = cfg.strategy
    params = SecAggParams(num_shares=s.secagg_num_shares,
                          reconstruction_threshold=s.secagg_reconstruction_threshold,
                          clipping_range=s.secagg_clipping_range,
                          quantization_range=s.secagg_quantization_range, max_weight=max(counts))
    return error_bound(counts, params)


def test_secure_aggregate_equals_fedavg_within_the_bound(plain: Any, secure: Any,
                                                         folders: dict[int, Path]) -> None:
    p, s = plain[0], secure[0]
    assert set(p) == set(s)
    worst = max(float(np.abs(p[k] - s[k]).max()) for k in p)
    bound = _bound(_cfg(*SECAGG), _counts(folders, NODES))
    assert 0 < worst <= bound, (worst, bound)  # > 0: the quantized path really ran
    moved = max(float(np.abs(p[k] - _initial(_cfg())[k].numpy()).max()) for k in p)
    assert moved > 100 * bound  # training moved the adapter far more than the error


def test_no_reply_the_server_receives_holds_a_site_adapter(secure: Any, plain: Any) -> None:
    _, grid, _ = secure
    plain_replies = {int(m.metadata.src_node_id): m for m in plain[1].received
                     if m.metadata.message_type == "train"}
    train = [m for m in grid.received if m.metadata.message_type == "train"]
    assert len(train) == len(NODES)
    for m in train:
        record = m.content["arrays"]
        assert {a.dtype for a in record.values()} == {"uint32"}  # never a float adapter
        plain_state = plain_replies[int(m.metadata.src_node_id)].content["arrays"]
        assert set(record) == {WEIGHT_KEY, *plain_state}
        for key, arr in plain_state.items():  # masked values look nothing like the adapter
            masked = record[key].numpy().astype(np.float64)
            corr = np.corrcoef(masked.ravel(), arr.numpy().ravel())[0, 1]
            assert abs(corr) < 0.2 or arr.numpy().size < 8
    # stage replies carry only public keys, ciphertexts and shares: no float arrays at all
    stages = [m for m in grid.received if m.metadata.message_type == "train.secagg"]
    assert stages and all(not m.content.array_records for m in stages)
    # the masked vectors alone sum to nothing readable, and unmask only in sum (checked above)
    assert all(not m.has_error() for m in grid.received)


@pytest.mark.parametrize("stage", ["advertise_keys", "share_keys", "masked_vector", "unmask"])
def test_a_site_dropping_at_any_stage_is_recovered(stage: str, folders: dict[int, Path]) -> None:
    cfg = _cfg(*SECAGG)
    dropped = NODES[1]
    arrays, grid, strategy = _run(cfg, folders, drop={stage: {dropped}})
    # the plain FedAvg round it must match: the same site failing its training, or (a drop at
    # unmask, after its masked vector arrived) no failure at all: its vector is in the sum
    in_sum = list(NODES) if stage == "unmask" else [n for n in NODES if n != dropped]
    reference = _run(_cfg(), folders, drop={} if stage == "unmask" else {"train": {dropped}})[0]
    worst = max(float(np.abs(arrays[k] - reference[k]).max()) for k in arrays)
    assert worst <= _bound(cfg, _counts(folders, in_sum)), (stage, worst)
    excluded = strategy.round_record(1)
    if stage != "unmask":
        assert dropped in [e["node"] for e in excluded["rejected"]], excluded["rejected"]


def test_too_many_dropouts_fail_the_round_cleanly(folders: dict[int, Path]) -> None:
    # 4 sites, 3 shares, threshold 2: a site whose two neighbours both die cannot be unmasked
    cfg = _cfg(*SECAGG)
    with pytest.raises(RoundFailed, match="SecAgg\\+ could not unmask"):
        _run(cfg, folders, drop={"unmask": set(NODES[1:])})


def test_a_silent_site_is_left_out_of_the_round(folders: dict[int, Path]) -> None:
    _, _, strategy = _run(_cfg(*SECAGG), folders, silent={"share_keys": {NODES[0]}})
    reasons = {e["node"]: e["reason"] for e in strategy.round_record(1)["rejected"]}
    assert "no reply within strategy.secagg_timeout_s" in reasons[NODES[0]]


@pytest.mark.parametrize("overrides, field", [
    (["strategy=hetero_svd"], "strategy.secure_aggregation"),
    (["strategy.aggregation=median"], "strategy.secure_aggregation"),
    (["strategy.aggregation=trimmed_mean"], "strategy.secure_aggregation"),
    (["privacy.site_level=true"], "privacy.site_level"),
    (["strategy.secagg_num_shares=4"], "strategy.secagg_num_shares"),
    (["strategy.secagg_reconstruction_threshold=3"], "strategy.secagg_reconstruction_threshold"),
    (["strategy.secagg_clipping_range=0"], "strategy.secagg_clipping_range"),
    (["strategy.secure_aggregation=secagg"], "strategy.secure_aggregation"),
])
def test_what_cannot_compose_is_refused_by_name(overrides: list[str], field: str) -> None:
    extra = [] if "secure_aggregation=secagg" in overrides[0] else list(SECAGG)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        compose_config(["+debug=tiny", *extra, *overrides])


def test_a_value_beyond_the_clipping_range_is_an_error_not_a_silent_clip(folders: dict[int, Path]) -> None:
    cfg = _cfg(*SECAGG, "strategy.secagg_clipping_range=1e-6")
    with pytest.raises(RoundFailed, match="usable adapter"):
        _run(cfg, folders)


def test_secure_mean_weights_like_fedavg_and_metrics_stay_per_site(secure: Any) -> None:
    _, _, strategy = secure
    record = strategy.round_record(1)
    assert record["train"]["num-sites"] == len(NODES)
    assert record["train"]["num-examples"] == sum(6 + 2 * i for i in range(len(NODES)))
    comm = record["comm"]
    assert comm["up_bytes"] > 0 and comm["down_bytes"] > 0


def _worst(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("extra", [
    pytest.param(["strategy=fedprox", "strategy.proximal_mu=0.1"], id="fedprox"),
    # FedAdam steps on the unmasked mean; its step moves at most server_lr*(1-beta_1)/tau = 1x
    # an error in the mean, so the same bound holds
    pytest.param(["strategy=fedadam"], id="fedadam"),
    pytest.param(["strategy=fedyogi"], id="fedyogi"),
    # record-level DP-SGD: the noise is added at the site, before masking (seeded: both runs
    # draw the same noise)
    pytest.param(["privacy=dp", "privacy.target_epsilon=0", "privacy.noise_multiplier=1.0"], id="dp"),
])
def test_secagg_composes_with_the_strategy_and_record_level_dp(
        extra: list[str], folders: dict[int, Path], tmp_path: Path) -> None:
    plain, _, _ = _run(_cfg(*extra, f"run.dir={tmp_path / 'plain'}"), folders)
    cfg = _cfg(*extra, *SECAGG, f"run.dir={tmp_path / 'secure'}")
    secure, _, strategy = _run(cfg, folders)
    assert 0 < _worst(plain, secure) <= _bound(cfg, _counts(folders, NODES))
    if "privacy=dp" in extra:  # epsilon is reported per site as without SecAgg+
        sites = strategy.round_record(1)["train_sites"]
        assert len(sites) == len(NODES) and all(m["dp-epsilon"] > 0 for m in sites.values())


def test_transport_dtype_does_not_apply_under_secagg(plain: Any, folders: dict[int, Path]) -> None:
    # the masked vector is quantized from float32 whatever transport_dtype says: the result
    # matches the float32 plain round within the quantization bound, not bfloat16's error
    cfg = _cfg(*SECAGG, "strategy.transport_dtype=bfloat16")
    secure, grid, _ = _run(cfg, folders)
    assert _worst(plain[0], secure) <= _bound(cfg, _counts(folders, NODES))
    assert all(a.dtype == "uint32" for m in grid.received if m.metadata.message_type == "train"
               for a in m.content["arrays"].values())


def test_sites_with_a_spent_budget_answer_without_a_vector(folders: dict[int, Path], tmp_path: Path) -> None:
    dp = ["privacy=dp", "privacy.target_epsilon=0", "privacy.noise_multiplier=1.0", "privacy.max_epsilon=4.5",
          "strategy.rounds=3"]
    plain, _, _ = _run(_cfg(*dp, f"run.dir={tmp_path / 'plain'}"), folders)
    cfg = _cfg(*dp, *SECAGG, f"run.dir={tmp_path / 'secure'}")
    secure, grid, strategy = _run(cfg, folders)
    idle = [sum(m["num-examples"] == 0 for m in strategy.round_record(g)["train_sites"].values())
            for g in (1, 2, 3)]
    assert any(0 < n < len(NODES) for n in idle), idle  # a round mixed spent and training sites
    # a spent site masks zeros at weight 0: it stays in the protocol, so no round lost a site
    train = [m for m in grid.received if m.metadata.message_type == "train"]
    assert len(train) == 3 * len(NODES) and all(len(m.content["arrays"]) > 1 for m in train)
    assert all(strategy.round_record(g)["rejected"] == [] for g in (1, 2, 3))
    assert _worst(plain, secure) <= 3 * _bound(cfg, _counts(folders, NODES))  # 3 rounds of error
