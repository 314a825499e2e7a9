"""``fedmira simulate``: compose -> validate -> split into hospitals -> Flower simulation -> results.

The launcher only prepares and wires: it writes the run folder (resolved config and its hashes,
one data folder per simulated hospital, the flat run config), starts a private SuperLink in
simulation mode, submits the app with ``flwr run`` and streams its progress. The rounds
themselves run in ``server/server_app.py`` and ``client/client_app.py``.

``flwr run --stream`` exits 0 even when the run failed, so success is judged from the run
folder (every planned round committed) and the SuperLink's run status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

from tqdm.auto import tqdm

from common import exit_codes
from common.config import ExperimentConfig
from common.errors import ConfigError, FedmiraError
from common.reports import Report, load_reports
from common.rundir import RunDir, RunLock, plot_losses
from common.synthetic import make_synthetic_corpus
from simulations.partition import SiteSplit, partition_reports, summarize, write_manifest, write_site_folders

DEFAULT_SINGLE_SITE_SPLIT = 8
LOCKS_DIR = "locks"


# ------------------------------------------------------------------------------ data
def load_pooled_reports(cfg: ExperimentConfig, out: TextIO = sys.stdout) -> list[Report]:
    """The reports to split: the file at ``data.path`` or the embedded synthetic corpus."""
    d = cfg.data
    if not d.path:
        return make_synthetic_corpus(d.synthetic_sites, d.synthetic_reports, d.synthetic_seed)
    result = load_reports(d.path, fmt=d.format, policy=d.policy, max_chars=d.max_chars)
    if result.problems:
        codes: dict[str, int] = {}
        for p in result.problems:
            codes[p.code] = codes.get(p.code, 0) + 1
        summary = ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))
        print(f"data: {result.rows_skipped} of {result.rows_total} rows skipped ({summary}); "
              f"`fedmira data check {d.path}` lists them.", file=out)
    if not result.reports:
        raise FedmiraError(f"No usable reports in {d.path}; run `fedmira data check {d.path}`.")
    return result.reports


def split_sites(cfg: ExperimentConfig, reports: list[Report]) -> list[SiteSplit]:
    """Partition per config; a single-site file under ``natural`` falls back to an IID split."""
    p = cfg.partition
    method, num_sites = p.method, p.num_sites
    if method == "natural" and len({r.site_id for r in reports}) < 2:
        method, num_sites = "iid", num_sites or DEFAULT_SINGLE_SITE_SPLIT
    return partition_reports(
        reports, method=method, num_sites=num_sites, external_sites=p.external_sites,
        val_fraction=p.val_fraction, test_fraction=p.test_fraction, seed=p.seed,
        max_reports_per_site=p.max_reports_per_site, alpha=p.alpha, label_key=p.label_key,
        min_site_reports=p.min_site_reports,
    )


def write_sites(run_dir: Path, cfg: ExperimentConfig, splits: list[SiteSplit]) -> dict[str, Any]:
    """One folder per hospital + manifest + summary; returns the site index the apps read."""
    sites_dir = run_dir / "sites"
    write_site_folders(splits, sites_dir)
    manifest_hash = write_manifest(splits, sites_dir / "manifest.json", seed=cfg.partition.seed,
                                   extra={"lock_hash": cfg.lock_hash()})
    rows = summarize(splits)
    if rows:
        cols = list(rows[0])
        text = ",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n" for r in rows)
        (sites_dir / "summary.csv").write_text(text)
    index = {
        "train_sites": [s.site_id for s in splits if not s.external and s.train],
        "external_sites": [s.site_id for s in splits if s.external],
        "manifest_hash": manifest_hash,
    }
    (sites_dir / "sites.json").write_text(json.dumps(index, indent=2))
    return index


# ------------------------------------------------------------------------------ locks
def check_lock(cfg: ExperimentConfig) -> None:
    """Refuse a run whose locked part differs from the one recorded for its experiment name."""
    name = cfg.experiment_name()
    path = Path(cfg.run.out_dir) / LOCKS_DIR / f"{name}.json"
    lock = {"lock_hash": cfg.lock_hash(), "locked": cfg.locked_part()}
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


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "", both: bool = False) -> list[str]:
    """``key: old -> new`` for every differing leaf (``both``: only keys both sides have)."""
    keys: list[str] = []
    for k in sorted(set(old) & set(new) if both else set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.", both)
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


# ------------------------------------------------------------------------------ run folder
def new_run(cfg: ExperimentConfig, out: TextIO = sys.stdout) -> tuple[ExperimentConfig, RunDir, dict[str, Any]]:
    """Create the run folder with config, hashes and site folders."""
    cfg, run = create_run_folder(cfg)
    splits = split_sites(cfg, load_pooled_reports(cfg, out))
    index = write_sites(run.path, cfg, splits)
    return cfg, run, index


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
    """Reopen a run folder with its recorded config; ``overrides`` (the user's, beside
    ``run.resume``) may not change it, except where the run is served (``RESUMABLE_KEYS``)."""
    from common.compose import resume_config

    run = RunDir(Path(resume).resolve())
    doc = run.read_config()
    cfg = resume_config(ExperimentConfig.from_dict(doc["config"]), overrides, base, where=resume)
    index = json.loads((run.path / "sites" / "sites.json").read_text())
    return cfg, run, index


def write_run_config(run: RunDir, cfg: ExperimentConfig) -> Path:
    """The nested TOML ``flwr run --run-config`` flattens back to our dotted keys."""
    import tomli_w

    nested: dict[str, dict[str, Any]] = {}
    for key, value in cfg.to_run_config().items():
        section, field = key.split(".", 1)
        nested.setdefault(section, {})[field] = value
    path = run.path / "run_config.toml"
    path.write_text(tomli_w.dumps(nested))
    return path


# ------------------------------------------------------------------------------ simulate
def shown(line: str) -> bool:
    """Flower log lines worth the console without ``--verbose``: errors and exclusions. Not
    Flower's "ServerApp raised an exception" / "Traceback" header: the ServerApp logs its
    reason as one ``[fedmira] FAILED`` line; the traceback stays in flower.log."""
    if "ServerApp raised an exception" in line or line.lstrip().startswith("Traceback"):
        return False
    return "ERROR" in line or re.search(r"Round \d+: excluded ", line) is not None


def simulate(cfg: ExperimentConfig, *, resume_overrides: Sequence[str] = (), out: TextIO = sys.stdout,
             verbose: bool = False) -> int:
    """Run a federated simulation; returns the process exit code (0: all rounds committed)."""
    with contextlib.ExitStack() as held:
        if cfg.run.resume:  # before anything of the run is read or stopped: one launcher per run
            held.enter_context(RunLock(Path(cfg.run.resume).expanduser(), "simulate"))
        return _simulate(cfg, held, resume_overrides=resume_overrides, out=out, verbose=verbose)


def _simulate(cfg: ExperimentConfig, held: contextlib.ExitStack, *, resume_overrides: Sequence[str], out: TextIO,
              verbose: bool) -> int:
    from simulations.flower_runtime import SimulationSuperLink, run_status, stop_recorded, submit_and_stream

    t0, launched_at = time.perf_counter(), time.time()
    if cfg.run.resume:
        cfg, run, index = resume_run(cfg.run.resume, resume_overrides)
        stop_recorded(run.path)
        done = run.repair()
        print(f"Resuming {run.path} after round {done} of {cfg.strategy.rounds}.", file=out)
    else:
        cfg, run, index = new_run(cfg, out)
        held.enter_context(RunLock(run.path, "simulate"))
        print(f"Run folder: {run.path}", file=out)
    n_sites = len(index["train_sites"])
    if n_sites < cfg.strategy.min_train_sites:
        raise ConfigError(f"Only {n_sites} training site(s), fewer than strategy.min_train_sites="
                          f"{cfg.strategy.min_train_sites}.")
    print(f"{n_sites} simulated hospitals ({len(index['external_sites'])} held out as external), "
          f"{cfg.strategy.rounds} rounds, model {cfg.model.name_or_path}, config {cfg.config_hash()}, "
          f"lock {cfg.lock_hash()}", file=out)
    run.mark(launched_at=launched_at, failure=None)
    toml_path = write_run_config(run, cfg)
    bar = tqdm(total=cfg.strategy.rounds, initial=run.last_round, desc="rounds", unit="round",
               file=out, dynamic_ncols=True)

    def on_line(line: str) -> None:
        if "[fedmira]" in line:
            bar.write(line.split("[fedmira]", 1)[1].strip(), file=out)
            bar.n = run.last_round
            bar.refresh()
        elif verbose or shown(line):
            bar.write(line, file=out)

    with open(run.path / "flower.log", "a", encoding="utf-8") as log_file, \
            SimulationSuperLink(run.path, cfg.mode.ray_address) as link:
        startup_s = time.perf_counter() - t0
        run_id = submit_and_stream(link, toml_path, n_sites, cfg.mode.client_cpus,
                                   cfg.mode.client_gpus, on_line, log_file)
        status = run_status(link, run_id) if run_id is not None else "not started"
    bar.close()
    return _finish(cfg, run, status, startup_s, time.perf_counter() - t0, out)


def _finish(cfg: ExperimentConfig, run: RunDir, status: str, startup_s: float, wall_s: float,
            out: TextIO, command: str = "simulate") -> int:
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
    if ok and command == "simulate":
        _final_quality(cfg, run, out)
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


def _final_quality(cfg: ExperimentConfig, run: RunDir, out: TextIO) -> None:
    """Score the global adapter against the baselines (simulation only: a coordinator never holds
    hospital reports). A failure here is reported, not fatal: every round is already committed."""
    from common.compare import final_quality

    adapter = run.path / "final_adapter"
    if not cfg.eval.final_reports or not (adapter / "adapter_config.json").is_file():
        return
    t0 = time.perf_counter()
    try:
        result = final_quality(cfg, adapter, run.path / "final_eval", out)
    except FedmiraError as exc:
        print(f"Final quality check skipped: {exc}", file=out)
        return
    run.mark(final_quality={
        "n": result["n"], "verdict": result["verdict"]["sentence"], "seconds": round(time.perf_counter() - t0, 1),
        "rougeL": {n: i["summary"].get("rougeL", {}).get("mean") for n, i in result["systems"].items()}})
