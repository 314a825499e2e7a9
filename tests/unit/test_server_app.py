"""The ServerApp's own logic: round folders with strategy state, restore on resume, the byte budget."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedmira.common.compose import compose_config
from fedmira.common.config import ExperimentConfig
from fedmira.common.rundir import STRATEGY_STATE, RunDir
from fedmira.server.server_app import BudgetExhausted, _committer, restore_strategy, write_round
from fedmira.server.strategies import build_strategy

STATE = {"base_model.model.l.q_proj.lora_A.weight": torch.ones(2, 3),
         "base_model.model.l.q_proj.lora_B.weight": torch.zeros(3, 2)}


class _Peft:
    """Stands in for a PEFT config: saving writes adapter_config.json."""

    def save_pretrained(self, folder: str) -> None:
        (Path(folder) / "adapter_config.json").write_text("{}")


class _Strategy:
    """A strategy whose bookkeeping is scripted: cumulative bytes per round, optional state."""

    def __init__(self, per_round: int, state: bool = False) -> None:
        self.per_round, self.state = per_round, state

    def round_record(self, g: int) -> dict[str, Any]:
        comm = {"up_bytes": self.per_round // 2, "down_bytes": self.per_round // 2,
                "cumulative_bytes": g * self.per_round, "cumulative_up_bytes": g * self.per_round // 2,
                "cumulative_down_bytes": g * self.per_round // 2, "sites": {}}
        return {"train": {}, "evaluate": {}, "train_sites": {}, "evaluate_sites": {}, "rejected": [],
                "comm": comm}

    def strategy_state(self) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
        return ({"m_t/x": np.ones(2, np.float32)}, {"strategy": "S", "t": "1"}) if self.state else None


def _cfg(tmp_path: Path, **strategy: Any) -> ExperimentConfig:
    cfg = compose_config(["+debug=tiny", "strategy.rounds=5"])
    return cfg.replace(strategy=dataclasses.replace(cfg.strategy, **strategy),
                       run=dataclasses.replace(cfg.run, dir=str(tmp_path)))


def test_round_folder_holds_the_strategy_state_only_when_there_is_one(tmp_path: Path) -> None:
    write_round(_Strategy(0), STATE, _Peft(), tmp_path / "a")  # type: ignore[arg-type]
    assert not (tmp_path / "a" / STRATEGY_STATE).exists()
    write_round(_Strategy(0, state=True), STATE, _Peft(), tmp_path / "b")  # type: ignore[arg-type]
    assert (tmp_path / "b" / STRATEGY_STATE).is_file()


def test_budget_warns_then_stops_after_the_round_that_exceeds_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """0.1 MB budget, 40 kB per round: round 2 is at 80% (warn), round 3 exceeds it (stop)."""
    cfg = _cfg(tmp_path, byte_budget_mb=0.1)
    run = RunDir(tmp_path)
    commit = _committer(cfg, run, _Strategy(40_000), _Peft(), done=0)  # type: ignore[arg-type]
    record = ArrayRecord(STATE)
    assert commit(0, record) is None
    commit(1, record)
    with caplog.at_level("WARNING", logger="flwr"):
        commit(2, record)
    assert any("80% used" in r.getMessage() for r in caplog.records)
    with pytest.raises(BudgetExhausted, match=r"0\.120 MB > strategy\.byte_budget_mb=0\.1 after round 3"):
        commit(3, record)
    assert run.last_round == 3  # the round that exceeded the budget is committed first
    rows = run.metrics()
    assert [r["comm"]["cumulative_bytes"] for r in rows] == [40_000, 80_000, 120_000]
    assert run.comm_totals() == (60_000, 60_000)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "comm_cumulative_bytes" in header


def test_no_budget_never_stops(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    commit = _committer(cfg, RunDir(tmp_path), _Strategy(10**9), _Peft(), done=0)  # type: ignore[arg-type]
    for g in (1, 2):
        commit(g, ArrayRecord(STATE))
    assert RunDir(tmp_path).last_round == 2


def test_resume_restores_the_server_optimizer_state(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, name="fedadam")
    run = RunDir(tmp_path)
    trained = build_strategy(cfg)
    trained.algorithm.m_t = {"k": np.full(3, 0.5, np.float32)}  # type: ignore[attr-defined]
    trained.algorithm.v_t = {"k": np.full(3, 0.25, np.float32)}  # type: ignore[attr-defined]
    trained.current_round = 2
    run.commit_round(2, lambda folder: write_round(trained, STATE, _Peft(), folder), {"comm": {}})
    resumed = build_strategy(cfg, round_offset=2)
    restore_strategy(resumed, run, 2)
    np.testing.assert_array_equal(resumed.algorithm.m_t["k"], trained.algorithm.m_t["k"])  # type: ignore[attr-defined]
    np.testing.assert_array_equal(resumed.algorithm.v_t["k"], trained.algorithm.v_t["k"])  # type: ignore[attr-defined]
    fresh = build_strategy(cfg)
    restore_strategy(fresh, run, 0)  # a new run restores nothing
    assert fresh.algorithm.m_t is None  # type: ignore[attr-defined]
    assert json.loads((tmp_path / "state.json").read_text())["last_round"] == 2


def test_a_failed_round_is_recorded_with_its_kind_and_reason_for_the_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 14: below min_train_sites the console showed a bare "ServerApp raised an exception /
    Traceback" header. The ServerApp records why; the launcher prints it and exits 3."""
    import io
    from types import SimpleNamespace

    import fedmira.server.server_app as server_app
    from fedmira.common import exit_codes
    from fedmira.common.runs import finish_run, shown
    from fedmira.server.strategy import RoundFailed

    cfg = _cfg(tmp_path)
    run = RunDir(tmp_path)
    run.mark(failure={"kind": "flower", "reason": "an earlier attempt"})  # cleared at start

    def too_few(grid: Any, cfg: Any, run: Any) -> None:
        raise RoundFailed("Round 1: only 1 of 2 sampled sites returned a usable adapter, fewer than "
                          "strategy.min_train_sites=2; excluded: hospital_02 (no reply before the\nround "
                          "timeout)")

    monkeypatch.setattr(server_app, "run_rounds", too_few)
    with pytest.raises(RoundFailed):
        server_app.main(None, SimpleNamespace(run_config=cfg.to_run_config()))  # type: ignore[arg-type]
    failure = run.state()["failure"]
    assert failure["kind"] == "too_few_sites" and failure["round"] == 1
    assert "\n" not in failure["reason"]
    assert "excluded: hospital_02 (no reply before the round" in failure["reason"]
    out = io.StringIO()
    assert finish_run(cfg, run, "finished:failed", 1.0, 2.0, out) == exit_codes.TOO_FEW_SITES == 3
    assert "reason:   Round 1: only 1 of 2 sampled sites" in out.getvalue()
    assert "Continue with: fedmira simulate run.resume=" in out.getvalue()

    def crash(grid: Any, cfg: Any, run: Any) -> None:
        raise KeyError("lora_B")

    monkeypatch.setattr(server_app, "run_rounds", crash)
    with pytest.raises(KeyError):
        server_app.main(None, SimpleNamespace(run_config=cfg.to_run_config()))  # type: ignore[arg-type]
    assert finish_run(cfg, run, "finished:failed", 1.0, 2.0, io.StringIO()) == exit_codes.FAILED
    run.mark(failure=None)
    out = io.StringIO()
    assert finish_run(cfg, run, "not started", 1.0, 2.0, out) == exit_codes.FLOWER
    assert "did not start the run" in out.getvalue()
    # the console: Flower's bare exception header and traceback start are left to flower.log
    assert not shown("ERROR :     ServerApp raised an exception")
    assert not shown("Traceback (most recent call last):")
    # the reason and the exclusions reach the console from the run folder (common.runs.RunFollower)
    assert not shown("ERROR :     [fedmira] FAILED (too_few_sites): Round 1 ...")
    assert not shown("WARNING : Round 2: excluded x: y") and shown("ERROR : ClientApp raised an exception")
