"""``fedmira compare``: several systems on one held-out set, with paired tests, as in the study.

Systems are fine-tuned adapters (federated, centralized, local-only runs; optionally with
another prompt template), the zero-shot base model, and the two cheap baselines of
:mod:`common.baselines` (nearest-neighbour retrieval, most frequent impression). All are scored
on the same reports, chosen exactly as ``fedmira evaluate`` chooses them, so the numbers line up.

* :func:`parse_system` turns ``NAME=PATH[:TEMPLATE]`` into a :class:`SystemSpec`, checking the
  adapter folder up front.
* :func:`compare_systems` (pure: no model, no files) scores aligned predictions and runs the
  paired tests of a reference system against every other system, per metric, with
  Holm-Bonferroni across the whole family (systems x metrics), and says plainly whether the best
  fine-tuned system beats retrieval.
* :func:`run_compare` does the whole job: split, baselines, generation (reusing cached
  predictions), scoring, and the written report (Markdown, JSON, plot, per-sample CSV). With
  ``input_path`` the held-out set is every report of a new hospital's file (all external) and
  the baselines' pool is that hospital's prior-report file (:func:`held_out_from_file`).

Only ids, system names and numbers reach the console and the report files; the generated
impressions go to ``predictions/<system>.jsonl`` and the prediction cache, and the held-out
reports to ``cases.jsonl`` (for ``fedmira reader-study create --compare``), which stay on the
researcher's machine with the reports they came from.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TextIO

from tqdm.auto import tqdm

from fedmira.common.adapters import ADAPTER_CONFIG
from fedmira.common.errors import FedmiraError
from fedmira.common.prompts import RAG_TEMPLATES, TEMPLATES
from fedmira.common.reports import Report, write_jsonl
from fedmira.common.tables import markdown_table

if TYPE_CHECKING:
    from fedmira.common.config import ExperimentConfig

ZERO_SHOT, RETRIEVAL, MOST_FREQUENT, ADAPTER = "zero_shot", "retrieval", "most_frequent", "adapter"
RETRIEVAL_SITE, RETRIEVAL_CONSENSUS = "retrieval_site", "retrieval_consensus"
BASELINE_KINDS = (RETRIEVAL, RETRIEVAL_SITE, RETRIEVAL_CONSENSUS, MOST_FREQUENT)
#: Retrieval baselines: the verdict is against the strongest of them.
RETRIEVAL_KINDS = (RETRIEVAL, RETRIEVAL_SITE, RETRIEVAL_CONSENSUS)
#: Words that mean "the base model without an adapter" in ``--system NAME=base``.
BASE_WORDS = ("base", "zero-shot", "zero_shot", "none")
FINAL_ADAPTER = "final_adapter"
#: Per-sample metrics that are tested pairwise, in table order, with their labels.
PAIRED_METRICS: dict[str, str] = {
    "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu4": "BLEU-4",
    "bertscore_f1": "BERTScore-F1", "sim": "Similarity", "clinical_f1": "Clinical F1",
}
ENCODER_ONLY = ("bertscore_f1", "sim")
#: Summary columns: the paired metrics plus the pooled clinical micro-F1.
SUMMARY_METRICS: dict[str, str] = {**PAIRED_METRICS, "clinical_micro_f1": "Clinical micro-F1"}
#: The metric that decides "best fine-tuned system" and the verdict against retrieval.
HEADLINE = "rougeL"
#: Columns of the one table of paired tests.
COMPARISON_COLUMNS: tuple[str, ...] = (
    "system", "metric", "reference mean", "system mean", "difference (ref - system) [95% CI]",
    "rank-biserial", "Wilcoxon p (Holm)", "randomization p (Holm)",
)
COMPARE_MD, COMPARE_JSON, COMPARE_PNG, PER_SAMPLE_CSV = (
    "compare.md", "compare.json", "compare.png", "per_sample.csv")
PREDICTIONS_DIR, CACHE_DIR = "predictions", "cache"
#: The held-out reports themselves (canonical JSONL), beside the predictions: stays on this machine.
CASES_FILE = "cases.jsonl"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


# ----------------------------------------------------------------------------- systems
@dataclass(frozen=True)
class SystemSpec:
    """One system to compare.

    Attributes
    ----------
    name : str
        Label in tables and file names.
    kind : str
        ``adapter``, ``zero_shot``, ``retrieval`` or ``most_frequent``.
    adapter : str or None
        PEFT adapter folder (``adapter`` only).
    template : str or None
        Prompt template for generation; None: the one recorded with the adapter's run, else
        ``data.template``.
    """

    name: str
    kind: str
    adapter: str | None = None
    template: str | None = None

    @property
    def generated(self) -> bool:
        """Whether the system runs the language model (and its predictions are cached)."""
        return self.kind in (ADAPTER, ZERO_SHOT)


def resolve_adapter(path: str | Path, name: str = "") -> Path:
    """Find the PEFT adapter folder meant by ``path``: the folder itself or ``path/final_adapter``.

    A ``fedmira train`` output folder (holding ``adapter/``) is accepted too.

    Raises
    ------
    FedmiraError
        When neither holds ``adapter_config.json``; the message names the path and what was
        expected there.
    """
    folder = Path(path).expanduser()
    label = f"--system {name}: " if name else ""
    if not folder.exists():
        raise FedmiraError(
            f"{label}{folder} does not exist. Expected a PEFT adapter folder (holding "
            f"{ADAPTER_CONFIG}) or a run folder holding {FINAL_ADAPTER}/ (from `fedmira simulate`).")
    for candidate in (folder, folder / FINAL_ADAPTER, folder / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise FedmiraError(
        f"{label}{folder} is not an adapter: neither {folder / ADAPTER_CONFIG} nor "
        f"{folder / FINAL_ADAPTER / ADAPTER_CONFIG} exists. Pass a PEFT adapter folder or a "
        "completed run folder (a run that stopped early has no final_adapter/; use its "
        "rounds/round_000N/ folder).")


def parse_system(text: str) -> SystemSpec:
    """``NAME=PATH``, ``NAME=PATH:TEMPLATE`` or ``NAME=base[:TEMPLATE]`` -> :class:`SystemSpec`.

    ``PATH`` is a PEFT adapter folder or a run folder (meaning ``RUN_DIR/final_adapter``);
    ``TEMPLATE`` (``plain`` or ``site_aware``) evaluates it with that prompt instead of the one
    it was trained with; ``base`` is the base model without adapter.

    Raises
    ------
    FedmiraError
        Malformed text, a reserved or invalid name, an unknown template or a missing adapter.
    """
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise FedmiraError(
            f"--system {text!r}: expected NAME=PATH, e.g. fedavg=outputs/iu_8sites/RUN_DIR (its "
            "final_adapter) or central=path/to/adapter:plain (with the plain prompt).")
    if not _NAME.match(name):
        raise FedmiraError(f"--system {text!r}: the name {name!r} may use letters, digits and _.+- "
                           "(it names output files), up to 64 characters.")
    if name in (ZERO_SHOT, *BASELINE_KINDS):
        raise FedmiraError(f"--system {text!r}: {name!r} is the built-in system of that name; "
                           "choose another name for yours.")
    path, template = rest.strip(), None
    head, colon, tail = path.rpartition(":")
    if colon and tail in TEMPLATES:
        path, template = head, tail
    elif colon and "/" not in tail and not Path(path).exists():
        raise FedmiraError(f"--system {text!r}: unknown prompt template {tail!r}; use one of "
                           f"{', '.join(TEMPLATES)} after the colon.")
    if path.lower() in BASE_WORDS:
        return SystemSpec(name, ZERO_SHOT, None, template)
    return SystemSpec(name, ADAPTER, str(resolve_adapter(path, name)), template)


def recorded_run_config(adapter: str | Path) -> dict[str, Any] | None:
    """Read the config recorded beside an adapter (``RUN_DIR/config.json``), if there is one."""
    for doc_path in (Path(adapter).parent / "config.json",):
        if doc_path.is_file():
            doc = json.loads(doc_path.read_text(encoding="utf-8"))
            return dict(doc.get("config", doc))
    return None


def system_template(spec: SystemSpec, cfg: ExperimentConfig) -> str:
    """Choose the prompt a system runs with: explicit, else its run's recorded one, else the config's."""
    if spec.template:
        return spec.template
    if spec.adapter:
        recorded = recorded_run_config(spec.adapter)
        if recorded and recorded.get("data", {}).get("template") in TEMPLATES:
            return str(recorded["data"]["template"])
    return str(cfg.data.template)


def check_base_model(spec: SystemSpec, cfg: ExperimentConfig) -> None:
    """Refuse an adapter trained on another base model than ``model.name_or_path``."""
    recorded = recorded_run_config(spec.adapter) if spec.adapter else None
    base = (recorded or {}).get("model", {}).get("name_or_path")
    if base and base != cfg.model.name_or_path:
        raise FedmiraError(
            f"--system {spec.name}: the adapter was trained on base model {base!r}, but "
            f"model.name_or_path is {cfg.model.name_or_path!r}. Pass model.name_or_path={base} "
            "(every compared adapter must share one base model).")


def training_overlap(spec: SystemSpec, cfg: ExperimentConfig, held_out: Sequence[Report], out: TextIO, *,
                     external_file: bool = False) -> int:
    """How many held-out reports the adapter was trained on, judged from its run's recorded split.

    An adapter trained under another split (another seed, site count or cap) may have seen the
    reports evaluated here; that would flatter it. When the recorded locked part equals ``cfg``'s
    the split is the same and nothing is recomputed. A recorded config that cannot be read
    (older schema) is reported and skipped. ``external_file``: the held-out reports come from
    another file (``--input``), so the split is always recomputed and a report counts as trained
    on when both its id and its findings match (ids alone may repeat across hospitals).
    """
    from fedmira.common.config import ExperimentConfig
    from fedmira.common.partition import load_pooled_reports, split_sites

    recorded = recorded_run_config(spec.adapter) if spec.adapter else None
    if not recorded:
        return 0
    try:
        theirs = ExperimentConfig.from_dict(recorded)
    except FedmiraError:
        print(f"  {spec.name}: its run's config.json could not be read; its training split is not checked",
              file=out)
        return 0
    if not external_file and theirs.lock_hash() == cfg.lock_hash():
        return 0
    splits = split_sites(theirs, load_pooled_reports(theirs, io.StringIO()))
    if external_file:
        seen = {(r.report_id, r.findings) for s in splits if not s.external for r in s.train}
        return sum((r.report_id, r.findings) in seen for r in held_out)
    trained = {r.report_id for s in splits if not s.external for r in s.train}
    return len(trained & {r.report_id for r in held_out})


def default_systems(adapters: Sequence[SystemSpec], *, zero_shot: bool = True,
                    baselines: bool = True) -> list[SystemSpec]:
    """Adapters in the given order, then the zero-shot base model and the two baselines."""
    names = [s.name for s in adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FedmiraError(f"--system names must differ; {', '.join(dupes)} is given twice.")
    out = list(adapters)
    if zero_shot:
        out.append(SystemSpec(ZERO_SHOT, ZERO_SHOT))
    if baselines:
        out += [SystemSpec(k, k) for k in BASELINE_KINDS]
    return out


def default_reference(systems: Sequence[SystemSpec]) -> str:
    """Pick the reference: the first adapter, else the zero-shot model, else the first system."""
    for kind in (ADAPTER, ZERO_SHOT):
        for s in systems:
            if s.kind == kind:
                return s.name
    return systems[0].name


# ----------------------------------------------------------------------------- prediction cache
def adapter_fingerprint(folder: str | Path) -> str:
    """SHA-256 of an adapter folder's weights and config (what decides its outputs)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and (path.suffix in (".safetensors", ".bin") or path.name == ADAPTER_CONFIG):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def reports_fingerprint(reports: Sequence[Report]) -> str:
    """Hash of the ids and of every field a prompt is built from (no text is stored)."""
    digest = hashlib.sha256()
    for r in reports:
        for part in (r.report_id, r.site_id, r.modality, r.body_part, r.exam, r.findings):
            digest.update(str(part).encode("utf-8"))
            digest.update(b"\x1f")
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]


def cache_key(cfg: ExperimentConfig, spec: SystemSpec, template: str,
              reports: Sequence[Report]) -> dict[str, Any]:
    """Return what decides a generated prediction: base model, adapter bytes, prompt, decoding, reports."""
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "cache_dir"}
    return {
        "model": model, "adapter": adapter_fingerprint(spec.adapter) if spec.adapter else None,
        "template": template, "max_length": cfg.data.max_length,
        **_rag_key(cfg, template),
        "generate": dataclasses.asdict(cfg.generate), "reports": reports_fingerprint(reports),
        "n_reports": len(reports),
    }


def _rag_key(cfg: ExperimentConfig, template: str) -> dict[str, Any]:
    """Return what else decides a retrieval-augmented prompt, as cache-key entries.

    Other templates get none (but a non-default preamble), so older cache entries stay valid.
    """
    if template not in RAG_TEMPLATES:
        return {} if cfg.data.preamble == "full" else {"preamble": cfg.data.preamble}
    d = cfg.data
    key = {"neighbors": d.neighbors, "retriever": d.retriever, "neighbor_tokens": d.neighbor_tokens,
           "preamble": d.preamble}
    if d.neighbor_order != "similarity":  # older cache entries (similarity order) stay valid
        key |= {"neighbor_order": d.neighbor_order, "neighbor_pool": d.neighbor_pool}
    return key


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def load_cached(cache_dir: Path, key: dict[str, Any], reports: Sequence[Report]) -> list[str] | None:
    """Load the cached predictions for exactly these reports under this key, or None."""
    path = cache_dir / f"{_key_hash(key)}.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a damaged cache entry is regenerated, never trusted
    preds = doc.get("predictions", {})
    if doc.get("key") != key or set(preds) != {r.report_id for r in reports}:
        return None
    return [str(preds[r.report_id]) for r in reports]


def store_cached(cache_dir: Path, key: dict[str, Any], reports: Sequence[Report],
                 hyps: Sequence[str]) -> Path:
    """Write predictions atomically (a killed run leaves no half-written entry)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{_key_hash(key)}.json"
    doc = {"key": key, "predictions": {r.report_id: h for r, h in zip(reports, hyps)}}
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(doc, handle)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- scoring and tests
def _paired_metrics(use_encoder: bool) -> list[str]:
    return [m for m in PAIRED_METRICS if use_encoder or m not in ENCODER_ONLY]


def compare_systems(
    reports: Sequence[Report], predictions: Mapping[str, Sequence[str]], *, kinds: Mapping[str, str],
    reference: str, use_encoder: bool = True, n_resamples: int = 1000,
    n_permutations: int = 10000, alpha: float = 0.05, seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every system and test the reference against each other one, per metric.

    Parameters
    ----------
    reports : sequence of Report
        The held-out reports (their impression is the reference text).
    predictions : dict
        System name -> impressions aligned with ``reports`` (table order = dict order).
    kinds : dict
        System name -> kind (``adapter``, ``zero_shot``, ``retrieval``, ``most_frequent``).
    reference : str
        The system tested against every other one.
    use_encoder : bool
        Compute BERTScore-F1 and similarity (False: left out of summaries and tests).
    n_resamples, n_permutations, seed : int
        Bootstrap resamples, randomization draws, and their seed.
    alpha : float
        Family-wise error rate of the Holm-Bonferroni adjustment.

    Returns
    -------
    dict
        ``systems`` (name -> kind, summary with CIs, corpus counts), ``comparisons`` (one row per
        other system x metric), ``family`` (size, alpha, tests), ``verdict`` and ``per_sample``
        (system -> rows of ids and scores, no text).
    """
    from fedmira.common.metrics import score_pairs, summarize_scores

    if reference not in predictions:
        raise FedmiraError(f"--reference {reference!r} is not among the systems "
                           f"({', '.join(predictions)}).")
    for name, hyps in predictions.items():
        if len(hyps) != len(reports):
            raise ValueError(f"system {name}: {len(hyps)} predictions for {len(reports)} reports")
    refs, parts = [r.impression for r in reports], [r.body_part for r in reports]
    metrics = _paired_metrics(use_encoder)
    rows = {name: score_pairs(refs, list(hyps), body_parts=parts, use_encoder=use_encoder)
            for name, hyps in tqdm(predictions.items(), desc="score", unit="system", disable=not progress)}
    summary_metrics = [m for m in SUMMARY_METRICS if m in metrics or m == "clinical_micro_f1"]
    systems: dict[str, dict[str, Any]] = {name: {"kind": kinds[name],
                      "summary": summarize_scores(rows[name], metrics, n_resamples=n_resamples, seed=seed)}
               for name in predictions}
    for info in systems.values():
        info["summary"] = {m: info["summary"][m] for m in summary_metrics if m in info["summary"]}
    comparisons = paired_family(rows, reference, metrics, alpha=alpha, n_resamples=n_resamples,
                                n_permutations=n_permutations, seed=seed, progress=progress)
    ids = [{"report_id": r.report_id, "site_id": r.site_id} for r in reports]
    return {
        "n": len(reports), "metrics": metrics, "summary_metrics": summary_metrics,
        "reference": reference, "systems": systems, "comparisons": comparisons,
        "family": {"size": len(comparisons), "alpha": alpha, "tests": ["wilcoxon", "randomization"],
                   "adjustment": "Holm-Bonferroni over (systems other than the reference) x metrics, "
                                 "separately for each test"},
        "bootstrap": {"n_resamples": n_resamples, "n_permutations": n_permutations, "seed": seed},
        "verdict": verdict_against_retrieval(rows, kinds, n_resamples=n_resamples, seed=seed),
        "per_sample": {name: [{**i, **{m: s.get(m) for m in metrics}} for i, s in zip(ids, r)]
                       for name, r in rows.items()},
    }


def paired_family(rows: dict[str, list[dict[str, Any]]], reference: str, metrics: Sequence[str], *,
                  alpha: float = 0.05, n_resamples: int = 1000, n_permutations: int = 10000,
                  seed: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """Test the reference against every other system per metric; Holm over the whole family.

    Each row: ``system``, ``metric``, ``reference_mean``, ``system_mean``, ``mean_diff`` (with
    ``lo``/``hi``; reference minus system), ``rank_biserial`` (positive: the reference tends
    to score higher), ``wilcoxon`` and ``randomization`` (each with ``p_value``, ``p_holm`` and
    ``reject``).
    """
    from fedmira.common.stats import (
        holm_bonferroni,
        mean_difference_ci,
        paired_randomization_test,
        wilcoxon_test,
    )

    pairs = [(name, m) for name in rows if name != reference for m in metrics]
    out: list[dict[str, Any]] = []
    for name, metric in tqdm(pairs, desc="paired tests", unit="test", disable=not progress):
        a = [r.get(metric) for r in rows[reference]]
        b = [r.get(metric) for r in rows[name]]
        wil = wilcoxon_test(a, b)
        out.append({
            "system": name, "metric": metric, "reference": reference,
            "reference_mean": _mean(a), "system_mean": _mean(b),
            "mean_diff": mean_difference_ci(a, b, n_resamples=n_resamples, seed=seed),
            "rank_biserial": wil["rank_biserial"], "wilcoxon": dict(wil),
            "randomization": dict(paired_randomization_test(a, b, n_resamples=n_permutations, seed=seed)),
        })
    for test in ("wilcoxon", "randomization"):
        holm = holm_bonferroni([row[test]["p_value"] for row in out], alpha)
        for row, adj, rej in zip(out, holm["adjusted"], holm["reject"]):
            row[test].update(p_holm=adj, reject=rej)
    return out


def _mean(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def verdict_against_retrieval(rows: dict[str, list[dict[str, Any]]], kinds: Mapping[str, str], *,
                              n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Whether the best fine-tuned system (highest mean ROUGE-L) beats retrieval, in one sentence."""
    from fedmira.common.stats import mean_difference_ci

    adapters = [n for n in rows if kinds.get(n) == ADAPTER]
    retrievals = [n for n in rows if kinds.get(n) in RETRIEVAL_KINDS]
    # The bar is the strongest retrieval baseline (pooled or within the site), by mean ROUGE-L.
    retrieval = max(retrievals, key=lambda n: (_mean([r.get(HEADLINE) for r in rows[n]]) or 0.0,
                                               -retrievals.index(n))) if retrievals else None
    if retrieval is None:
        return {"beats_retrieval": None, "best": None,
                "sentence": "Retrieval was not compared (--no-baselines), so this report cannot say "
                            "whether fine-tuning is worth deploying."}
    means = {n: _mean([r.get(HEADLINE) for r in rows[n]]) or 0.0 for n in [*adapters, retrieval]}
    if not adapters:
        return {"beats_retrieval": None, "best": None, "retrieval": retrieval,
                "retrieval_mean": means[retrieval],
                "sentence": "No fine-tuned system was compared (give one with --system NAME=PATH); "
                            f"`{retrieval}` scores ROUGE-L {means[retrieval]:.3f}, the bar to beat."}
    best = max(adapters, key=lambda n: (means[n], -adapters.index(n)))
    diff = mean_difference_ci([r.get(HEADLINE) for r in rows[best]],
                              [r.get(HEADLINE) for r in rows[retrieval]], n_resamples=n_resamples, seed=seed)
    return retrieval_verdict(best, means[best], means[retrieval], diff.get("lo"), diff.get("hi"),
                             baseline=retrieval)


def retrieval_verdict(best: str, best_mean: float, retrieval_mean: float, diff_lo: float | None,
                      diff_hi: float | None, metric: str = PAIRED_METRICS[HEADLINE],
                      baseline: str | None = None) -> dict[str, Any]:
    """Phrase the plain sentence: beats retrieval only with a higher mean and a difference CI above 0.

    ``baseline`` names the retrieval system measured against (there are three), so a reader
    knows which bar the numbers are.

    Returns
    -------
    dict
        ``beats_retrieval`` (bool), ``best``, ``best_mean``, ``retrieval``, ``retrieval_mean``,
        ``diff_ci`` and ``sentence``.
    """
    ci = ("" if diff_lo is None or diff_hi is None
          else f"95% CI of the difference [{diff_lo:+.3f}, {diff_hi:+.3f}]")
    nums = f"{best_mean:.3f} vs {retrieval_mean:.3f}" + (f" for `{baseline}`" if baseline else "")
    if best_mean > retrieval_mean and diff_lo is not None and diff_lo > 0:
        beats, sentence = True, (f"The fine-tuned model `{best}` beats retrieval on {metric} "
                                 f"({nums}; {ci}).")
    elif best_mean > retrieval_mean:
        beats, sentence = False, (f"The fine-tuned model `{best}` does NOT clearly beat retrieval on "
                                  f"{metric} ({nums}; {ci or 'no interval'} includes 0): not worth "
                                  "deploying as is.")
    else:
        beats, sentence = False, (f"The fine-tuned model `{best}` does NOT beat retrieval on {metric} "
                                  f"({nums}): not worth deploying as is.")
    return {"beats_retrieval": beats, "best": best, "best_mean": best_mean, "retrieval": baseline,
            "retrieval_mean": retrieval_mean, "diff_ci": [diff_lo, diff_hi], "sentence": sentence}


# ----------------------------------------------------------------------------- writing
def _num(v: float | None, fmt: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _ci(s: dict[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.3f} [{_num(s.get('lo'))}, {_num(s.get('hi'))}]"


def _p(v: float | None) -> str:
    if v is None:
        return "n/a"
    return "<0.001" if v < 0.001 else f"{v:.3f}"


def summary_table(result: dict[str, Any]) -> list[str]:
    """Systems x metrics, mean [95% bootstrap CI]."""
    metrics = result["summary_metrics"]
    head = ["system", "kind"] + [SUMMARY_METRICS[m] for m in metrics]
    rows = [[name, info["kind"], *(_ci(info["summary"].get(m)) for m in metrics)]
            for name, info in result["systems"].items()]
    return markdown_table(head, rows).splitlines()


def comparison_table(result: dict[str, Any]) -> list[str]:
    """Render the one table of paired tests with Holm-adjusted p-values (``*``: rejected at alpha)."""
    rows = []
    for row in result["comparisons"]:
        d = row["mean_diff"]

        def star(test: str, row: dict[str, Any] = row) -> str:
            return "*" if row[test]["reject"] else ""

        rows.append([
            row["system"], PAIRED_METRICS[row["metric"]], _num(row["reference_mean"]),
            _num(row["system_mean"]),
            f"{_num(d['mean_diff'], '+.3f')} [{_num(d['lo'], '+.3f')}, {_num(d['hi'], '+.3f')}]",
            _num(row["rank_biserial"], "+.2f"), _p(row["wilcoxon"]["p_holm"]) + star("wilcoxon"),
            _p(row["randomization"]["p_holm"]) + star("randomization"),
        ])
    return markdown_table(COMPARISON_COLUMNS, rows).splitlines()


def compare_markdown(result: dict[str, Any]) -> str:
    """Render the comparison as Markdown: verdict, systems, one table of paired tests, notes."""
    meta, fam, boot = result.get("meta", {}), result["family"], result["bootstrap"]
    lines = ["# System comparison", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))]
    from_file = "input" in meta
    held_out = ("every report of the --input file, all external" if from_file
                else "the same held-out set as `fedmira evaluate`")
    lines += [f"- reports: {result['n']} ({held_out})",
              f"- reference system: `{result['reference']}`", ""]
    lines += ["## Verdict", "", result["verdict"]["sentence"], ""]
    lines += ["## Systems (mean [95% bootstrap CI])", ""] + summary_table(result)
    lines += ["", f"## Paired tests: `{result['reference']}` vs each system", ""]
    lines += comparison_table(result)
    lines += ["", f"Family: {fam['size']} comparisons ({len(result['systems']) - 1} systems x "
              f"{len(result['metrics'])} metrics), Holm-Bonferroni at alpha {fam['alpha']} within each "
              "test; `*` marks a rejected null hypothesis. Difference and rank-biserial are positive "
              f"when the reference scores higher. Wilcoxon signed-rank (zero differences dropped); "
              f"paired approximate randomization with {boot['n_permutations']} sign flips; "
              f"bootstrap {boot['n_resamples']} resamples, seed {boot['seed']}.", ""]
    pool = ("the --prior file's reports (the hospital's own archive), never a scored report" if from_file
            else "the train splits of the internal sites")
    lines += ["## Notes", "",
              "- retrieval: the impression of the training report whose findings are most similar "
              "(TF-IDF cosine); retrieval_site: the same within the report's own site; retrieval_consensus: "
              "of the site's 8 most similar reports, the impression the others agree with most "
              "(similarity-weighted ROUGE-L); most_frequent: "
              f"the most frequent training impression. They see only {pool}.",
              "- Clinical F1 is per report (1 when neither text mentions an observation); clinical "
              "micro-F1 pools the counts over reports.",
              "- BERTScore-F1 and similarity use all-MiniLM-L6-v2 and are blind to negation.", ""]
    return "\n".join(lines)


def plot_compare(result: dict[str, Any], path: Path) -> Path:
    """Plot grouped bars: one group per metric, one bar per system, 95% bootstrap CIs as errors."""
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="fedmira-mpl-"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, names = result["summary_metrics"], list(result["systems"])
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(metrics) * max(1, len(names)) * 0.35 + 3), 4.2))
    for j, name in enumerate(names):
        summ = result["systems"][name]["summary"]
        means, lows, highs = [], [], []
        for m in metrics:
            s = summ.get(m) or {}
            mean = s.get("mean")
            means.append(math.nan if mean is None else mean)
            lows.append(0.0 if mean is None or s.get("lo") is None else max(0.0, mean - s["lo"]))
            highs.append(0.0 if mean is None or s.get("hi") is None else max(0.0, s["hi"] - mean))
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, means, width=width, yerr=[lows, highs], capsize=2, label=name)
    ax.set_xticks(range(len(metrics)), [SUMMARY_METRICS[m] for m in metrics], rotation=20, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (0..1)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Systems on {result['n']} held-out reports (mean, 95% bootstrap CI)")
    ax.legend(fontsize=7, ncol=min(4, len(names)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_compare(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``compare.md``, ``compare.json`` (no per-sample rows), ``compare.png``, ``per_sample.csv``."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": root / COMPARE_MD, "json": root / COMPARE_JSON, "plot": root / COMPARE_PNG,
             "per_sample": root / PER_SAMPLE_CSV}
    summary = {k: v for k, v in result.items() if k not in ("per_sample", "paths")}
    from fedmira.common.evaluation import json_safe  # one NaN -> null rule for every JSON report

    paths["json"].write_text(json.dumps(json_safe(summary), indent=2), encoding="utf-8")
    paths["markdown"].write_text(compare_markdown(result), encoding="utf-8")
    plot_compare(result, paths["plot"])
    columns = ["system", "report_id", "site_id", *result["metrics"]]
    with paths["per_sample"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for name, rows in result["per_sample"].items():
            for row in rows:
                writer.writerow({"system": name, **{k: ("" if v is None else v) for k, v in row.items()}})
    return paths


# ----------------------------------------------------------------------------- the whole job
def held_out_and_pool(cfg: ExperimentConfig, limit: int,
                      out: TextIO) -> tuple[list[Report], set[str], list[Report]]:
    """Select the evaluation reports (as ``fedmira evaluate`` does) and the baselines' training pool.

    Raises
    ------
    FedmiraError
        No reports to evaluate, or an evaluated report that is also in the pool (a leak).
    """
    from fedmira.common.baselines import training_pool
    from fedmira.common.evaluation import select_reports
    from fedmira.common.partition import load_pooled_reports, split_sites

    splits = split_sites(cfg, load_pooled_reports(cfg, out))
    reports, external = select_reports(splits, split="test", limit=limit, seed=cfg.partition.seed)
    pool = training_pool(splits)
    if not reports or not pool:
        raise FedmiraError("No held-out reports or no training reports under this partition; check "
                           "data.path and the partition.* settings (`fedmira partition` shows the split).")
    leaked = {r.report_id for r in reports} & {r.report_id for r in pool}
    if leaked:
        raise FedmiraError(f"{len(leaked)} evaluated report ids are also training reports "
                           f"(e.g. {sorted(leaked)[0]}); the report ids in data.path must be unique.")
    return reports, external, pool


def held_out_from_file(cfg: ExperimentConfig, systems: Sequence[SystemSpec], input_path: str,
                       prior_path: str | None,
                       out: TextIO) -> tuple[list[Report], set[str], list[Report], dict[str, Any]]:
    """Load a new hospital's file as the held-out set and its prior reports as the training pool.

    Every report of the file is held out (all external); the prior-report file is the
    baselines' training pool and retrieval index (see :func:`common.evaluation.load_file_set`).
    Also returns what the report records about the files.

    Raises
    ------
    FedmiraError
        Bad files (file:line of the first problem), prior reports of other sites, or baselines
        asked for without a pool to learn from.
    """
    from fedmira.common.evaluation import load_file_set

    baselines = [s.name for s in systems if s.kind in BASELINE_KINDS]
    if baselines and not prior_path:
        raise FedmiraError(
            f"The baselines ({', '.join(baselines)}) learn from a training pool; with --input FILE that "
            "pool is the hospital's own earlier reports: pass --prior FILE (its prior reports, same "
            "site_id), or leave the baselines out with --no-baselines.")
    files = load_file_set(input_path, prior_path, cfg.data, out)
    if baselines and not files.prior:
        raise FedmiraError(
            f"--prior {prior_path} has no report left once the reports scored from --input are "
            f"excluded, so the baselines ({', '.join(baselines)}) have nothing to learn from: pass the "
            "hospital's earlier reports as --prior, or --no-baselines.")
    return files.reports, files.sites, files.prior, files.meta()


def predict_system(spec: SystemSpec, cfg: ExperimentConfig, reports: list[Report], pool: list[Report], *,
                   cache_dir: Path | None, progress: bool = True,
                   generate_fn: Callable[..., list[str]] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Predictions of one system and how they were obtained (``source``: computed/cache, seconds)."""
    from fedmira.common.baselines import BASELINES

    t0 = time.perf_counter()
    if spec.kind in BASELINE_KINDS:
        hyps = BASELINES[spec.kind](pool, reports)
        return hyps, {"source": "computed", "seconds": round(time.perf_counter() - t0, 2)}
    if generate_fn is None:
        from fedmira.common.inference import generate_impressions

        generate_fn = generate_impressions
    template = system_template(spec, cfg)
    key = cache_key(cfg, spec, template, reports)
    if template in RAG_TEMPLATES:  # the prompts also depend on the index they retrieve from
        key["prior"] = reports_fingerprint(pool)
    cached = load_cached(cache_dir, key, reports) if cache_dir else None
    info: dict[str, Any] = {"template": template, "adapter": spec.adapter, "cache_key": _key_hash(key)}
    if cached is not None:
        return cached, {**info, "source": "cache", "seconds": round(time.perf_counter() - t0, 2)}
    run_cfg = cfg.replace(data=dataclasses.replace(cfg.data, template=template))
    hyps = generate_fn(run_cfg, reports, spec.adapter, progress=progress, prior=pool)
    if cache_dir:
        store_cached(cache_dir, key, reports, hyps)
    return hyps, {**info, "source": "generated", "seconds": round(time.perf_counter() - t0, 2)}


def run_compare(cfg: ExperimentConfig, systems: Sequence[SystemSpec], *, reference: str | None = None,
                limit: int = 200, out_dir: str | Path, cache_dir: str | Path | None = None,
                use_encoder: bool = True, n_resamples: int = 1000, n_permutations: int = 10000,
                progress: bool = True, out: TextIO | None = None, input_path: str | None = None,
                prior_path: str | None = None) -> dict[str, Any]:
    """Predict with every system on the held-out reports, compare them and write the report.

    Parameters
    ----------
    cfg : ExperimentConfig
        ``data``/``partition`` choose the reports (as ``fedmira evaluate``); ``model`` and
        ``generate`` the base model and decoding.
    systems : sequence of SystemSpec
        In table order (see :func:`default_systems`).
    reference : str, optional
        System tested against all others (default :func:`default_reference`).
    limit : int
        Held-out reports (0: all), chosen as ``fedmira evaluate --limit`` chooses them.
    out_dir : str or Path
        Report folder.
    cache_dir : str or Path, optional
        Prediction cache (default ``<run.out_dir>/compare/cache``).
    input_path, prior_path : str, optional
        Score every report of this file instead (all external; ``limit``, ``data.path`` and
        ``partition`` unused); the prior file is the baselines' pool and the retrieval index.
        Baselines without a prior file are refused (:func:`held_out_from_file`).

    Returns
    -------
    dict
        :func:`compare_systems`' result with ``meta``, ``predictions_info`` and ``paths``.
    """
    stream = sys.stdout if out is None else out
    if not systems:
        raise FedmiraError("Nothing to compare: give --system NAME=PATH or keep the built-in systems.")
    for spec in systems:
        check_base_model(spec, cfg)
    reference = reference or default_reference(systems)
    if reference not in {s.name for s in systems}:
        raise FedmiraError(f"--reference {reference!r} is not among the systems "
                           f"({', '.join(s.name for s in systems)}).")
    cache = Path(cache_dir) if cache_dir else Path(cfg.run.out_dir) / "compare" / CACHE_DIR
    root = Path(out_dir)
    file_meta: dict[str, Any] = {}
    if input_path:
        from fedmira.common.evaluation import retrieval_note

        reports, external, pool, file_meta = held_out_from_file(cfg, systems, input_path, prior_path,
                                                                stream)
        learn = (f"baselines learn from {len(pool)} prior reports of {prior_path}" if prior_path
                 else "no --prior file, no baselines")
        print(f"comparing {len(systems)} systems on every report of {input_path}: {len(reports)} reports "
              f"from {len(external)} sites (all external); {learn}", file=stream)
        print(retrieval_note(reports, pool, "prior file"), file=stream)
    else:
        reports, external, pool = held_out_and_pool(cfg, limit, stream)
        print(f"comparing {len(systems)} systems on {len(reports)} held-out reports from "
              f"{len({r.site_id for r in reports})} sites ({len(external)} external); "
              f"baselines learn from {len(pool)} training reports", file=stream)
    for spec in systems:
        overlap = training_overlap(spec, cfg, reports, stream, external_file=bool(input_path))
        if overlap and input_path:
            raise FedmiraError(
                f"--system {spec.name} was trained on {overlap} of the {len(reports)} reports of "
                f"{input_path} (same report id and findings as in its run's training split), so they are "
                "not held out for it: remove those reports from the --input file or compare another adapter.")
        if overlap:
            raise FedmiraError(
                f"--system {spec.name} was trained on {overlap} of the {len(reports)} held-out reports "
                "(its run split the data differently; see "
                f"{Path(str(spec.adapter)).parent / 'config.json'}). "
                "Compare it under its own split: pass the same data.* and partition.* overrides.")
    preds: dict[str, list[str]] = {}
    info: dict[str, dict[str, Any]] = {}
    for spec in systems:
        preds[spec.name], info[spec.name] = predict_system(spec, cfg, reports, pool, cache_dir=cache,
                                                           progress=progress)
        print(f"  {spec.name}: {info[spec.name]['source']} in {info[spec.name]['seconds']} s", file=stream)
    _write_predictions(root / PREDICTIONS_DIR, reports, preds)
    write_jsonl(reports, root / CASES_FILE)  # findings for `fedmira reader-study create --compare`
    t0 = time.perf_counter()
    result = compare_systems(reports, preds, kinds={s.name: s.kind for s in systems}, reference=reference,
                             use_encoder=use_encoder, n_resamples=n_resamples,
                             n_permutations=n_permutations, seed=cfg.partition.seed, progress=progress)
    result["predictions_info"] = info
    result["meta"] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "model": cfg.model.name_or_path,
        "data": cfg.data.path or "synthetic", "partition": cfg.partition.method, "limit": limit,
        "external_sites": len(external), "training_pool": len(pool), "lock_hash": cfg.lock_hash(),
        "max_new_tokens": cfg.generate.max_new_tokens, "encoder_metrics": use_encoder,
        "score_s": round(time.perf_counter() - t0, 1),
    }
    if input_path:  # no split of data.path: record the files instead
        for key in ("data", "partition", "limit"):
            result["meta"].pop(key)
        result["meta"] = {**file_meta, **result["meta"]}
    result["paths"] = {k: str(v) for k, v in write_compare(result, root).items()}
    result["paths"]["predictions"] = str(root / PREDICTIONS_DIR)
    return result


def _write_predictions(folder: Path, reports: Sequence[Report], preds: dict[str, list[str]]) -> None:
    """One JSONL per system (the researcher's own model output; stays on this machine)."""
    from fedmira.common.inference import write_impressions

    folder.mkdir(parents=True, exist_ok=True)
    for name, hyps in preds.items():
        with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            write_impressions(list(reports), list(hyps), handle)


def print_compare(result: dict[str, Any], stream: TextIO) -> None:
    """Numbers only: per system the headline metrics, then the verdict and the paths."""
    shown = [m for m in ("rougeL", "bertscore_f1", "sim", "clinical_f1") if m in result["summary_metrics"]]
    width = max([16, *map(len, result["systems"])])
    for name, sys_info in result["systems"].items():
        parts = [f"{PAIRED_METRICS[m]} {_ci(sys_info['summary'].get(m))}" for m in shown]
        print(f"{name:<{width}} " + "; ".join(parts), file=stream)
    n_rej = sum(row["wilcoxon"]["reject"] for row in result["comparisons"])
    print(f"{n_rej} of {result['family']['size']} paired Wilcoxon tests against "
          f"`{result['reference']}` reject after Holm-Bonferroni.", file=stream)
    print(result["verdict"]["sentence"], file=stream)
    for key, path in result.get("paths", {}).items():
        print(f"  {key:<11} {path}", file=stream)


def final_quality(cfg: ExperimentConfig, adapter: str | Path, out_dir: str | Path,
                  stream: TextIO) -> dict[str, Any]:
    """Compare a finished run's adapter with the baselines on ``eval.final_reports`` held-out reports.

    The same held-out reports, baselines, paired tests and files as ``fedmira compare`` (written
    to ``out_dir``), without the zero-shot model; prints one line per system (ROUGE-L and, with
    ``eval.final_encoder``, BERTScore and similarity, with 95% CIs) and the verdict.
    """
    import io

    systems = default_systems([SystemSpec("global_adapter", ADAPTER, str(adapter), cfg.data.template)],
                              zero_shot=False)
    result = run_compare(cfg, systems, reference="global_adapter", limit=cfg.eval.final_reports,
                         out_dir=out_dir, cache_dir=Path(out_dir) / CACHE_DIR,
                         use_encoder=cfg.eval.final_encoder, n_permutations=2000, progress=False,
                         out=io.StringIO())
    shown = [m for m in ("rougeL", "bertscore_f1", "sim") if m in result["summary_metrics"]]
    print(f"\nQuality on {result['n']} held-out reports (mean [95% CI]; `fedmira compare` for more):",
          file=stream)
    width = max([16, *map(len, result["systems"])])
    for name, info in result["systems"].items():
        parts = [f"{PAIRED_METRICS[m]} {_ci(info['summary'].get(m))}" for m in shown]
        print(f"  {name:<{width}} " + "; ".join(parts), file=stream)
    print(f"  {result['verdict']['sentence']}\n  report: {result['paths']['markdown']}", file=stream)
    return result
