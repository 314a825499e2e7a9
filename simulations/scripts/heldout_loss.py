"""Held-out loss of run folders' final adapters on the same reports, side by side.

Federated runs sample different hospitals for training and evaluation (Flower's node ids are
random per run), so their per-round validation losses are not measured on the same reports.
This script scores each run's final adapter on one fixed set: the validation splits of all
training hospitals of the first run's partition (capped with --limit, in manifest order), so
two runs that differ in one setting (e.g. data.template) are compared like with like. Each
adapter is scored with its own run's prompt template.

    python -m fedmira.simulations.scripts.heldout_loss RUN_A RUN_B [--limit 200]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedmira.common.adapters import load_adapter
from fedmira.common.config import ExperimentConfig
from fedmira.common.engine import encode_reports, evaluate_loss
from fedmira.common.model import apply_lora, load_base_model
from fedmira.common.reports import Report
from fedmira.common.site import load_site


def heldout_reports(run_dir: Path, limit: int) -> list[Report]:
    """Return the validation reports of every training site of ``run_dir``, in site order, capped."""
    index = json.loads((run_dir / "sites" / "sites.json").read_text())
    reports: list[Report] = []
    for site in index["train_sites"]:
        reports += load_site(run_dir / "sites" / site, site).val
    return reports[:limit] if limit else reports


def adapter_loss(run_dir: Path, reports: list[Report], batch_size: int = 8) -> float:
    """Mean loss per impression token of ``run_dir``'s final adapter on ``reports``."""
    cfg = ExperimentConfig.from_dict(json.loads((run_dir / "config.json").read_text())["config"])
    loaded = load_base_model(cfg.model)
    model = apply_lora(loaded.model, cfg.lora, seed=cfg.train.seed)
    load_adapter(model, run_dir / "final_adapter")
    examples = encode_reports(reports, loaded.tokenizer, cfg.data)
    loss, _ = evaluate_loss(model, examples, loaded.device, int(loaded.tokenizer.pad_token_id), batch_size)
    return loss


def main() -> None:
    """Print each run's held-out loss on the first run's validation reports."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders written by fedmira simulate")
    parser.add_argument("--limit", type=int, default=200, help="held-out reports (0: all)")
    args = parser.parse_args()
    reports = heldout_reports(args.runs[0], args.limit)
    print(f"{len(reports)} held-out reports from the validation splits of {args.runs[0].name}")
    for run in args.runs:
        cfg = json.loads((run / "config.json").read_text())["config"]
        print(f"{run}: template={cfg['data']['template']} loss={adapter_loss(run, reports):.4f}")


if __name__ == "__main__":
    main()
