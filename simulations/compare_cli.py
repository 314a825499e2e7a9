"""``fedmira compare --system NAME=PATH[:TEMPLATE] ... [options] [overrides]``: the thin CLI edge.

Parses the systems, composes the config and hands over to :func:`common.compare.run_compare`.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Sequence, TextIO

from fedmira.common.errors import FedmiraError

DESCRIPTION = """\
Compare systems on one held-out set (the reports `fedmira evaluate` scores, split by the same
partition config): your adapters (--system; federated, centralized, local-only runs), the base
model zero-shot, nearest-neighbour retrieval (the impression of the training report with the most
similar findings, TF-IDF; over all sites, within the site, and the consensus of the site's 8 most
similar reports) and the most frequent training impression. Reports per system ROUGE-1/2/L,
BLEU-4, BERTScore-F1, similarity and clinical F1 with bootstrap CIs; tests the reference system
against every other one per metric (Wilcoxon signed-rank and paired randomization, Holm-Bonferroni
across systems x metrics, rank-biserial and mean difference with CI); says whether the best
fine-tuned system beats retrieval. Writes compare.md (one table of adjusted p-values),
compare.json, compare.png, per_sample.csv and predictions/. Generated predictions are cached by
adapter bytes, prompt, decoding and report ids, so a rerun only generates what changed.

With --input FILE the held-out set is every report of a new hospital's file as it is (all
external; data.path and partition are not used) and --prior FILE, that hospital's own earlier
reports, is both the retrieval index of site_aware_rag prompts and the baselines' training pool.
The baselines need that pool: with --input and no --prior, compare refuses unless --no-baselines.

  fedmira compare --system fedavg=outputs/iu_8sites/RUN_DIR --system central=outputs/train/X/adapter \\
      data=iu_xray data.path=/path/to/indiana_reports.csv
  fedmira compare --system fedavg=RUN_DIR --system fedavg_plain=RUN_DIR:plain   # prompt ablation
  fedmira compare --system fedavg=RUN_DIR --input new_site.jsonl --prior new_site_archive.jsonl
"""

SYSTEM_HELP = ("NAME=PATH[:TEMPLATE]: an adapter to compare (repeatable). PATH is a PEFT adapter "
               "folder or a run folder (its final_adapter/); :plain or :site_aware runs it with that "
               "prompt instead of the one it was trained with; NAME=base[:TEMPLATE] is the base model")


def default_out_dir(run_out_dir: str) -> Path:
    """``<run.out_dir>/compare/<timestamp>``."""
    return Path(run_out_dir) / "compare" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def compare_command(overrides: Sequence[str], systems: Sequence[str], *, reference: str | None = None,
                    out: str | None = None, cache: str | None = None, limit: int | None = None,
                    zero_shot: bool = True, baselines: bool = True, no_encoder: bool = False,
                    resamples: int = 1000, permutations: int = 10000,
                    input: str | None = None, prior: str | None = None,
                    stream: TextIO | None = None) -> int:
    """Run ``fedmira compare``; returns the exit code (0 on success).

    ``limit`` None means 200 held-out reports of ``data.path``'s split; ``input`` scores every
    report of that file instead, with ``prior`` as the hospital's archive (retrieval index and
    the baselines' training pool).

    Raises
    ------
    FedmiraError
        Bad systems, options, overrides, data or model (the CLI prints the message).
    """
    from fedmira.common.compare import default_systems, parse_system, print_compare, run_compare
    from fedmira.common.compose import compose_config
    from fedmira.simulations.evaluate_cli import DEFAULT_LIMIT, check_input_flags

    printer = sys.stdout if stream is None else stream
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise FedmiraError(f"Unexpected argument(s) {bad}: overrides look like key=value; systems "
                           "are given with --system NAME=PATH (see --help).")
    check_input_flags(input, prior, limit)
    limit = DEFAULT_LIMIT if limit is None else limit
    if limit < 0 or resamples < 1 or permutations < 1:
        raise FedmiraError("--limit must be >= 0 (0: all), --resamples and --permutations >= 1.")
    specs = default_systems([parse_system(s) for s in systems], zero_shot=zero_shot, baselines=baselines)
    if len(specs) < 2:
        raise FedmiraError("Need at least two systems to compare: add --system NAME=PATH or drop "
                           "--no-zero-shot / --no-baselines.")
    cfg = compose_config(list(overrides))
    folder = Path(out) if out else default_out_dir(cfg.run.out_dir)
    result = run_compare(cfg, specs, reference=reference, limit=limit, out_dir=folder, cache_dir=cache,
                         use_encoder=not no_encoder, n_resamples=resamples, n_permutations=permutations,
                         out=printer, input_path=input, prior_path=prior)
    print_compare(result, printer)
    return 0
