"""A run folder's life, shared by ``fedmira simulate`` and ``fedmira coordinator``.

The lock that keeps an experiment's runs comparable, creating and resuming a run folder, the
flat run config Flower reads, which Flower log lines reach the console, and the closing summary
with the exit code of the failure kind (``common/exit_codes.py``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from fedmira.common import exit_codes
from fedmira.common.config import ExperimentConfig
from fedmira.common.errors import ConfigError
from fedmira.common.rundir import RunDir, excluded_count, plot_losses

LOCKS_DIR = "locks"


def check_lock(cfg: ExperimentConfig) -> None:
    """Refuse a run whose locked part differs from the one recorded for its experiment name."""
    name = cfg.experiment_name()
    path = Path(cfg.run.out_dir) / LOCKS_DIR / f"{name}.json"
    lock: dict[str, Any] = {"lock_hash": cfg.lock_hash(), "locked": cfg.locked_part()}
    if path.is_file():
        recorded = json.loads(path.read_text())
        # Keys only one side has (a lock written before a key was locked, or a deployment's
        # lock that leaves the split out) are not a change.
        changed = _changed_keys(recorded["locked"], lock["locked"], both=True)
        if changed and not cfg.run.allow_lock_change:
            raise ConfigError(
                f"The locked part of experiment `{name}` changed ({', '.join(changed)}), so "
                "its results would not be comparable with earlier runs. Use another run.name, "
                f"or pass run.allow_lock_change=true (recorded in {path})."
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lock, indent=2, sort_keys=True))


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "",
                  both: bool = False) -> list[str]:
    """``key: old -> new`` for every differing leaf (``both``: only keys both sides have)."""
    keys: list[str] = []
    for k in sorted(set(old) & set(new) if both else set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.", both)
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


def create_run_folder(cfg: ExperimentConfig) -> tuple[ExperimentConfig, RunDir]:
    """Check the lock, create ``out_dir/<experiment>/<stamp>-<hash>`` and write config.json."""
    check_lock(cfg)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = (Path(cfg.run.out_dir) / cfg.experiment_name() / f"{stamp}-{cfg.config_hash()[:8]}").resolve()
    path.mkdir(parents=True, exist_ok=False)
    cfg = cfg.replace(run=dataclasses.replace(cfg.run, dir=str(path), resume=""))
    run = RunDir(path)
    run.write_config(cfg.to_dict(), cfg.config_hash(), cfg.lock_hash())
    return cfg, run


def resume_run(resume: str, overrides: Sequence[str] = (),
               base: Sequence[str] = ()) -> tuple[ExperimentConfig, RunDir, dict[str, Any]]:
    """Reopen a run folder with its recorded config.

    ``overrides`` (the user's, beside ``run.resume``) may not change it, except where the run
    is served (``RESUMABLE_KEYS``).
    """
    from fedmira.common.compose import resume_config

    run = RunDir(Path(resume).resolve())
    doc = run.read_config()
    cfg = resume_config(ExperimentConfig.from_dict(doc["config"]), overrides, base, where=resume)
    index = json.loads((run.path / "sites" / "sites.json").read_text())
    return cfg, run, index


def write_run_config(run: RunDir, cfg: ExperimentConfig) -> Path:
    """Write the nested TOML that ``flwr run --run-config`` flattens back to our dotted keys."""
    import tomli_w

    nested: dict[str, dict[str, Any]] = {}
    for key, value in cfg.to_run_config().items():
        section, field = key.split(".", 1)
        nested.setdefault(section, {})[field] = value
    path = run.path / "run_config.toml"
    path.write_text(tomli_w.dumps(nested))
    return path


def shown(line: str) -> bool:
    """Tell whether a Flower log line is worth the console without ``--verbose``: its errors.

    Not Flower's "ServerApp raised an exception" / "Traceback" header, and not fedmira's own
    tagged lines: progress, exclusions and the failure reason come from the run folder
    (:class:`RunFollower`); the traceback stays in flower.log.
    """
    if "ServerApp raised an exception" in line or line.lstrip().startswith("Traceback"):
        return False
    return "ERROR" in line and "[fedmira]" not in line


def round_line(g: int, total: int, record: dict[str, Any]) -> str:
    """One committed round in one line: sites, losses, exclusions, epsilon, bytes, time."""
    train, ev = record.get("train", {}), record.get("evaluate", {})
    parts = [f"round {g}/{total}", f"{train.get('num-sites', 0)} sites",
             f"train loss {train.get('train-loss', float('nan')):.4f}"]
    if "val-loss" in ev:
        parts.append(f"val loss {ev['val-loss']:.4f}")
    if "rouge-l" in ev:
        parts.append(f"ROUGE-L {ev['rouge-l']:.3f}")
    if record.get("rejected"):
        parts.append(f"{excluded_count(record['rejected'])} site(s) excluded")
    privacy = record.get("privacy", {})
    if "record_level" in privacy:
        parts.append(f"site epsilon max {privacy['record_level']['max_epsilon']:.2f}")
    if "site_level" in privacy:
        parts.append(f"site-level epsilon {privacy['site_level']['epsilon']:.2f}")
    comm = record.get("comm", {})
    if comm:
        parts.append(f"{(comm['up_bytes'] + comm['down_bytes']) / 1e6:.2f} MB "
                     f"({comm['cumulative_bytes'] / 1e6:.2f} MB total)")
    parts.append(f"{record.get('round_s', 0.0):.1f} s")
    return " | ".join(parts)


class RunFollower:
    """Follow a run folder while Flower runs it and emit what the ServerApp committed.

    That is each round's exclusions and its line (``metrics.jsonl``), the byte-budget warning
    and the failure (``state.json``). Progress never depends on the wording of Flower's output.

    Use as a context manager; leaving it reads the folder one last time.
    """

    def __init__(self, run: RunDir, total: int, emit: Callable[[str, int], None],
                 poll_s: float = 0.5) -> None:
        self.run, self.total, self.emit, self.poll_s = run, total, emit, poll_s
        self.seen = run.last_round  # rounds committed before this launch were shown then
        self._notes: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-follower", daemon=True)

    def __enter__(self) -> RunFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Emit what was committed since the last call (safe to call at any time)."""
        for row in self.run.metrics():
            g = int(row.get("round", 0))
            if g <= self.seen:
                continue
            self.seen = g
            for r in row.get("rejected", []):
                self.emit(f"Round {g}: excluded {r['site']}: {r['reason']}", g)
            self.emit(round_line(g, self.total, row), g)
        state = self.run.state()
        failure = state.get("failure") or {}
        notes = [state.get("budget_warning"),  # the stop itself is in finish_run's summary
                 f"FAILED ({failure['kind']}): {failure['reason']}" if failure.get("reason") else None]
        for note in notes:
            if note and note not in self._notes:
                self._notes.add(note)
                self.emit(str(note), self.seen)


def finish_run(cfg: ExperimentConfig, run: RunDir, status: str, startup_s: float, wall_s: float,
               out: TextIO, command: str = "simulate") -> int:
    """Print the run's closing summary and return the exit code (``common/exit_codes.py``).

    The summary gives rounds, bytes, timings, where the results are and why the run failed.
    """
    last = run.last_round
    run.mark(flower_status=status, wall_s=round(wall_s, 1), launcher_startup_s=round(startup_s, 1))
    if run.metrics():
        run.write_metrics_csv()
        plot_losses(run)
    state = run.state()
    stopped = state.get("status") == "stopped_budget" and "completed" in status
    ok = (last >= cfg.strategy.rounds or stopped) and "completed" in status
    word = "stopped by the byte budget" if stopped and last < cfg.strategy.rounds else (
        "completed" if ok else "FAILED")
    print(f"\nRun {word}: {last}/{cfg.strategy.rounds} rounds committed in {wall_s:.0f} s "
          f"(Flower status: {status}).", file=out)
    code = exit_codes.OK if ok else _failure_code(state, status, out)
    if stopped:
        print(f"  {state.get('stop_reason', 'strategy.byte_budget_mb reached')}", file=out)
    up, down = run.comm_totals()
    run.mark(comm_up_bytes=up, comm_down_bytes=down)
    if up or down:
        print(f"Communication: {up / 1e6:.3f} MB up, {down / 1e6:.3f} MB down, "
              f"{(up + down) / 1e6:.3f} MB in all (adapter tensors, all sites).", file=out)
    if "rounds_started_at" in state and "launched_at" in state:
        startup = state["rounds_started_at"] - state["launched_at"]
        round_s = [r.get("round_s", 0.0) for r in run.metrics()]
        mean = sum(round_s) / len(round_s) if round_s else 0.0
        print(f"Start-up until round 1: {startup:.0f} s; mean round: {mean:.0f} s.", file=out)
    print(f"Results:  {run.path}\n  metrics:  {run.path / 'metrics.jsonl'} (and metrics.csv)\n"
          f"  plot:     {run.path / 'loss.png'}\n  adapter:  {run.path / 'final_adapter'}", file=out)
    if not ok:
        print(f"  log:      {run.path / 'flower.log'}\n"
              f"Continue with: fedmira {command} run.resume={run.path}", file=out)
    return code


def _failure_code(state: dict[str, Any], status: str, out: TextIO) -> int:
    """Print why the run failed in one line; the exit code of that kind (common/exit_codes)."""
    failure = state.get("failure") or {}
    if failure.get("reason"):
        print(f"  reason:   {failure['reason']}", file=out)
        return exit_codes.exit_code(failure.get("kind"))
    if status == "not started":
        print("  reason:   Flower did not start the run (see flower.log)", file=out)
    else:
        print(f"  reason:   Flower ended the run ({status}) before the ServerApp recorded a failure: the "
              "SuperLink or `flwr run` stopped (see flower.log)", file=out)
    return exit_codes.FLOWER
