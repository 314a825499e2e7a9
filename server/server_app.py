"""The coordinator's ServerApp: config -> initial adapter -> FedAvg rounds -> run folder.

Wiring only: the strategy lives in ``server/strategy.py``, run-folder bookkeeping in
``common/rundir.py``, model code in ``common/``. Each finished round is committed to the run
folder (adapter, metrics, state) so a crash loses at most the round in flight, and a resumed run
starts from the last committed adapter with the global round counter restored.
"""

from __future__ import annotations

import dataclasses
import time
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.adapters import adapter_num_bytes, get_adapter_state, load_adapter_state, save_adapter_state
from common.config import ExperimentConfig
from common.model import apply_lora, load_base_model
from common.rundir import RunDir, plot_losses, write_tensorboard
from server.strategy import FedmiraFedAvg

app = ServerApp()


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


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``strategy.rounds`` federated rounds (fewer when resuming)."""
    cfg = ExperimentConfig.from_run_config(context.run_config)
    run = RunDir(cfg.run.dir)
    run.mark(serverapp_started_at=time.time())
    state, peft_config, done = initial_adapter(cfg, run)
    total = cfg.strategy.rounds
    if done >= total:
        log(INFO, "All %d rounds are already committed in %s", total, run.path)
        return
    n_bytes = adapter_num_bytes(state)
    log(INFO, "fedmira: %d rounds, adapter %d tensors / %.2f MB per site and direction",
        total - done, len(state), n_bytes / 1e6)
    strategy = FedmiraFedAvg(
        round_config_fn=lambda g: {"lr": cfg.train.lr, "local-steps": cfg.train.steps},
        round_offset=done, evaluate_every=cfg.eval.every, total_rounds=total, seed=cfg.run.seed,
        fraction_train=cfg.strategy.fraction_train, fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_train_nodes=cfg.strategy.min_train_sites, min_evaluate_nodes=cfg.strategy.min_evaluate_sites,
        min_available_nodes=cfg.strategy.min_train_sites,
    )
    clock = {"t": time.perf_counter()}

    def commit(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        g = done + server_round
        record = strategy.round_record(g)
        record["round_s"] = time.perf_counter() - clock["t"]
        clock["t"] = time.perf_counter()
        adapter = arrays.to_torch_state_dict()
        run.commit_round(g, lambda folder: save_adapter_state(adapter, peft_config, folder), record)
        _log_round(g, total, record)
        run.write_metrics_csv()
        plot_losses(run)
        if cfg.run.tensorboard:
            write_tensorboard(run, {"round": g, **record})
        return None

    run.mark(status="running", planned_rounds=total, rounds_started_at=time.time())
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(state), num_rounds=total - done,
        train_config=ConfigRecord(), evaluate_fn=commit,
    )
    final = result.arrays.to_torch_state_dict() if result.arrays is not None else state
    save_adapter_state(final, peft_config, Path(run.path) / "final_adapter")
    run.mark(status="completed")


def _log_round(g: int, total: int, record: dict[str, Any]) -> None:
    train, ev = record["train"], record["evaluate"]
    parts = [f"round {g}/{total}", f"{train.get('num-sites', 0)} sites",
             f"train loss {train.get('train-loss', float('nan')):.4f}"]
    if "val-loss" in ev:
        parts.append(f"val loss {ev['val-loss']:.4f}")
    if "rouge-l" in ev:
        parts.append(f"ROUGE-L {ev['rouge-l']:.3f}")
    if record["rejected"]:
        parts.append(f"{len(record['rejected'])} site(s) excluded")
    parts.append(f"{record['round_s']:.1f} s")
    log(INFO, "[fedmira] %s", " | ".join(parts))
