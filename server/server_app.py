"""The coordinator's ServerApp: config -> initial adapter -> federated rounds -> run folder.

Wiring only: ``server/strategies.py`` builds the strategy named by ``strategy.name``, run-folder
bookkeeping is ``common/rundir.py``, model code ``common/``. Each finished round is committed to
the run folder (adapter and any server-optimizer state, metrics, state) so a crash loses at most
the round in flight, and a resumed run starts from the last committed adapter with the global
round counter, the optimizer state and the cumulative byte counts restored.

With ``strategy.byte_budget_mb`` set, the run warns at 80% of the budget and stops cleanly after
the round that exceeds it: that round is committed, ``final_adapter`` written, and state.json
says ``status: stopped_budget`` (the launcher reports it as stopped, not failed).
"""

from __future__ import annotations

import dataclasses
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmira.common.adapters import (
    adapter_num_bytes,
    get_adapter_state,
    load_adapter_state,
    save_adapter_state,
)
from fedmira.common.config import ExperimentConfig
from fedmira.common.model import apply_lora, load_base_model
from fedmira.common.rundir import (
    RunDir,
    load_strategy_state,
    plot_losses,
    save_strategy_state,
    write_tensorboard,
)
from fedmira.common.runs import round_line
from fedmira.common.transport import BYTES_PER_MB, budget_status
from fedmira.server.strategies import build_strategy
from fedmira.server.strategy import FedmiraStrategy, RoundFailed

app = ServerApp()


class BudgetExhausted(RuntimeError):
    """The round just committed took the run past ``strategy.byte_budget_mb``."""


def initial_adapter(cfg: ExperimentConfig, run: RunDir) -> tuple[dict[str, Any], Any, int]:
    """(adapter state, PEFT config, rounds done): the last committed round's, or a fresh one."""
    loaded = load_base_model(dataclasses.replace(cfg.model, device="cpu"))  # server: no GPU needed
    model = apply_lora(loaded.model, cfg.lora, seed=cfg.train.seed)
    peft_config = model.peft_config["default"]
    done = run.repair()
    if done:
        state = load_adapter_state(run.round_dir(done))
        log(INFO, "Resuming after round %d from %s", done, run.round_dir(done))
        return state, peft_config, done
    return get_adapter_state(model), peft_config, 0


def restore_strategy(strategy: FedmiraStrategy, run: RunDir, done: int) -> None:
    """Load the server-optimizer state committed with round ``done`` (nothing for stateless ones)."""
    saved = load_strategy_state(run.round_dir(done)) if done else None
    if saved is not None:
        strategy.load_strategy_state(*saved)
        log(INFO, "Restored %s state of round %d", type(strategy).__name__, done)


def write_round(strategy: FedmiraStrategy, adapter: dict[str, Any], peft_config: Any, folder: Path) -> None:
    """Write a round folder's content: the adapter (PEFT format) and the strategy's state, if any."""
    save_adapter_state(adapter, peft_config, folder)
    state = strategy.strategy_state()
    if state is not None:
        save_strategy_state(folder, *state)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``strategy.rounds`` federated rounds (fewer when resuming).

    A failure is recorded in the run folder with its kind and reason before Flower sees the
    exception.
    """
    cfg = ExperimentConfig.from_run_config(context.run_config)
    run = RunDir(cfg.run.dir)
    run.mark(serverapp_started_at=time.time(), failure=None, budget_warning=None)
    try:
        run_rounds(grid, cfg, run)
    except RoundFailed as exc:
        _fail(run, "too_few_sites", str(exc))
        raise
    except Exception as exc:
        _fail(run, "serverapp_error", f"{type(exc).__name__}: {exc}")
        raise


def run_rounds(grid: Grid, cfg: ExperimentConfig, run: RunDir) -> None:
    """Build the initial adapter, strategy and restored state, then run the rounds, each committed."""
    state, peft_config, done = initial_adapter(cfg, run)
    total = cfg.strategy.rounds
    if done >= total:
        log(INFO, "All %d rounds are already committed in %s", total, run.path)
        return
    spent = run.comm_totals()
    if budget_status(sum(spent), cfg.strategy.byte_budget_mb) == "exceeded":
        why = (f"byte budget of {cfg.strategy.byte_budget_mb:.3f} MB already spent "
               f"({sum(spent) / BYTES_PER_MB:.3f} MB): nothing to run")
        log(INFO, "[fedmira] %s", why)
        run.mark(status="stopped_budget", stop_reason=why)
        return
    n_bytes = adapter_num_bytes(state)
    log(INFO, "fedmira: %s, %d rounds, adapter %d tensors / %.2f MB per site and direction",
        cfg.strategy.name, total - done, len(state), n_bytes / 1e6)
    strategy = build_strategy(cfg, round_offset=done, comm_offset=spent)
    if cfg.mode.name == "deployment":  # only the hospitals `fedmira coordinator` allow-listed
        run.allowed_nodes()  # fail fast when the coordinator wrote none
        strategy.allowed_nodes = run.allowed_nodes
        strategy.ledger.node_names = run.allowed_node_names()
    restore_strategy(strategy, run, done)
    rows = run.metrics()
    if rows:
        strategy.restore_privacy(rows[-1].get("privacy", {}))
    commit = _committer(cfg, run, strategy, peft_config, done)
    run.mark(status="running", planned_rounds=total, rounds_started_at=time.time())
    try:
        result = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(state), num_rounds=total - done,
            timeout=cfg.strategy.round_timeout_s, train_config=ConfigRecord(), evaluate_fn=commit,
        )
    except BudgetExhausted as stop:
        log(INFO, "[fedmira] %s", stop)
        final = load_adapter_state(run.round_dir(run.last_round))
        save_adapter_state(final, peft_config, Path(run.path) / "final_adapter")
        run.mark(status="stopped_budget", stop_reason=str(stop))
        return
    final = result.arrays.to_torch_state_dict() if result.arrays is not None else state
    save_adapter_state(final, peft_config, Path(run.path) / "final_adapter")
    run.mark(status="completed")


def _committer(
    cfg: ExperimentConfig, run: RunDir, strategy: FedmiraStrategy, peft_config: Any, done: int,
) -> Any:
    """Flower's ``evaluate_fn``: commit each finished round, then enforce the byte budget."""
    clock = {"t": time.perf_counter(), "warned": False}
    budget = cfg.strategy.byte_budget_mb

    def commit(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        g = done + server_round
        record = strategy.round_record(g)
        record["round_s"] = time.perf_counter() - clock["t"]
        clock["t"] = time.perf_counter()
        adapter = arrays.to_torch_state_dict()
        run.commit_round(g, lambda folder: write_round(strategy, adapter, peft_config, folder), record)
        log(INFO, "[fedmira] %s", round_line(g, cfg.strategy.rounds, record))
        run.write_metrics_csv()
        plot_losses(run)
        if cfg.run.tensorboard:
            write_tensorboard(run, {"round": g, **record})
        used = record["comm"]["cumulative_bytes"]
        status = budget_status(used, budget)
        if status == "warn" and not clock["warned"]:
            clock["warned"] = True
            note = (f"byte budget: {100 * used / (budget * BYTES_PER_MB):.0f}% used "
                    f"({used / BYTES_PER_MB:.3f} of {budget:.3f} MB) after round {g}")
            log(WARNING, "[fedmira] %s", note)
            run.mark(budget_warning=note)
        if status == "exceeded" and g < cfg.strategy.rounds:
            raise BudgetExhausted(f"byte budget exceeded: {used / BYTES_PER_MB:.3f} MB > "
                                  f"strategy.byte_budget_mb={budget:g} after round {g}; stopped "
                                  f"cleanly with round {g} committed")
        return None

    return commit


def _fail(run: RunDir, kind: str, reason: str) -> None:
    """Record why the run failed (``state.json`` ``failure``) and log it as one ``[fedmira]`` line.

    The launchers show that line on the console; the traceback stays in flower.log. The
    ServerApp holds no report text, so the reason cannot carry any.
    """
    line = " ".join(reason.split())[:600]
    run.mark(status="failed", failure={"kind": kind, "reason": line, "round": run.last_round + 1})
    log(ERROR, "[fedmira] FAILED (%s): %s", kind, line)
