"""Tests of the run folder: committing rounds, crash repair, metrics CSV and plot (common/rundir.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from fedmira.common.adapters import ADAPTER_WEIGHTS, get_adapter_state, load_adapter_state, save_adapter_state
from fedmira.common.errors import FedmiraError
from fedmira.common.rundir import METRICS_CSV, METRICS_JSONL, STATE_FILE, RunDir, plot_losses

Factory = Callable[..., Any]


def _metrics(server_round: int) -> dict[str, Any]:
    """A round's metrics as the server records them: aggregate + per site."""
    return {
        "train": {"train-loss": 6.0 - server_round, "num-examples": 30},
        "evaluate": {"val-loss": 6.5 - server_round, "rouge-l": 0.1 * server_round},
        "train_sites": {"site_01": {"train-loss": 6.1 - server_round}, "site_02": {"train-loss": 5.9}},
        "evaluate_sites": {"site_01": {"val-loss": 6.4 - server_round, "note": "ok"}},
    }


def _writer(tag: str) -> Callable[[Path], None]:
    """A stand-in for saving an adapter: writes one file into the given folder."""

    def write(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "adapter.txt").write_text(tag)

    return write


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    """An empty run folder."""
    (tmp_path / "run").mkdir()
    return RunDir(tmp_path / "run")


def test_commit_round_writes_adapter_metrics_and_state(
    run: RunDir, new_lora: Factory, perturb: Factory
) -> None:
    """After commit: the round's PEFT adapter, one metrics line and last_round in state.json."""
    assert run.last_round == 0 and run.metrics() == []
    model = new_lora()
    state = perturb(model, seed=1)
    config = model.peft_config["default"]
    run.commit_round(1, lambda folder: save_adapter_state(get_adapter_state(model), config, folder),
                     _metrics(1), extra_state={"status": "running"})
    folder = run.round_dir(1)
    assert folder == run.path / "rounds" / "round_0001" and (folder / ADAPTER_WEIGHTS).is_file()
    loaded = load_adapter_state(folder)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not list((run.path / "rounds").glob("*.tmp"))
    lines = (run.path / METRICS_JSONL).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == {"round": 1, **_metrics(1)}
    assert json.loads((run.path / STATE_FILE).read_text()) == {"last_round": 1, "status": "running"}
    run.commit_round(2, _writer("r2"), _metrics(2))
    assert run.last_round == 2 and run.state()["status"] == "running"  # earlier state fields kept
    assert [r["round"] for r in run.metrics()] == [1, 2]


def test_repair_drops_metrics_of_an_uncommitted_round(run: RunDir) -> None:
    """A crash after the metrics line but before state.json: repair() drops that line."""
    for r in (1, 2):
        run.commit_round(r, _writer(f"r{r}"), _metrics(r))
    with open(run.path / METRICS_JSONL, "a", encoding="utf-8") as f:  # the crash: round 3 half done
        f.write(json.dumps({"round": 3, **_metrics(3)}) + "\n")
        f.write('{"round": 4, "train": {"tra')  # and a line cut mid-write
    (run.path / "rounds" / "round_0003.tmp").mkdir()
    assert run.last_round == 2 and [r["round"] for r in run.metrics()] == [1, 2, 3]
    assert run.repair() == 2
    assert [r["round"] for r in run.metrics()] == [1, 2]
    assert (run.path / METRICS_JSONL).read_text().count("\n") == 2
    assert not (run.path / "rounds" / "round_0003.tmp").exists()
    run.commit_round(3, _writer("r3"), _metrics(3))  # the resumed run redoes round 3
    assert [r["round"] for r in run.metrics()] == [1, 2, 3]


def test_metrics_rows_are_unique_per_round_when_a_round_is_redone(run: RunDir) -> None:
    """Re-committing a round (crash before state.json, then resume) replaces its line."""
    run.commit_round(1, _writer("a"), _metrics(1))
    run.commit_round(2, _writer("a"), _metrics(2))
    run.mark(last_round=1)  # state as if the crash hit before round 2's state.json
    run.commit_round(2, _writer("b"), {**_metrics(2), "train": {"train-loss": 1.25}})
    rounds = [r["round"] for r in run.metrics()]
    assert rounds == [1, 2] and len(rounds) == len(set(rounds))
    assert run.metrics()[-1]["train"] == {"train-loss": 1.25}
    assert (run.round_dir(2) / "adapter.txt").read_text() == "b"


def test_repair_of_a_fresh_run_folder(run: RunDir) -> None:
    """Nothing committed yet: repair reports round 0 and leaves an empty metrics file."""
    assert run.repair() == 0
    assert run.metrics() == []


def test_write_metrics_csv_has_an_all_row_and_one_per_site(run: RunDir) -> None:
    """metrics.csv: one 'all' row per round plus one row per site seen in train or evaluate."""
    for r in (1, 2):
        run.commit_round(r, _writer(f"r{r}"), _metrics(r))
    path = run.write_metrics_csv()
    assert path == run.path / METRICS_CSV
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["round"], r["site"]) for r in rows] == [
        ("1", "all"), ("1", "site_01"), ("1", "site_02"),
        ("2", "all"), ("2", "site_01"), ("2", "site_02"),
    ]
    header = list(rows[0])
    assert header[:2] == ["round", "site"]
    assert {"train_train-loss", "eval_val-loss", "eval_rouge-l", "eval_note"} <= set(header)
    assert float(rows[0]["train_train-loss"]) == 5.0 and float(rows[3]["eval_val-loss"]) == 4.5
    assert rows[2]["eval_val-loss"] == ""  # site_02 was not evaluated


def test_plot_losses_writes_a_png(run: RunDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """loss.png is a PNG; with no metrics there is nothing to plot."""
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    assert plot_losses(run) is None
    for r in (1, 2, 3):
        run.commit_round(r, _writer(f"r{r}"), _metrics(r))
    out = plot_losses(run)
    assert out == run.path / "loss.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def test_config_round_trip_and_missing_config(run: RunDir) -> None:
    """config.json stores the config and both hashes; a folder without it is not a run folder."""
    with pytest.raises(FedmiraError, match="config.json"):
        run.read_config()
    run.write_config({"train": {"lr": 0.001}}, "abc", "def")
    expected = {"config": {"train": {"lr": 0.001}}, "config_hash": "abc", "lock_hash": "def"}
    assert run.read_config() == expected


def test_a_second_launcher_of_a_run_is_refused_and_the_first_keeps_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    from fedmira.common.errors import FedmiraError
    from fedmira.common.rundir import RunLock

    with RunLock(tmp_path, "coordinator"):
        with pytest.raises(FedmiraError,
                           match=r"in use by `fedmira coordinator` \(pid \d+, started .*nothing was changed"):
            RunLock(tmp_path, "coordinator").acquire()
        # another process is refused too (flock is per open file, so this holds across processes)
        probe = ("import sys; from fedmira.common.rundir import RunLock\n"
                 "try:\n    RunLock(sys.argv[1], 'simulate').acquire()\nexcept Exception as e:\n"
                 "    print(e); sys.exit(2)\n")
        other = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True)
        assert other.returncode == 2 and "in use by `fedmira coordinator`" in other.stdout
    RunLock(tmp_path, "simulate").acquire().release()  # released: the next one gets it


def test_a_killed_holder_leaves_no_lock_behind(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from fedmira.common.rundir import RunLock

    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from fedmira.common.rundir import RunLock\n"
                               "RunLock(sys.argv[1], 'coordinator').acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    time.sleep(0.1)
    RunLock(tmp_path, "coordinator").acquire().release()
