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
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

from tqdm.auto import tqdm

from fedmira.common import exit_codes
from fedmira.common.config import ExperimentConfig
from fedmira.common.errors import ConfigError, FedmiraError
from fedmira.common.partition import load_pooled_reports, split_sites, write_sites
from fedmira.common.rundir import RunDir, RunLock
from fedmira.common.runs import (
    RunFollower,
    create_run_folder,
    finish_run,
    resume_run,
    shown,
    write_run_config,
)


# ------------------------------------------------------------------------------ simulate
def new_run(
    cfg: ExperimentConfig, out: TextIO = sys.stdout,
) -> tuple[ExperimentConfig, RunDir, dict[str, Any]]:
    """Create the run folder with config, hashes and site folders."""
    cfg, run = create_run_folder(cfg)
    splits = split_sites(cfg, load_pooled_reports(cfg, out))
    index = write_sites(run.path, cfg, splits)
    return cfg, run, index


def simulate(cfg: ExperimentConfig, *, resume_overrides: Sequence[str] = (), out: TextIO = sys.stdout,
             verbose: bool = False) -> int:
    """Run a federated simulation; returns the process exit code (0: all rounds committed)."""
    with contextlib.ExitStack() as held:
        if cfg.run.resume:  # before anything of the run is read or stopped: one launcher per run
            held.enter_context(RunLock(Path(cfg.run.resume).expanduser(), "simulate"))
        return _simulate(cfg, held, resume_overrides=resume_overrides, out=out, verbose=verbose)


def _simulate(cfg: ExperimentConfig, held: contextlib.ExitStack, *, resume_overrides: Sequence[str],
              out: TextIO, verbose: bool) -> int:
    from fedmira.common.flower_runtime import (
        SimulationSuperLink,
        run_status,
        stop_recorded,
        submit_and_stream,
    )

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

    def on_line(line: str) -> None:  # Flower's output: its errors (all of it with -v)
        if verbose or shown(line):
            bar.write(line, file=out)

    def on_commit(text: str, g: int) -> None:  # what the ServerApp committed to the run folder
        bar.write(text, file=out)
        bar.n = g
        bar.refresh()

    with open(run.path / "flower.log", "a", encoding="utf-8") as log_file, \
            RunFollower(run, cfg.strategy.rounds, on_commit), \
            SimulationSuperLink(run.path, cfg.mode.ray_address) as link:
        startup_s = time.perf_counter() - t0
        run_id = submit_and_stream(link, toml_path, n_sites, cfg.mode.client_cpus,
                                   cfg.mode.client_gpus, on_line, log_file)
        status = run_status(link, run_id) if run_id is not None else "not started"
    bar.close()
    code = finish_run(cfg, run, status, startup_s, time.perf_counter() - t0, out)
    if code == exit_codes.OK:
        _final_quality(cfg, run, out)
    return code


def _final_quality(cfg: ExperimentConfig, run: RunDir, out: TextIO) -> None:
    """Score the global adapter against the baselines.

    Simulation only: a coordinator never holds hospital reports. A failure here is reported, not
    fatal: every round is already committed.
    """
    from fedmira.common.compare import final_quality

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
        "n": result["n"], "verdict": result["verdict"]["sentence"],
        "seconds": round(time.perf_counter() - t0, 1),
        "rougeL": {n: i["summary"].get("rougeL", {}).get("mean") for n, i in result["systems"].items()}})
