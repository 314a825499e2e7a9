"""The ClientApp's train/evaluate handlers, called in-process with the tiny model.

The handlers are plain functions (Flower's decorators register and return them unchanged), so
they are called directly with a real ``Message`` and ``Context``. What is checked is what a
hospital sends out: LoRA tensors and numbers only, never report text, never base weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

import fedmira.client.client_app as client_app
from fedmira.common.adapters import adapter_num_bytes, get_adapter_state
from fedmira.common.compose import compose_config
from fedmira.common.config import ExperimentConfig
from fedmira.common.engine import OPTIMIZER_KEY
from fedmira.common.model import apply_lora, load_base_model
from fedmira.common.reports import Report, write_jsonl
from fedmira.common.site import ModelCache
from fedmira.common.synthetic import make_synthetic_corpus


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    return compose_config(["+debug=tiny"])


@pytest.fixture(scope="module")
def fixture_reports() -> list[Report]:
    return list(make_synthetic_corpus(num_sites=2, num_reports=30, seed=3))[:12]


@pytest.fixture(scope="module")
def initial(cfg: ExperimentConfig) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The server's initial adapter (as server_app.initial_adapter builds it) and the base keys."""
    loaded = load_base_model(cfg.model)
    base_keys = set(loaded.model.state_dict())
    model = apply_lora(loaded.model, cfg.lora, seed=cfg.train.seed)
    return get_adapter_state(model), base_keys


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory, fixture_reports: list[Report]) -> Path:
    folder = tmp_path_factory.mktemp("hospital") / "site_x"
    write_jsonl(fixture_reports[:8], folder / "train.jsonl")
    write_jsonl(fixture_reports[8:], folder / "val.jsonl")
    return folder


@pytest.fixture(scope="module")
def fresh_caches() -> Any:
    """Empty model and site caches for this module (module globals of the ClientApp)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(client_app, "_MODELS", ModelCache())
    mp.setattr(client_app, "_SITES", {})
    yield
    mp.undo()


def _context(cfg: ExperimentConfig, folder: Path) -> Context:
    return Context(run_id=1, node_id=1, node_config={"data-path": str(folder), "site-id": "site_x"},
                   state=RecordDict(), run_config=cfg.to_run_config())


def _message(state: dict[str, torch.Tensor], message_type: str, config: dict[str, Any]) -> Message:
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)})
    return Message(content=content, metadata=metadata)


def _eval_message(state: dict[str, torch.Tensor]) -> Message:
    return _message(state, MessageType.EVALUATE, {"global-round": 1})


TRAIN_CONFIG = {"lr": 5e-3, "local-steps": 2, "global-round": 1}


@pytest.fixture(scope="module")
def train_replies(cfg: ExperimentConfig, initial: Any, site_dir: Path, fresh_caches: None) -> list[Message]:
    """Two consecutive training rounds on the same process (the second finds the model cached)."""
    state, _ = initial
    ctx = _context(cfg, site_dir)
    return [client_app.train(_message(state, MessageType.TRAIN, TRAIN_CONFIG), ctx) for _ in range(2)]


def _strings(reply: Message) -> list[str]:
    """Every value of every record, as text (record keys included; array data decoded)."""
    out: list[str] = []
    content = reply.content
    for name, rec in content.config_records.items():
        out += [name, *rec.keys(), *(str(v) for v in rec.values())]
    for name, rec in content.metric_records.items():
        out += [name, *rec.keys(), *(str(v) for v in rec.values())]
    for name, rec in content.array_records.items():
        out += [name, *rec.keys()]
        out += [arr.data.decode("latin-1") for arr in rec.values()]
    return out


def test_train_reply_holds_only_the_lora_adapter(train_replies: list[Message], initial: Any) -> None:
    state, base_keys = initial
    reply = train_replies[0]
    assert not reply.has_error()
    assert list(reply.content.array_records) == ["arrays"]
    sent = reply.content["arrays"].to_torch_state_dict()
    assert set(sent) == set(state)
    assert all("lora_" in k for k in sent)
    # PEFT prefixes keys with "base_model.model."; stripped, none may name a base weight
    assert not {k.removeprefix("base_model.model.") for k in sent} & base_keys
    assert {k: tuple(v.shape) for k, v in sent.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert all(torch.isfinite(v).all() for v in sent.values())
    # training happened: the adapter moved (LoRA B starts at zero)
    assert any(not torch.equal(sent[k], state[k]) for k in state)


def test_train_reply_metrics_and_site(train_replies: list[Message], initial: Any) -> None:
    state, _ = initial
    first, second = train_replies
    assert list(first.content.metric_records) == ["metrics"]
    metrics = first.content["metrics"]
    for key in ("num-examples", "train-loss", "tokens-per-s", "bytes-sent", "cold-start"):
        assert key in metrics
    assert metrics["num-examples"] == 8
    assert np.isfinite(metrics["train-loss"]) and metrics["train-loss"] > 0
    assert metrics["tokens-per-s"] > 0
    assert metrics["bytes-sent"] == adapter_num_bytes(state)
    assert metrics["cold-start"] == 1
    assert second.content["metrics"]["cold-start"] == 0
    assert list(first.content.config_records) == ["site"]
    assert dict(first.content["site"]) == {"site-id": "site_x"}


def test_no_report_text_leaves_the_site(train_replies: list[Message], fixture_reports: list[Report],
                                        cfg: ExperimentConfig, initial: Any, site_dir: Path) -> None:
    state, _ = initial
    ev = client_app.evaluate(_eval_message(state), _context(cfg, site_dir))
    for reply in [*train_replies, ev]:
        strings = _strings(reply)
        blob = "\n".join(strings)
        for report in fixture_reports:
            for text in (report.findings, report.impression):
                assert text not in blob
        for rec in [*reply.content.config_records.values(), *reply.content.metric_records.values()]:
            for value in rec.values():
                assert not isinstance(value, (str, bytes)) or len(value) <= 40, value
                assert not isinstance(value, list), "no list values (could smuggle token ids)"


def test_evaluate_reply_has_val_loss_and_no_arrays(cfg: ExperimentConfig, initial: Any, site_dir: Path,
                                                   train_replies: list[Message]) -> None:
    state, _ = initial
    reply = client_app.evaluate(_eval_message(state), _context(cfg, site_dir))
    assert not reply.has_error()
    assert len(reply.content.array_records) == 0
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 4
    assert np.isfinite(metrics["val-loss"]) and metrics["val-loss"] > 0
    assert metrics["cold-start"] == 0
    assert dict(reply.content["site"]) == {"site-id": "site_x"}


def test_evaluate_on_a_site_without_val_split(
    cfg: ExperimentConfig, initial: Any, fixture_reports: list[Report], tmp_path: Path,
    train_replies: list[Message],
) -> None:
    """No val.jsonl: the site answers num-examples 0 and no val-loss (the strategy must cope)."""
    state, _ = initial
    folder = tmp_path / "site_y"
    write_jsonl(fixture_reports[:4], folder / "train.jsonl")
    ctx = Context(run_id=1, node_id=2, node_config={"data-path": str(folder), "site-id": "site_y"},
                  state=RecordDict(), run_config=cfg.to_run_config())
    reply = client_app.evaluate(_eval_message(state), ctx)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 0 and "val-loss" not in metrics
    assert dict(reply.content["site"]) == {"site-id": "site_y"}


def test_rag_site_keeps_its_index_out_of_every_record_and_log(
        initial: Any, site_dir: Path, fixture_reports: list[Report], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """With retrieval-augmented prompts the site's index (its reports) stays in the process."""
    rag = compose_config(["+debug=tiny", "data.template=site_aware_rag", "data.neighbors=3",
                          "data.max_length=400"])
    monkeypatch.setattr(client_app, "_MODELS", ModelCache())
    monkeypatch.setattr(client_app, "_SITES", {})
    state, _ = initial
    ctx = _context(rag, site_dir)
    replies = [client_app.train(_message(state, MessageType.TRAIN, TRAIN_CONFIG), ctx),
               client_app.evaluate(_eval_message(state), ctx)]
    assert not any(r.has_error() for r in replies)
    site = next(iter(client_app._SITES.values()))
    assert site.neighbors("train", rag) and all(len(n) == 3 for n in site.neighbors("train", rag))
    blob = "\n".join([*(s for r in replies for s in _strings(r)), capsys.readouterr().out,
                      capsys.readouterr().err, caplog.text])
    for report in fixture_reports:
        for text in (report.findings, report.impression):
            assert text not in blob
    # nothing of the index in the node's state either (only what the site keeps for itself)
    for rec in ctx.state.config_records.values():
        assert not any(isinstance(v, str) and len(v) > 40 and "Findings" in v for v in rec.values())


def test_epochs_set_the_steps_a_site_runs_and_reports(initial: Any, site_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """train.epochs=1 at a site of 8 reports, batch 2: 4 steps, whatever local-steps the server sent."""
    by_epochs = compose_config(["+debug=tiny", "train.epochs=1"])
    monkeypatch.setattr(client_app, "_SITES", {})
    state, _ = initial
    reply = client_app.train(_message(state, MessageType.TRAIN, TRAIN_CONFIG), _context(by_epochs, site_dir))
    assert reply.content["metrics"]["steps"] == 4
    assert "opt-state-restored" not in reply.content["metrics"]  # only said when the option is on


def test_optimizer_state_stays_at_the_site(
    initial: Any, site_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With train.keep_optimizer_state the AdamW moments live in the node's state between rounds
    (restored in round 2) and appear in no reply: only the adapter and numbers leave."""
    from fedmira.common.engine import OPTIMIZER_KEY

    keep = compose_config(["+debug=tiny", "train.keep_optimizer_state=true"])
    monkeypatch.setattr(client_app, "_SITES", {})
    state, _ = initial
    ctx = _context(keep, site_dir)
    replies = [client_app.train(_message(state, MessageType.TRAIN, {**TRAIN_CONFIG, "global-round": g}), ctx)
               for g in (1, 2)]
    assert [r.content["metrics"]["opt-state-restored"] for r in replies] == [0, 1]
    kept = ctx.state.array_records[OPTIMIZER_KEY].to_torch_state_dict()
    assert len(kept) == 3 * len(state)  # step, exp_avg, exp_avg_sq per LoRA tensor
    assert {float(v) for k, v in kept.items() if k.endswith(":step")} == {4.0}  # 2 rounds x 2 steps
    moments = {bytes(v.numpy().tobytes()) for k, v in kept.items() if not k.endswith(":step")}
    for reply in replies:
        assert list(reply.content.array_records) == ["arrays"]
        assert set(reply.content["arrays"]) == set(state)
        assert not {bytes(a.data) for a in reply.content["arrays"].values()} & moments
        assert not any("exp_avg" in s or OPTIMIZER_KEY in s for s in _strings(reply))


def test_site_keeps_adam_moments_in_its_node_state_only(
        initial: Any, site_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keep = compose_config(["+debug=tiny", "train.keep_optimizer_state=true", "train.epochs=1.0"])
    monkeypatch.setattr(client_app, "_MODELS", ModelCache())
    monkeypatch.setattr(client_app, "_SITES", {})
    state, _ = initial
    ctx = _context(keep, site_dir)
    first = client_app.train(_message(state, MessageType.TRAIN, TRAIN_CONFIG), ctx)
    assert OPTIMIZER_KEY in ctx.state.array_records
    moments = ctx.state[OPTIMIZER_KEY].to_torch_state_dict()
    second = client_app.train(_message(state, MessageType.TRAIN, {**TRAIN_CONFIG, "global-round": 2}), ctx)
    assert first.content["metrics"]["opt-state-restored"] == 0
    assert second.content["metrics"]["opt-state-restored"] == 1
    # one epoch of the 8 training reports at batch 2: 4 steps, whatever local-steps says
    assert first.content["metrics"]["steps"] == 4
    for reply in (first, second):
        assert list(reply.content.array_records) == ["arrays"]
        sent = set(reply.content["arrays"].keys())
        assert not sent & set(moments) and all("lora_" in k for k in sent)
