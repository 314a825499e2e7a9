"""Evaluation as in the study, with bootstrap confidence intervals.

Generated impressions are scored overall, per hospital, per modality, and on internal vs
external (unseen) hospitals.

* :func:`evaluate_predictions` scores aligned reports and generated impressions (pure: no
  model, no files) and returns the report data.
* :func:`write_report` writes ``report.md``, ``report.json``, ``per_sample.csv`` and plots.
* :func:`run_evaluate` does the whole job for a config: the split used by ``fedmira simulate``
  (internal sites' test split plus every report of external sites), generation with the base
  model and an optional adapter, scoring and the written report.
* :func:`run_evaluate_file` does it for a new hospital's file as it is (``--input``): every
  report scored, all external, with the hospital's own prior reports (``--prior``) as the
  retrieval index (:func:`load_file_set`).

Only ids, site, modality, body part and numbers are written to the report, the CSV and the
console; never report text. The generated impressions go to ``predictions.jsonl`` in the output
folder, which is the model output for the researcher and stays on their machine.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence, TextIO, TypedDict

from fedmira.common.clinical import clinical_f1
from fedmira.common.metrics import (
    ENCODER_METRICS,
    SAMPLE_METRICS,
    corpus_bleu4,
    score_pairs,
    summarize_scores,
)
from fedmira.common.reports import Report
from fedmira.common.tables import markdown_table

if TYPE_CHECKING:
    from fedmira.common.config import ExperimentConfig

#: Metrics shown in report tables and plots, in this order, with their labels.
REPORT_METRICS: dict[str, str] = {
    "rougeL": "ROUGE-L", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "bleu4": "BLEU-4",
    "bertscore_f1": "BERTScore-F1", "sim": "Similarity", "clinical_micro_f1": "Clinical micro-F1",
    "clinical_agreement": "Clinical agreement",
}
#: Metrics in the per-group tables (the overall table has all of REPORT_METRICS).
GROUP_METRICS: tuple[str, ...] = ("rougeL", "bleu4", "bertscore_f1", "sim", "clinical_micro_f1",
                                  "clinical_agreement")
#: Metrics plotted per site and per modality.
PLOT_METRICS: tuple[str, ...] = ("rougeL", "bertscore_f1", "clinical_micro_f1")
ID_COLUMNS: tuple[str, ...] = ("report_id", "site_id", "modality", "body_part", "group")
INTERNAL, EXTERNAL = "internal", "external"
REPORT_MD, REPORT_JSON, PER_SAMPLE_CSV, PREDICTIONS = (
    "report.md", "report.json", "per_sample.csv", "predictions.jsonl")
SITES_PNG, MODALITIES_PNG = "sites.png", "modalities.png"


# ----------------------------------------------------------------------------- scoring
class _Bootstrap(TypedDict):
    """Bootstrap settings of every summary (``summarize_scores`` keywords)."""

    n_resamples: int
    seed: int


def evaluate_predictions(
    reports: Sequence[Report], hyps: Sequence[str], *, external_sites: Iterable[str] = frozenset(),
    use_encoder: bool = True, n_resamples: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """Score generated impressions against the reports' own impressions.

    Parameters
    ----------
    reports : sequence of Report
        The evaluated reports (their ``impression`` is the reference).
    hyps : sequence of str
        Generated impressions, aligned with ``reports``.
    external_sites : iterable of str
        Sites held out of training; their reports form the ``external`` group.
    use_encoder : bool
        Compute BERTScore and sentence similarity (False: recorded as missing).
    n_resamples, seed : int
        Bootstrap resamples and seed of every confidence interval.

    Returns
    -------
    dict
        ``n``, ``metrics`` (per-sample metric names), ``missing`` (metrics not computed),
        ``overall`` / ``by_group`` / ``per_site`` / ``per_modality`` (each metric -> ``mean``,
        ``lo``, ``hi``, ``n``, plus ``corpus_bleu4`` and ``n_reports``), ``clinical`` (the
        per-observation table of :func:`common.clinical.clinical_f1`) and ``per_sample``
        (one row of ids and scores per report, no text).
    """
    if len(reports) != len(hyps):
        raise ValueError(f"{len(reports)} reports but {len(hyps)} generated impressions")
    external = set(external_sites)
    refs = [r.impression for r in reports]
    parts = [r.body_part for r in reports]
    scores = score_pairs(refs, hyps, body_parts=parts, use_encoder=use_encoder)
    rows = [{**_ids(r, external), **s} for r, s in zip(reports, scores)]
    opts: _Bootstrap = {"n_resamples": n_resamples, "seed": seed}
    return {
        "n": len(rows),
        "metrics": list(SAMPLE_METRICS),
        "missing": [] if use_encoder else list(ENCODER_METRICS),
        "overall": _summary(rows, refs, hyps, range(len(rows)), opts),
        "by_group": _grouped(rows, refs, hyps, "group", opts),
        "per_site": _grouped(rows, refs, hyps, "site_id", opts),
        "per_modality": _grouped(rows, refs, hyps, "modality", opts),
        "clinical": clinical_f1(refs, list(hyps), parts),
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "confidence": 0.95},
        "per_sample": rows,
    }


def _ids(report: Report, external: set[str]) -> dict[str, str]:
    return {"report_id": report.report_id, "site_id": report.site_id,
            "modality": report.modality, "body_part": report.body_part,
            "group": EXTERNAL if report.site_id in external else INTERNAL}


def _summary(rows: list[dict[str, Any]], refs: Sequence[str], hyps: Sequence[str],
             idx: Iterable[int], opts: _Bootstrap) -> dict[str, Any]:
    """Metric summaries of the rows at ``idx`` plus corpus BLEU and the report count."""
    idx = list(idx)
    out: dict[str, Any] = summarize_scores([rows[i] for i in idx], **opts)
    out["corpus_bleu4"] = corpus_bleu4([refs[i] for i in idx], [hyps[i] for i in idx]) if idx else None
    out["n_reports"] = len(idx)
    return out


def _grouped(rows: list[dict[str, Any]], refs: Sequence[str], hyps: Sequence[str], key: str,
             opts: _Bootstrap) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(str(row[key]), []).append(i)
    return {name: _summary(rows, refs, hyps, idx, opts) for name, idx in sorted(groups.items())}


# ----------------------------------------------------------------------------- writing
def write_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write the evaluation: Markdown and JSON reports, per-sample CSV and plots.

    Parameters
    ----------
    result : dict
        From :func:`evaluate_predictions` (optionally with a ``meta`` dict added).
    out_dir : str or Path
        Output folder; created if missing.

    Returns
    -------
    dict
        ``report_md``, ``report_json``, ``per_sample_csv``, ``sites_png``, ``modalities_png``.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"report_md": root / REPORT_MD, "report_json": root / REPORT_JSON,
             "per_sample_csv": root / PER_SAMPLE_CSV, "sites_png": root / SITES_PNG,
             "modalities_png": root / MODALITIES_PNG}
    summary = {k: v for k, v in result.items() if k != "per_sample"}
    paths["report_json"].write_text(json.dumps(json_safe(summary), indent=2), encoding="utf-8")
    _write_csv(result["per_sample"], paths["per_sample_csv"])
    paths["report_md"].write_text(report_markdown(result), encoding="utf-8")
    missing = result.get("missing", [])
    external = {r["site_id"] for r in result["per_sample"] if r["group"] == EXTERNAL}
    _plot_groups(result["per_site"], "site", paths["sites_png"], missing, external)
    _plot_groups(result["per_modality"], "modality", paths["modalities_png"], missing)
    return paths


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Ids and scores per report (missing scores as empty cells); never text."""
    columns = list(ID_COLUMNS) + list(SAMPLE_METRICS) + ["clinical_tp", "clinical_fp", "clinical_fn"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return round(value, 6) if isinstance(value, float) else value


def _fmt(summary: dict[str, Any] | None) -> str:
    """``0.412 [0.390, 0.433]`` or ``n/a``."""
    if not summary or summary.get("mean") is None:
        return "n/a"
    lo, hi = summary.get("lo"), summary.get("hi")
    ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None and math.isfinite(lo) else ""
    return f"{summary['mean']:.3f}{ci}"


def _table(groups: dict[str, dict[str, Any]], first: str, metrics: Sequence[str]) -> list[str]:
    head = [first, "n"] + [REPORT_METRICS[m] for m in metrics] + ["corpus BLEU-4"]
    rows = []
    for name, s in groups.items():
        bleu = s.get("corpus_bleu4")
        rows.append([name, s["n_reports"], *(_fmt(s.get(m)) for m in metrics),
                     "n/a" if bleu is None else f"{bleu:.3f}"])
    return markdown_table(head, rows).splitlines()


def _clinical_table(clinical: dict[str, Any]) -> list[str]:
    head = ["observation", "support", "predicted", "precision", "recall", "F1"]
    rows = [[name, s["support"], s["predicted"], _num(s["precision"]), _num(s["recall"]), _num(s["f1"])]
            for name, s in clinical["per_observation"].items()]
    return markdown_table(head, rows).splitlines()


def report_markdown(result: dict[str, Any]) -> str:
    """Render the evaluation as a Markdown document (numbers, ids of groups; no report text)."""
    metrics = list(REPORT_METRICS)
    meta = result.get("meta", {})
    lines = ["# Evaluation", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list)) and k != "reports"]
    lines += [f"- reports: {result['n']}", f"- bootstrap: {result['bootstrap']['n_resamples']} "
              f"resamples, seed {result['bootstrap']['seed']}, 95% percentile intervals"]
    if result.get("missing"):
        lines.append(f"- not computed (encoder skipped): {', '.join(result['missing'])}")
    lines += ["", "## Overall", ""] + _table({"all": result["overall"]}, "set", metrics)
    groups = list(GROUP_METRICS)
    lines += ["", "## Internal vs external hospitals", ""] + _table(result["by_group"], "group", groups)
    lines += ["", "## Per modality", ""] + _table(result["per_modality"], "modality", groups)
    lines += ["", "## Per site", ""] + _table(result["per_site"], "site", groups)
    clinical = result["clinical"]
    lines += ["", "## Clinical observations", "",
              f"Micro-F1 {_num(clinical['micro_f1'])}; without No Finding "
              f"{_num(clinical['micro_f1_findings'])}; macro-F1 {_num(clinical['macro_f1'])} "
              "(observations with reference support). Uncertain mentions count as positive. "
              "No Finding is positive whenever no finding is mentioned, so text without findings "
              "scores on normal studies: compare the micro-F1 without No Finding.", ""]
    lines += _clinical_table(clinical)
    lines += ["", "## Notes", "", *NOTES]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


NOTES: tuple[str, ...] = (
    "- All metrics are on 0..1 (BLEU-4 is sacrebleu's score / 100; similarity is a cosine).",
    "- ROUGE: rouge-score with Porter stemming, F-measure. BLEU-4 per sample: sacrebleu sentence "
    "BLEU with effective order; corpus BLEU-4 pools n-gram counts.",
    "- BERTScore-F1 and similarity use all-MiniLM-L6-v2 and are blind to negation "
    "(\"No pleural effusion.\" vs \"Pleural effusion.\" ~0.88); read them with the clinical metrics.",
    "- Clinical metrics: a rule-based, negation- and uncertainty-aware labeler "
    "(common/clinical.py; CheXpert's 14 observations for chest, a head CT/MR set for head). "
    "clinical_agreement: share of labeled observations whose state matches exactly; "
    "clinical micro-F1: pooled over observations, rows resampled together for its interval.",
)


# ----------------------------------------------------------------------------- plots
def _plot_groups(groups: dict[str, dict[str, Any]], what: str, path: Path,
                 missing: Sequence[str], highlight: Iterable[str] = ()) -> Path:
    """One bar panel per metric, one bar per group, 95% bootstrap intervals as error bars.

    Groups in ``highlight`` (external sites) are drawn in orange.
    """
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="fedmira-mpl-"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in PLOT_METRICS if m not in missing]
    names, highlight = list(groups), set(highlight)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 0.35 * len(names) + 2), 2.4 * len(metrics)),
                             squeeze=False, sharex=True)
    for ax, metric in zip(axes[:, 0], metrics):
        means, errs = _bars(groups, names, metric)
        colors = ["tab:orange" if n in highlight else "tab:blue" for n in names]
        ax.bar(range(len(names)), means, yerr=errs, capsize=2, color=colors, alpha=0.8)
        ax.set_ylabel(REPORT_METRICS[metric])
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xticks(range(len(names)), names, rotation=90 if len(names) > 8 else 0, fontsize=8)
    note = " (orange: external)" if highlight else ""
    axes[0, 0].set_title(f"Per {what} (mean, 95% bootstrap CI){note}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(groups: dict[str, dict[str, Any]], names: list[str],
          metric: str) -> tuple[list[float], list[list[float]]]:
    """Bar heights and asymmetric error-bar lengths (missing values: NaN, no bar)."""
    means, lows, highs = [], [], []
    for name in names:
        s = groups[name].get(metric) or {}
        mean = s.get("mean")
        mean = math.nan if mean is None else mean
        lo, hi = s.get("lo"), s.get("hi")
        means.append(mean)
        lows.append(0.0 if lo is None or math.isnan(mean) else max(0.0, mean - lo))
        highs.append(0.0 if hi is None or math.isnan(mean) else max(0.0, hi - mean))
    return means, [lows, highs]


# ----------------------------------------------------------------------------- the whole job
def select_reports(splits: Sequence[Any], *, split: str = "test", limit: int = 200,
                   seed: int = 0) -> tuple[list[Report], set[str]]:
    """Select the reports to evaluate: ``split`` of internal sites plus all reports of external sites.

    Capped at ``limit`` (0: no cap) by a stable hash of ``(seed, report_id)``, so the same
    config gives the same reports, spread over sites in proportion to their size.

    Returns
    -------
    tuple
        (reports ordered by site then id, external site ids).
    """
    if split not in ("train", "val", "test"):
        raise ValueError("split must be train, val or test")
    external = {s.site_id for s in splits if s.external}
    pool = [r for s in splits if not s.external for r in getattr(s, split)]
    pool += [r for s in splits if s.external for r in s.test]
    if limit and len(pool) > limit:
        pool = sorted(pool, key=lambda r: (_rank(seed, r.report_id), r.report_id))[:limit]
    return sorted(pool, key=lambda r: (r.site_id, r.report_id)), external


def _rank(seed: int, report_id: str) -> str:
    return hashlib.sha256(f"{seed}\x1f{report_id}".encode("utf-8")).hexdigest()


def write_predictions(reports: Sequence[Report], hyps: Sequence[str], path: Path) -> None:
    """Write the generated impressions as JSONL (report_id, site_id, impression, reference)."""
    from fedmira.common.inference import write_impressions

    with path.open("w", encoding="utf-8") as handle:
        write_impressions(list(reports), list(hyps), handle)


def run_evaluate(cfg: ExperimentConfig, *, adapter: str | None, split: str = "test", limit: int = 200,
                 out_dir: str | Path, use_encoder: bool = True, n_resamples: int = 1000,
                 progress: bool = True, out: TextIO | None = None) -> dict[str, Any]:
    """Generate impressions for the evaluation reports of ``cfg`` and write the evaluation.

    Parameters
    ----------
    cfg : ExperimentConfig
        ``data`` and ``partition`` choose the reports (as ``fedmira simulate`` splits them);
        ``model`` and ``generate`` the model and decoding.
    adapter : str or None
        PEFT adapter folder; None evaluates the base model (zero-shot).
    split : str
        Split of internal sites (``test`` by default); external sites give all their reports.
    limit : int
        At most this many reports (0: all), chosen deterministically.
    out_dir : str or Path
        Output folder: ``predictions.jsonl`` and the files of :func:`write_report`.
    use_encoder : bool
        Compute BERTScore and sentence similarity.

    Returns
    -------
    dict
        The result of :func:`evaluate_predictions` with ``meta`` (adapter, split, counts,
        timings, config hashes) and ``paths``.
    """
    from fedmira.common.baselines import training_pool
    from fedmira.common.inference import generate_impressions
    from fedmira.common.partition import load_pooled_reports, split_sites
    from fedmira.common.prompts import RAG_TEMPLATES
    from fedmira.common.retrieval import index_sizes

    stream = sys.stdout if out is None else out
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    splits = split_sites(cfg, load_pooled_reports(cfg, stream))
    reports, external = select_reports(splits, split=split, limit=limit, seed=cfg.partition.seed)
    if not reports:
        from fedmira.common.errors import DataError

        raise DataError(f"No reports in the {split} split to evaluate; check data.path and partition.")
    print(f"evaluating {len(reports)} reports from {len({r.site_id for r in reports})} sites "
          f"({len(external)} external)", file=stream)
    t0 = time.perf_counter()
    prior = training_pool(splits)
    if cfg.data.template in RAG_TEMPLATES:
        print(retrieval_note(reports, prior, "training split"), file=stream)
    hyps = generate_impressions(cfg, reports, adapter, progress=progress, prior=prior)
    gen_s = time.perf_counter() - t0
    write_predictions(reports, hyps, root / PREDICTIONS)
    t1 = time.perf_counter()
    result = evaluate_predictions(reports, hyps, external_sites=external, use_encoder=use_encoder,
                                  n_resamples=n_resamples, seed=cfg.partition.seed)
    score_s = time.perf_counter() - t1
    result["meta"] = _meta(cfg, adapter, split, limit, len(reports), gen_s, score_s)
    if cfg.data.template in RAG_TEMPLATES:
        result["meta"]["retrieval_index"] = index_sizes(reports, prior)
    result["paths"] = {k: str(v) for k, v in write_report(result, root).items()}
    result["paths"]["predictions"] = str(root / PREDICTIONS)
    return result


def _meta(cfg: ExperimentConfig, adapter: str | None, split: str, limit: int, n: int, gen_s: float,
          score_s: float) -> dict[str, Any]:
    return {
        "model": cfg.model.name_or_path, "adapter": adapter or "none (zero-shot base model)",
        "data": cfg.data.path or "synthetic", "partition": cfg.partition.method, "split": split,
        "limit": limit, "reports": n, "prompt_template": cfg.data.template,
        "max_new_tokens": cfg.generate.max_new_tokens, "num_beams": cfg.generate.num_beams,
        "generate_s": round(gen_s, 1), "score_s": round(score_s, 1),
        "s_per_report": round(gen_s / max(n, 1), 3), "config_hash": cfg.config_hash(),
        "lock_hash": cfg.lock_hash(),
    }


def retrieval_note(reports: Sequence[Report], prior: Sequence[Report], source: str) -> str:
    """One line saying which prior reports each site's prompts retrieve from (counts only)."""
    from fedmira.common.retrieval import index_sizes

    parts = [f"{site} {n} ({source})" if n else f"{site} none (no prior reports)"
             for site, n in index_sizes(reports, prior).items()]
    return "retrieval index per site: " + ", ".join(parts)


# ----------------------------------------------------------------------------- a hospital's own file
@dataclass(frozen=True)
class FileSet:
    """Every report of one file, scored as an external hospital, and that hospital's prior reports.

    Attributes
    ----------
    reports : list of Report
        Every usable report of the input file (ordered by site, then id).
    prior : list of Report
        The usable reports of the prior file (empty without one), less any report whose id is
        also in the input (a report is never its own prior case).
    input_path, prior_path : str, str or None
        The files as given.
    rows_skipped, prior_rows_skipped : int
        Bad rows left out of each file (``data.policy=skip``).
    priors_excluded : int
        Prior reports dropped because their report id is also in the input.
    """

    reports: list[Report]
    prior: list[Report]
    input_path: str
    prior_path: str | None
    rows_skipped: int = 0
    prior_rows_skipped: int = 0
    priors_excluded: int = 0

    @property
    def sites(self) -> set[str]:
        """The input's site ids: all of them are external (unseen) hospitals."""
        return {r.site_id for r in self.reports}

    def meta(self) -> dict[str, Any]:
        """Describe what the evaluation records about the files (paths and counts; no text)."""
        from fedmira.common.retrieval import index_sizes

        return {"input": self.input_path, "prior": self.prior_path, "rows_skipped": self.rows_skipped,
                "prior_reports": len(self.prior), "prior_rows_skipped": self.prior_rows_skipped,
                "priors_excluded": self.priors_excluded,
                "retrieval_index": index_sizes(self.reports, self.prior)}


def _read_report_file(path: str, flag: str, data: Any, out: TextIO) -> tuple[list[Report], int]:
    """Usable reports of one file and how many rows were skipped (counts, codes and file:line only)."""
    from collections import Counter

    from fedmira.common.errors import DataError
    from fedmira.common.reports import load_reports

    if path == "-":
        raise DataError(f"{flag} - (stdin) cannot be scored: every report needs its reference impression. "
                        "Pass a report file (JSONL, CSV or IU CSV).")
    result = load_reports(path, fmt=data.format, policy=data.policy, max_chars=data.max_chars)
    if result.rows_skipped:
        codes = Counter(p.code for p in result.problems)
        print(f"{flag} {result.path}: {result.rows_skipped} of {result.rows_total} rows skipped ("
              + ", ".join(f"{k} {v}" for k, v in sorted(codes.items())) + ")", file=out)
        for problem in result.problems[:3]:
            print(f"  {problem}", file=out)
        print(f"  `fedmira data check {result.path}` lists every problem.", file=out)
    if not result.reports:
        first = f" First problem: {result.problems[0]}." if result.problems else ""
        raise DataError(f"No usable reports in {path} ({flag}).{first} Run `fedmira data check {path}`.")
    return result.reports, result.rows_skipped


def _sites_text(sites: Iterable[str], most: int = 10) -> str:
    names = sorted(sites)
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def load_file_set(input_path: str, prior_path: str | None, data: Any, out: TextIO) -> FileSet:
    """Read a hospital's file (every report is scored) and, optionally, its prior-report file.

    Priors are matched to scored reports by ``site_id``: the prior file must hold reports of the
    input's sites only (a prior file of another hospital is refused, naming both sets of site ids;
    input sites without prior reports are fine: their prompts say there are none). A prior
    report whose id is also in the input is dropped, so no report retrieves itself.

    Raises
    ------
    DataError
        A file that cannot be read or has no usable report (naming file and line of the first
        problem), or prior reports of sites that are not in the input.
    """
    from fedmira.common.errors import DataError

    reports, skipped = _read_report_file(input_path, "--input", data, out)
    reports = sorted(reports, key=lambda r: (r.site_id, r.report_id))
    if not prior_path:
        return FileSet(reports, [], input_path, None, skipped)
    prior, prior_skipped = _read_report_file(prior_path, "--prior", data, out)
    sites = {r.site_id for r in reports}
    foreign = {r.site_id for r in prior} - sites
    if foreign:
        raise DataError(
            f"--prior {prior_path} holds reports of site_id {_sites_text(foreign)}, which --input "
            f"{input_path} does not have (its site_id: {_sites_text(sites)}). Prior reports are matched "
            "to the scored reports by site_id, so the prior file must be the same hospital's own "
            "earlier reports: pass that hospital's archive, or make site_id agree in both files "
            "(`fedmira data check FILE` lists each file's sites).")
    ids = {r.report_id for r in reports}
    kept = [r for r in prior if r.report_id not in ids]
    excluded = len(prior) - len(kept)
    if excluded:
        print(f"--prior {prior_path}: {excluded} prior report{'s' if excluded != 1 else ''} excluded: "
              "the same report id is scored from --input (a report is never its own prior case)",
              file=out)
    return FileSet(reports, kept, input_path, prior_path, skipped, prior_skipped, excluded)


def run_evaluate_file(cfg: ExperimentConfig, *, input_path: str, prior_path: str | None, adapter: str | None,
                      out_dir: str | Path, use_encoder: bool = True, n_resamples: int = 1000,
                      progress: bool = True, out: TextIO | None = None) -> dict[str, Any]:
    """Score every report of a new hospital's file as it is, as an external site.

    No re-splitting: ``data.path`` and ``partition`` are not used; every usable report of
    ``input_path`` (any supported format, read with ``data.format``/``data.policy``) is in the
    ``external`` group. With ``prior_path``, that file's reports are the hospital's retrieval
    index for ``site_aware_rag`` prompts (see :func:`load_file_set`); without it those prompts
    say there are no prior reports.

    Returns
    -------
    dict
        As :func:`run_evaluate`; ``meta`` records the input and prior files, skipped rows and the
        per-site index sizes (counts only).
    """
    from fedmira.common.inference import generate_impressions
    from fedmira.common.prompts import RAG_TEMPLATES

    stream = sys.stdout if out is None else out
    root = Path(out_dir)
    files = load_file_set(input_path, prior_path, cfg.data, stream)
    reports = files.reports
    root.mkdir(parents=True, exist_ok=True)
    print(f"evaluating every report of {input_path}: {len(reports)} reports from {len(files.sites)} "
          f"sites (all external)", file=stream)
    if cfg.data.template in RAG_TEMPLATES:
        print(retrieval_note(reports, files.prior, "prior file"), file=stream)
    elif prior_path:
        print(f"note: data.template={cfg.data.template} does not retrieve prior reports; --prior is "
              "used by data.template=site_aware_rag", file=stream)
    t0 = time.perf_counter()
    hyps = generate_impressions(cfg, reports, adapter, progress=progress, prior=files.prior)
    gen_s = time.perf_counter() - t0
    write_predictions(reports, hyps, root / PREDICTIONS)
    t1 = time.perf_counter()
    result = evaluate_predictions(reports, hyps, external_sites=files.sites, use_encoder=use_encoder,
                                  n_resamples=n_resamples, seed=cfg.partition.seed)
    score_s = time.perf_counter() - t1
    meta = _meta(cfg, adapter, "all (external file)", 0, len(reports), gen_s, score_s)
    for key in ("data", "partition", "limit"):
        meta.pop(key)
    result["meta"] = {**files.meta(), **meta}
    result["paths"] = {k: str(v) for k, v in write_report(result, root).items()}
    result["paths"]["predictions"] = str(root / PREDICTIONS)
    return result
