"""Launcher logic that needs no Flower: locked config, automatic names, site splits, run config."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedmira.common.compose import compose_config
from fedmira.common.config import ExperimentConfig
from fedmira.common.errors import ConfigError
from fedmira.common.partition import split_sites
from fedmira.common.reports import Report
from fedmira.common.rundir import RunDir
from fedmira.common.runs import check_lock, write_run_config


def _cfg(tmp_path: Path, *extra: str) -> ExperimentConfig:
    return compose_config(["+debug=tiny", f"run.out_dir={tmp_path}", *extra])


def test_lock_refuses_a_changed_split_unless_allowed(tmp_path: Path) -> None:
    check_lock(_cfg(tmp_path))
    check_lock(_cfg(tmp_path, "train.lr=0.01"))  # not locked: fine
    with pytest.raises(ConfigError, match=r"partition\.seed: 42 -> 7"):
        check_lock(_cfg(tmp_path, "partition.seed=7"))
    check_lock(_cfg(tmp_path, "partition.seed=7", "run.allow_lock_change=true"))
    # Another experiment name has its own lock.
    check_lock(_cfg(tmp_path, "partition.seed=9", "run.name=other"))


def test_experiment_name_follows_data_and_method(tmp_path: Path) -> None:
    assert _cfg(tmp_path).experiment_name() == "synthetic-natural"
    assert _cfg(tmp_path, "data.path=/x/indiana_reports.csv").experiment_name() == "indiana_reports-natural"
    assert _cfg(tmp_path, "run.name=mine").experiment_name() == "mine"


def test_single_site_file_falls_back_to_eight_iid_sites(tmp_path: Path) -> None:
    reports = [Report(f"r{i}", "iu", "DR", "chest", "XR CHEST", f"Finding {i}.", "Normal.")
               for i in range(80)]
    splits = split_sites(_cfg(tmp_path), reports)
    assert [s.site_id for s in splits] == [f"sim_0{i}" for i in range(1, 9)]
    assert sum(len(s.train) + len(s.val) + len(s.test) for s in splits) == 80


def test_run_config_toml_flattens_back_to_the_config(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    path = write_run_config(RunDir(tmp_path), cfg)
    nested = tomllib.loads(path.read_text())
    flat = {f"{s}.{k}": v for s, d in nested.items() for k, v in d.items()}
    assert ExperimentConfig.from_run_config(flat) == cfg
    assert dataclasses.asdict(cfg)["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_a_deployment_locks_only_what_the_coordinator_sends(tmp_path: Path) -> None:
    """Issue 14: a deployment's lock refusal listed split keys the user never passed and the
    coordinator never uses (hospitals hold their own reports)."""
    deploy = ["mode=deployment", "run.name=deployment"]
    check_lock(_cfg(tmp_path, *deploy))
    check_lock(_cfg(tmp_path, *deploy, "partition.seed=7", "partition.num_sites=9"))  # not used: fine
    with pytest.raises(ConfigError, match=r"data\.max_length: \d+ -> 99") as info:
        check_lock(_cfg(tmp_path, *deploy, "data.max_length=99"))
    assert "partition" not in str(info.value)
    # A lock recorded before a key was locked (or with keys since dropped) compares shared keys only.
    check_lock(_cfg(tmp_path, "run.name=sim"))
    check_lock(_cfg(tmp_path, "mode=deployment", "run.name=sim"))


def test_a_resume_compares_only_the_keys_the_user_gave(tmp_path: Path) -> None:
    """Issue 14: resuming with an override listed every default the recorded run had changed, and
    the coordinator's address fell back to the default port."""
    from fedmira.common.compose import resume_config

    base = ["mode=deployment"]
    recorded = compose_config([*base, "+debug=tiny", "mode.superlink=127.0.0.1:19092", "strategy.rounds=3"])
    assert resume_config(recorded, ["run.resume=/r"], base) is recorded
    moved = resume_config(recorded, ["run.resume=/r", "mode.superlink=0.0.0.0:9100"], base)
    assert moved.mode.superlink == "0.0.0.0:9100" and moved.strategy == recorded.strategy
    with pytest.raises(ConfigError) as info:
        resume_config(recorded, ["run.resume=/r", "strategy.rounds=5", "mode.superlink=0.0.0.0:9100"],
                      base, "/r")
    assert str(info.value).count("(recorded") == 1  # only strategy.rounds: not the tiny model, not the port
    assert "strategy.rounds (recorded 3, given 5)" in str(info.value)
    same = resume_config(recorded, ["run.resume=/r", "strategy.rounds=3"], base)  # given, unchanged
    assert same.config_hash() == recorded.config_hash()


def test_progress_comes_from_the_run_folder_not_from_flowers_output(tmp_path: Path) -> None:
    """Issue 15: the launchers grepped Flower's stdout for "[fedmira]"; they follow the run folder."""
    from fedmira.common.runs import RunFollower, round_line, shown

    run = RunDir(tmp_path / "run")
    run.mark(status="running")
    lines: list[tuple[str, int]] = []
    record = {"train": {"num-sites": 2, "train-loss": 1.5}, "evaluate": {"val-loss": 1.25},
              "rejected": [{"site": "site_03", "node": 3, "reason": "no reply before the round timeout"}],
              "comm": {"up_bytes": 1_000_000, "down_bytes": 1_000_000, "cumulative_bytes": 2_000_000},
              "round_s": 3.0}
    follower = RunFollower(run, 3, lambda text, g: lines.append((text, g)), poll_s=3600)
    follower.poll()
    assert lines == []
    run.commit_round(1, lambda folder: folder.mkdir(parents=True), record)
    run.mark(budget_warning="byte budget: 86% used (1.7 of 2.0 MB) after round 1")
    follower.poll()
    follower.poll()  # nothing twice
    assert lines == [("Round 1: excluded site_03: no reply before the round timeout", 1),
                     ("round 1/3 | 2 sites | train loss 1.5000 | val loss 1.2500 | 1 site(s) excluded | "
                      "2.00 MB (2.00 MB total) | 3.0 s", 1),
                     ("byte budget: 86% used (1.7 of 2.0 MB) after round 1", 1)]
    assert round_line(1, 3, record) == lines[1][0]
    run.mark(failure={"kind": "too_few_sites", "reason": "Round 2: only 1 of 2 sampled sites ..."})
    with RunFollower(run, 3, lambda text, g: lines.append((text, g)), poll_s=3600):
        pass  # leaving reads the folder once more
    assert lines[-1] == ("FAILED (too_few_sites): Round 2: only 1 of 2 sampled sites ...", 1)
    assert not any("round 1/3" in text for text, _ in lines[3:])  # a resumed launch skips shown rounds
    assert not shown("INFO : [fedmira] round 1/3 | ...") and not shown("ERROR : [fedmira] FAILED (x): y")
    assert shown("ERROR :     ClientApp raised an exception")


def test_a_runs_processes_are_found_by_their_marker_and_ended(tmp_path: Path) -> None:
    """psutil instead of scanning /proc (issue 15); only processes carrying the run's marker."""
    import os
    import subprocess
    import sys

    from fedmira.common.flower_runtime import RUN_MARKER, kill_marked, marked_pids

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    ours = subprocess.Popen(sleep, env={**os.environ, RUN_MARKER: str(tmp_path)})
    other = subprocess.Popen(sleep, env={**os.environ, RUN_MARKER: str(tmp_path / "another")})
    try:
        deadline = __import__("time").monotonic() + 10
        while ours.pid not in marked_pids(tmp_path) and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.05)
        assert marked_pids(tmp_path) == [ours.pid]
        assert kill_marked(tmp_path, grace=5.0) == 1
        ours.wait(timeout=10)  # ended (psutil reaped our child, so its code reads 0 here)
        assert other.poll() is None  # another run's process is left alone
        assert marked_pids(tmp_path) == []
    finally:
        other.kill()
        other.wait()
        ours.kill()
