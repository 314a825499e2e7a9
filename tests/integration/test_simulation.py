"""End-to-end simulations through the launcher users run (tiny model, 3 hospitals, CPU).

Each test starts a real private SuperLink and Flower's simulation engine (Ray), so each takes
about a minute; they are the proof that the pieces fit together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmira.common.compose import compose_config
from fedmira.common.export import export_run
from fedmira.common.flower_runtime import marked_pids
from fedmira.common.rundir import RunDir
from fedmira.simulations.launch import new_run, simulate

pytestmark = pytest.mark.integration

TINY = ["+debug=tiny"]


def _cfg(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return compose_config([*TINY, f"run.out_dir={tmp_path / 'outputs'}", *extra])


def _run_dir(tmp_path: Path) -> Path:
    runs = sorted((tmp_path / "outputs" / "synthetic-natural").iterdir())
    assert len(runs) == 1
    return runs[0]


def _no_flower_left(run_dir: Path) -> None:
    left = marked_pids(run_dir)
    assert not left, f"processes of {run_dir} still running: {left}"


def test_three_sites_two_rounds(tmp_path: Path) -> None:
    code = simulate(_cfg(tmp_path, "run.tensorboard=true"))
    assert code == 0
    run = RunDir(_run_dir(tmp_path))
    rows = run.metrics()
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train"]["num-sites"] == 3
        assert set(r["train_sites"]) == {"site_01", "site_02", "site_03"}
        assert r["train"]["bytes-sent"] == 3 * r["train_sites"]["site_01"]["bytes-sent"]
        assert r["evaluate"]["val-loss"] > 0
    assert (run.path / "final_adapter" / "adapter_model.safetensors").is_file()
    assert (run.path / "rounds" / "round_0002" / "adapter_config.json").is_file()
    assert (run.path / "loss.png").stat().st_size > 1000
    assert (run.path / "metrics.csv").read_text().count("\n") >= 8  # header + 2 x (all + 3 sites)
    state = run.state()
    assert state["status"] == "completed" and "completed" in state["flower_status"]
    cold = [s["cold-start"] for s in rows[1]["train_sites"].values()]
    assert cold == [0, 0, 0], "round 2 must reuse the model loaded in round 1"
    assert list((run.path / "tb").glob("events.out.tfevents.*"))
    _no_flower_left(run.path)

    # The artifacts people use afterwards: adapter, model card, merged model.
    target = export_run(run.path, merge=True)
    card = (target / "README.md").read_text()
    assert json.loads((run.path / "config.json").read_text())["config_hash"] in card
    assert "site_01" in card and "\n| 2 " in card  # the round-2 row
    assert (target / "adapter" / "adapter_model.safetensors").is_file()
    assert (target / "merged" / "model.safetensors").is_file()


def test_broken_site_is_excluded(tmp_path: Path) -> None:
    cfg, run, index = new_run(_cfg(tmp_path))
    broken = run.path / "sites" / "site_02" / "train.jsonl"
    broken.write_text("{not json\n" * 3)  # a hospital whose export is damaged
    code = simulate(cfg.replace(run=dataclasses.replace(cfg.run, resume=str(run.path))))
    assert code == 0
    rows = run.metrics()
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r["train_sites"]) == {"site_01", "site_03"}
        assert r["train"]["num-sites"] == 2
        assert any("raised" in x["reason"] for x in r["rejected"])
    log = (run.path / "flower.log").read_text()
    assert "excluded" in log


def test_sigkill_then_resume(tmp_path: Path) -> None:
    out_dir = tmp_path / "outputs"
    cmd = [sys.executable, "-m", "fedmira", "simulate", *TINY, f"run.out_dir={out_dir}",
           "strategy.rounds=6", "train.steps=15"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    run_dir: Path | None = None
    while time.monotonic() < deadline:
        folder = out_dir / "synthetic-natural"
        runs = list(folder.glob("*")) if folder.is_dir() else []
        if runs and RunDir(runs[0]).last_round >= 1:
            run_dir = runs[0]
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.5)
    assert run_dir is not None, "round 1 was never committed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30  # the reaper ends the run's whole process tree
    while marked_pids(run_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    _no_flower_left(run_dir)
    done_before = RunDir(run_dir).last_round
    assert done_before < 6

    code = subprocess.run([sys.executable, "-m", "fedmira", "simulate", f"run.resume={run_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stdout[-2000:] + code.stderr[-2000:]
    rows = RunDir(run_dir).metrics()
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]  # every round exactly once
    assert json.loads((run_dir / "state.json").read_text())["last_round"] == 6
    _no_flower_left(run_dir)


def test_dp_epsilon_grows_per_round_and_stops_at_the_budget(tmp_path: Path) -> None:
    """privacy=dp through Flower's simulation: each site's epsilon (kept in the node's state and
    its ledger file) grows round by round, never passes privacy.max_epsilon, and once every site
    has spent its budget the global adapter stops changing."""
    from fedmira.common.adapters import load_adapter_state

    budget = 2.6
    code = simulate(_cfg(tmp_path, "privacy=dp", "privacy.target_epsilon=0", "privacy.noise_multiplier=1.0",
                         f"privacy.max_epsilon={budget}", "strategy.rounds=4"))
    assert code == 0
    run = RunDir(_run_dir(tmp_path))
    rows = run.metrics()
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    history: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for site, m in r["train_sites"].items():
            history.setdefault(site, []).append((m["dp-steps"], m["dp-epsilon"]))
            assert m["dp-epsilon"] <= budget + 1e-9
        assert r["privacy"]["record_level"]["max_epsilon"] <= budget + 1e-9
    grew = 0
    for site, steps_eps in history.items():
        assert steps_eps[0][0] > 0 and steps_eps[0][1] > 0
        for (_, prev), (steps, eps) in zip(steps_eps, steps_eps[1:]):
            assert (eps > prev) if steps > 0 else (eps == prev), (site, steps_eps)  # grows iff it trained
            grew += steps > 0
    assert grew >= 2, history  # some site trained (and spent more) in a later round
    last = rows[-1]["train_sites"]
    assert all(m["dp-budget-spent"] == 1 and m["dp-steps"] == 0 for m in last.values())
    before, after = load_adapter_state(run.round_dir(3)), load_adapter_state(run.round_dir(4))
    assert all(bool((before[k] == after[k]).all()) for k in before)
    for site in history:  # the site's own ledger, in its own folder
        ledger = json.loads((run.path / "sites" / site / "privacy" / f"{run.path.name}.json").read_text())
        assert ledger["rounds"][0] == 1 and ledger["noise_multiplier"] == 1.0
    _no_flower_left(run.path)
