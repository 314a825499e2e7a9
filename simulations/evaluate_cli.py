"""``fedmira evaluate [--adapter DIR] [--input FILE [--prior FILE]] [--out DIR] [--limit N] [overrides]``.

Evaluation as in the study: impressions generated for the held-out reports (the ``test`` split
of internal hospitals plus every report of external ones, split exactly as ``fedmira simulate``
splits them; or, with ``--input FILE``, every report of a new hospital's file as it is, as an
external site, with ``--prior FILE`` as its own archive of prior reports) are scored with ROUGE,
BLEU-4, BERTScore, sentence similarity and a negation-aware clinical observation F1, overall,
per hospital, per modality and internal vs external, with bootstrap confidence intervals.
Writes ``report.md``, ``report.json``, ``per_sample.csv``, ``sites.png``, ``modalities.png``
and ``predictions.jsonl`` (the generated impressions) to the output folder. Only numbers, ids
and paths are printed.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from fedmira.common.errors import FedmiraError

EVAL_DIR = "eval"
#: Held-out reports scored when --limit is not given (the split of data.path only).
DEFAULT_LIMIT = 200
# Metrics printed to the console after a run (the report has them all).
PRINTED: tuple[tuple[str, str], ...] = (
    ("rougeL", "ROUGE-L"), ("bleu4", "BLEU-4"), ("bertscore_f1", "BERTScore-F1"),
    ("sim", "similarity"), ("clinical_micro_f1", "clinical micro-F1"),
)


def check_input_flags(input: str | None, prior: str | None, limit: int | None) -> None:
    """``--prior`` needs ``--input``; ``--input`` scores every report, so no ``--limit``."""
    if prior and not input:
        raise FedmiraError("--prior FILE goes with --input FILE (the prior reports of the hospital whose "
                           "file is scored); without --input the retrieval index is the training split "
                           "of data.path.")
    if input and limit:
        raise FedmiraError(f"--input scores every report of {input}; --limit applies only to the "
                           "held-out split of data.path. Drop --limit (or pass a shorter file).")


def default_out_dir(run_out_dir: str) -> Path:
    """``<run.out_dir>/eval/<timestamp>``."""
    return Path(run_out_dir) / EVAL_DIR / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def evaluate_command(overrides: Sequence[str], adapter: str | None, out: str | None, limit: int | None,
                     no_encoder: bool, *, input: str | None = None, prior: str | None = None,
                     stream: TextIO | None = None) -> int:
    """Run ``fedmira evaluate``; returns the exit code (0 on success).

    Parameters
    ----------
    overrides : sequence of str
        Hydra overrides (``key=value``, ``group=option``).
    adapter : str or None
        PEFT adapter folder (e.g. ``RUN_DIR/final_adapter``); None: the base model, zero-shot.
    out : str or None
        Output folder; default ``<run.out_dir>/eval/<timestamp>``.
    limit : int or None
        At most this many held-out reports (0: all; None: the default 200), chosen
        deterministically. Not with ``input``, which scores every report of the file.
    no_encoder : bool
        Skip BERTScore and similarity (no encoder load; recorded as missing).
    input : str, optional
        A report file scored as it is: every report, as an external site (no re-splitting).
    prior : str, optional
        With ``input``: that hospital's prior reports, the retrieval index of its
        ``site_aware_rag`` prompts (matched by site_id; a report id in both files is no prior).
    stream : text stream, optional
        Where to print (default ``sys.stdout``).

    Raises
    ------
    FedmiraError
        Bad overrides, data or model (the CLI prints the message).
    """
    from fedmira.common.compose import compose_config
    from fedmira.common.evaluation import run_evaluate, run_evaluate_file

    printer = sys.stdout if stream is None else stream
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise FedmiraError(f"Unexpected argument(s) {bad}: overrides look like key=value (see --help).")
    check_input_flags(input, prior, limit)
    if limit is not None and limit < 0:
        raise FedmiraError(f"--limit must be >= 0 (0: all reports), got {limit}.")
    cfg = compose_config(list(overrides))
    folder = Path(out) if out else default_out_dir(cfg.run.out_dir)
    if input:
        result = run_evaluate_file(cfg, input_path=input, prior_path=prior, adapter=adapter, out_dir=folder,
                                   use_encoder=not no_encoder, out=printer)
    else:
        result = run_evaluate(cfg, adapter=adapter, limit=DEFAULT_LIMIT if limit is None else limit,
                              out_dir=folder, use_encoder=not no_encoder, out=printer)
    print_summary(result, printer)
    return 0


def print_summary(result: dict[str, Any], stream: TextIO) -> None:
    """Print a few lines of numbers: overall metrics with intervals, timing and the output paths."""
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
