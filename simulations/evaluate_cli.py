"""``fedmira evaluate [--adapter DIR] [--out DIR] [--limit N] [--no-encoder] [overrides]``.

Evaluation as in the study: impressions generated for the held-out reports (the ``test`` split
of internal hospitals plus every report of external ones, split exactly as ``fedmira simulate``
splits them) are scored with ROUGE, BLEU-4, BERTScore, sentence similarity and a negation-aware
clinical observation F1, overall, per hospital, per modality and internal vs external, with
bootstrap confidence intervals. Writes ``report.md``, ``report.json``, ``per_sample.csv``,
``sites.png``, ``modalities.png`` and ``predictions.jsonl`` (the generated impressions) to the
output folder. Only numbers, ids and paths are printed.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from common.errors import FedmiraError

EVAL_DIR = "eval"
# Metrics printed to the console after a run (the report has them all).
PRINTED: tuple[tuple[str, str], ...] = (
    ("rougeL", "ROUGE-L"), ("bleu4", "BLEU-4"), ("bertscore_f1", "BERTScore-F1"),
    ("sim", "similarity"), ("clinical_micro_f1", "clinical micro-F1"),
)


def default_out_dir(run_out_dir: str) -> Path:
    """``<run.out_dir>/eval/<timestamp>``."""
    return Path(run_out_dir) / EVAL_DIR / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def evaluate_command(overrides: Sequence[str], adapter: str | None, out: str | None, limit: int,
                     no_encoder: bool, *, stream: TextIO | None = None) -> int:
    """Run ``fedmira evaluate``; returns the exit code (0 on success).

    Parameters
    ----------
    overrides : sequence of str
        Hydra overrides (``key=value``, ``group=option``).
    adapter : str or None
        PEFT adapter folder (e.g. ``RUN_DIR/final_adapter``); None: the base model, zero-shot.
    out : str or None
        Output folder; default ``<run.out_dir>/eval/<timestamp>``.
    limit : int
        At most this many reports (0: all), chosen deterministically.
    no_encoder : bool
        Skip BERTScore and similarity (no encoder load; recorded as missing).
    stream : text stream, optional
        Where to print (default ``sys.stdout``).

    Raises
    ------
    FedmiraError
        Bad overrides, data or model (the CLI prints the message).
    """
    from common.compose import compose_config
    from common.evaluation import run_evaluate

    printer = sys.stdout if stream is None else stream
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise FedmiraError(f"Unexpected argument(s) {bad}: overrides look like key=value (see --help).")
    if limit < 0:
        raise FedmiraError(f"--limit must be >= 0 (0: all reports), got {limit}.")
    cfg = compose_config(list(overrides))
    folder = Path(out) if out else default_out_dir(cfg.run.out_dir)
    result = run_evaluate(cfg, adapter=adapter, limit=limit, out_dir=folder,
                          use_encoder=not no_encoder, out=printer)
    print_summary(result, printer)
    return 0


def print_summary(result: dict[str, Any], stream: TextIO) -> None:
    """A few lines of numbers: overall metrics with intervals, timing and the output paths."""
    overall, meta = result["overall"], result.get("meta", {})
    parts = []
    for key, label in PRINTED:
        s = overall.get(key) or {}
        if s.get("mean") is None:
            parts.append(f"{label} n/a")
        else:
            parts.append(f"{label} {s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]")
    findings = result.get("clinical", {}).get("micro_f1_findings")
    if findings is not None:
        parts.append(f"clinical micro-F1 without No Finding {findings:.3f}")
    print(f"{result['n']} reports: " + "; ".join(parts), file=stream)
    for group, s in result["by_group"].items():
        rl = s.get("rougeL") or {}
        if rl.get("mean") is not None:
            print(f"  {group}: {s['n_reports']} reports, ROUGE-L {rl['mean']:.3f}", file=stream)
    if meta:
        print(f"generation {meta['generate_s']} s ({meta['s_per_report']} s/report), "
              f"scoring {meta['score_s']} s", file=stream)
    for key, path in result.get("paths", {}).items():
        print(f"  {key:<15} {path}", file=stream)
