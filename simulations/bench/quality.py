"""Quality on real reports, as the study compares systems.

Is the model worth deploying, and is federated training as good as pooled training at the same
cost?

On the IU chest X-ray reports split into pseudo-hospitals by reporting template (the ``template``
partition: the largest templates become sites, the rest ``template_other``), every trained
system gets the same budget of **training tokens**: ``--epochs`` passes over its training data
(batch ``--batch-size``, one warm-up + cosine learning-rate schedule over the whole run):

* federated (``--strategies``, default FedAvg and FedAdam): ``--rounds`` rounds, each site
  training ``epochs / rounds`` local epochs per round on its own reports, with prompts that
  retrieve from its own index (``--prompt``, default ``site_aware_rag``);
* pooled (centralized): ``epochs`` passes over all sites' training reports, for the main prompt
  and for each prompt of the ablation (``--ablation``, default ``site_aware,plain``: the study's
  prompting ablation, tested pairwise against the main prompt);
* local-only (``--local-sites``, default the largest and the smallest site): ``epochs`` passes
  over that site's reports alone, exactly what it spends in the federation.

The tokens each system actually processed are measured and reported beside its scores. Then
``fedmira compare`` scores them with the zero-shot base model and three baselines (TF-IDF
retrieval over all sites, retrieval within the report's own site, the most frequent impression)
on ``--reports`` held-out reports (the test splits, as ``fedmira evaluate`` picks them), with
Holm-adjusted paired tests. A quality-vs-budget curve (ROUGE-L on ``--curve-reports`` of them
after every 1/rounds of the budget, federated and pooled) shows where more training stops
paying. Results go to ``results/quality-<date>.{json,md}`` and ``quality-<date>-budget.png``
(numbers only)::

    make bench-quality                                                 # see the README for times
    python -m fedmira.simulations.bench.quality --epochs 0.25 --strategies fedavg --ablation ""   # quicker

It runs long, so it resumes: everything lives in ``--work/<settings hash>/`` (adapters, run
folders, prediction cache, ``state.json``); a rerun with the same settings skips trained
systems, resumes an interrupted federated run after its last committed round and takes
predictions from the cache. Report text never leaves the work folder (predictions there are the
model's output on this machine); results hold numbers only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from fedmira.common.errors import FedmiraError
from fedmira.common.tables import markdown_table

if TYPE_CHECKING:
    from fedmira.common.config import ExperimentConfig

DEFAULT_DATA = "../shared/data/iu_xray/indiana_reports.csv"
RESULTS_DIR, WORK_DIR = "results", "outputs/bench-quality"
CENTRAL, FEDERATED_PREFIX, LOCAL_PREFIX = "centralized", "fed_", "local_"
#: Metrics in the results table (per-sample means, clinical micro-F1 pooled), with labels.
TABLE_METRICS: dict[str, str] = {
    "rougeL": "ROUGE-L", "bertscore_f1": "BERTScore-F1", "sim": "Similarity",
    "clinical_f1": "Clinical F1", "clinical_micro_f1": "Clinical micro-F1",
}
#: Where a federated system must beat the strongest retrieval baseline (the issue's bar).
BEAT_METRICS = ("rougeL", "bertscore_f1", "sim")
RATIO_TARGET, ALPHA = 0.95, 0.05


#: Budget fields that choose which systems run and how many reports are scored, not how any
#: system trains: left out of the work folder's key.
SELECTION_FIELDS = ("ablation", "strategies", "local_sites", "reports", "curve_reports", "zero_shot",
                    "encoder")


@dataclass(frozen=True)
class Budget:
    """The shared token budget, prompts and evaluation size (all of it goes into the work folder's hash)."""

    data: str = DEFAULT_DATA
    template_sites: int = 3
    prompt: str = "site_aware_rag"
    ablation: tuple[str, ...] = ("site_aware", "plain")
    neighbors: int = 2
    epochs: float = 0.5
    rounds: int = 4
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 10
    strategies: tuple[str, ...] = ("fedavg", "fedadam")
    server_lr: float = 1.0
    local_sites: tuple[str, ...] = ()
    reports: int = 300
    curve_reports: int = 100
    max_length: int = 384
    max_new_tokens: int = 48
    model: str = "embedded:smollm2-135m"
    encoder: bool = True
    zero_shot: bool = True

    def overrides(self, prompt: str | None = None) -> list[str]:
        """Hydra overrides every system shares: data, split, prompt, batches, schedule, decoding."""
        return [
            "data=iu_xray", f"data.path={self.data}", "partition=template",
            f"partition.num_sites={self.template_sites}", f"model.name_or_path={self.model}",
            f"data.template={prompt or self.prompt}", f"data.neighbors={self.neighbors}",
            "data.preamble=short", f"data.max_length={self.max_length}",
            f"train.batch_size={self.batch_size}", "train.grad_accum=1", f"train.lr={self.lr}",
            f"train.warmup_steps={self.warmup_steps}", "train.schedule=cosine",
            f"generate.max_new_tokens={self.max_new_tokens}", "generate.batch_size=16",
            "eval.every=0", "eval.max_loss_samples=8", "eval.rouge_samples=0",
            "eval.final_reports=0",  # the bench scores every system itself, on all held-out reports
        ]

    def key(self) -> str:
        """Short hash naming the work folder (the data file's size and mtime included).

        Only settings that change what a system trains or predicts go in: which systems run
        (ablation, strategies, local sites) and how many reports are scored do not, so adding
        a strategy or scoring more reports reuses every adapter already trained (systems are
        recorded by name; predictions are cached per system and report).
        """
        from fedmira.common.config import stable_hash

        path = Path(self.data)
        stamp = [path.stat().st_size, int(path.stat().st_mtime)] if path.is_file() else None
        chosen = {k: v for k, v in dataclasses.asdict(self).items() if k not in SELECTION_FIELDS}
        return stable_hash([chosen, stamp])[:10]


def steps_for(epochs: float, reports: int, batch_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``reports`` (at least one)."""
    return max(1, math.ceil(epochs * reports / batch_size))


# ----------------------------------------------------------------------------- state
class State:
    """``state.json`` of the work folder: what is done, where its adapter is, how long it took."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "state.json"
        self.doc: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.doc.setdefault("systems", {})
        self.doc.setdefault("stage_s", {})

    def adapter(self, name: str) -> str | None:
        """Return the recorded adapter of a finished system, if it still exists."""
        entry = self.doc["systems"].get(name)
        if entry and (Path(entry["adapter"]) / "adapter_config.json").is_file():
            return str(entry["adapter"])
        return None

    def record(self, name: str, adapter: str, seconds: float, **extra: Any) -> None:
        """Record a finished system (its adapter, time and ``extra`` fields) and save."""
        self.doc["systems"][name] = {"adapter": adapter, "seconds": round(seconds, 1), **extra}
        self.save()

    def add_time(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to a stage's total over all invocations and save."""
        self.doc["stage_s"][stage] = round(self.doc["stage_s"].get(stage, 0.0) + seconds, 1)
        self.save()

    def save(self) -> None:
        """Write ``state.json`` atomically (a temporary file, then a rename)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, sort_keys=True))
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- training
def _compose(budget: Budget, work: Path, *extra: str, prompt: str | None = None) -> Any:
    from fedmira.common.compose import compose_config

    return compose_config([*budget.overrides(prompt), f"run.out_dir={work / 'runs'}", *extra])


def internal_sites(cfg: ExperimentConfig) -> list[tuple[str, int]]:
    """(site id, train reports) of the training sites, largest first."""
    from fedmira.common.partition import load_pooled_reports, split_sites

    splits = split_sites(cfg, load_pooled_reports(cfg, io.StringIO()))
    return sorted(((s.site_id, len(s.train)) for s in splits if not s.external and s.train),
                  key=lambda t: (-t[1], t[0]))


def choose_local_sites(sites: Sequence[tuple[str, int]], wanted: Sequence[str]) -> list[str]:
    """Return the requested sites, or by default the largest and the smallest training site."""
    names = [s for s, _ in sites]
    if list(wanted) == ["none"]:
        return []
    if wanted:
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise FedmiraError(f"--local-sites {', '.join(unknown)}: no such training site; the "
                               f"sites are {', '.join(names)}.")
        return list(wanted)
    return names[:1] + names[-1:] if len(names) > 1 else names


def checkpoint_steps(steps: int, rounds: int) -> list[int]:
    """Return the steps after which a pooled run is checkpointed: every 1/rounds of its budget."""
    return sorted({max(1, round(steps * i / rounds)) for i in range(1, rounds + 1)})


def train_pooled(budget: Budget, work: Path, state: State, name: str, steps: int, site: str | None,
                 prompt: str, out: TextIO) -> str:
    """Centralized (site None) or local-only training via ``fedmira train``'s function; resumable."""
    from fedmira.simulations.centralized import train_centralized

    done = state.adapter(name)
    if done:
        print(f"[skip] {name}: adapter already trained ({done})", file=out)
        return done
    print(f"[train] {name}: {steps} steps on {site or 'all sites pooled'}, prompt {prompt}", file=out)
    cfg = _compose(budget, work, f"train.steps={steps}", f"run.name=quality-{name}", prompt=prompt)
    t0 = time.perf_counter()
    marks = checkpoint_steps(steps, budget.rounds) if site is None else []
    result = train_centralized(cfg, site=site, val_limit=16, out=out, checkpoints=marks)
    seconds = time.perf_counter() - t0
    state.record(name, result["adapter"], seconds, steps=steps, train_reports=result["train_reports"],
                 val_loss_after=result["val_loss_after"], tokens=result["tokens"], prompt=prompt,
                 tokens_per_s=result["tokens_per_s"],
                 checkpoints=[{"step": m, "tokens": round(result["tokens"] * m / steps), "adapter": a}
                              for m, a in zip(marks, result.get("checkpoints", []))])
    state.add_time("train", seconds)
    return str(result["adapter"])


def federated_warmup_ratio(budget: Budget, pooled_steps: int) -> float:
    """Return the pooled run's warm-up as a share of its steps.

    Each site warms up over the same share of its own run (a fixed step count would keep a small
    site in warm-up all run).
    """
    return min(1.0, budget.warmup_steps / max(1, pooled_steps))


def train_federated(budget: Budget, work: Path, state: State, strategy: str, out: TextIO,
                    pooled_steps: int) -> str:
    """Train a federated run through ``simulations.launch.simulate``; resume an interrupted one."""
    from fedmira.simulations.launch import simulate

    name = f"{FEDERATED_PREFIX}{strategy}"
    done = state.adapter(name)
    if done:
        print(f"[skip] {name}: adapter already trained ({done})", file=out)
        return done
    local_epochs = budget.epochs / budget.rounds
    server_opt = strategy in ("fedadam", "fedyogi", "fedadagrad")
    extra = [f"strategy.server_lr={budget.server_lr}"] if server_opt else []
    cfg = _compose(budget, work, f"strategy={strategy}", f"strategy.rounds={budget.rounds}",
                   f"train.epochs={local_epochs}", "train.keep_optimizer_state=true", "train.warmup_steps=0",
                   f"train.warmup_ratio={federated_warmup_ratio(budget, pooled_steps):.6f}",
                   "strategy.fraction_train=1.0", "strategy.fraction_evaluate=1.0", *extra,
                   f"run.name=quality-{name}")
    runs = sorted((work / "runs" / f"quality-{name}").glob("*/config.json"))
    unfinished = [p.parent for p in runs
                  if not (p.parent / "final_adapter" / "adapter_config.json").is_file()]
    if unfinished:
        print(f"[resume] {name}: {unfinished[-1]}", file=out)
        cfg = cfg.replace(run=dataclasses.replace(cfg.run, resume=str(unfinished[-1])))
    else:
        print(f"[train] {name}: {budget.rounds} rounds x {local_epochs:g} local epochs per site", file=out)
    t0 = time.perf_counter()
    code = simulate(cfg, out=out)
    seconds = time.perf_counter() - t0
    state.add_time("train", seconds)
    finished = [p.parent for p in sorted((work / "runs" / f"quality-{name}").glob("*/config.json"))
                if (p.parent / "final_adapter" / "adapter_config.json").is_file()]
    if code != 0 or not finished:
        raise FedmiraError(f"The {strategy} run failed (exit {code}); its flower.log is under "
                           f"{work / 'runs' / f'quality-{name}'}. Rerun the bench to resume it.")
    run = finished[-1]
    curve = federated_checkpoints(run)
    state.record(name, str(run / "final_adapter"), seconds, rounds=budget.rounds,
                 local_epochs=local_epochs, tokens=curve[-1]["tokens"] if curve else 0, checkpoints=curve,
                 prompt=budget.prompt)
    return str(run / "final_adapter")


def federated_checkpoints(run: Path) -> list[dict[str, Any]]:
    """Per committed round: cumulative training tokens over all sites and the round's adapter."""
    from fedmira.common.rundir import RunDir

    rd, total, points = RunDir(run), 0, []
    for row in rd.metrics():
        total += sum(int(m.get("tokens", 0)) for m in row.get("train_sites", {}).values())
        points.append({"round": row["round"], "tokens": total, "adapter": str(rd.round_dir(row["round"]))})
    return points


# ----------------------------------------------------------------------------- the curve
def budget_curve(cfg: ExperimentConfig, state: State, names: Sequence[str], limit: int, cache: Path,
                 out: TextIO) -> dict[str, list[dict[str, Any]]]:
    """ROUGE-L of every checkpoint of ``names`` on the first ``limit`` held-out reports."""
    from fedmira.common.compare import SystemSpec, held_out_and_pool, predict_system
    from fedmira.common.metrics import rouge_l

    reports, _, pool = held_out_and_pool(cfg, limit, io.StringIO())
    curve: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        entry = state.doc["systems"].get(name, {})
        prompt = entry.get("prompt", cfg.data.template)
        curve[name] = []
        for point in entry.get("checkpoints", []):
            spec = SystemSpec(f"{name}@{point['tokens']}", "adapter", point["adapter"], prompt)
            hyps, info = predict_system(spec, cfg, reports, pool, cache_dir=cache, progress=False)
            score = sum(rouge_l(r.impression, h) for r, h in zip(reports, hyps)) / max(len(reports), 1)
            curve[name].append({"tokens": point["tokens"], "rougeL": round(score, 4)})
            print(f"[curve] {name} at {point['tokens']:,} tokens: ROUGE-L {score:.3f} ({info['source']})",
                  file=out)
    return curve


def curve_baselines(cfg: ExperimentConfig, limit: int, cache: Path) -> dict[str, float]:
    """Return the no-training baselines' ROUGE-L on the curve's reports.

    These are the plot's horizontal lines: the same reports as its points, not the full held-out
    set.
    """
    from fedmira.common.compare import RETRIEVAL_KINDS, SystemSpec, held_out_and_pool, predict_system
    from fedmira.common.metrics import rouge_l

    reports, _, pool = held_out_and_pool(cfg, limit, io.StringIO())
    out: dict[str, float] = {}
    for kind in (*RETRIEVAL_KINDS, "most_frequent"):
        hyps, _ = predict_system(SystemSpec(kind, kind), cfg, reports, pool, cache_dir=cache, progress=False)
        total = sum(rouge_l(r.impression, h) for r, h in zip(reports, hyps))
        out[kind] = round(total / max(len(reports), 1), 4)
    return out


def plot_curve(curve: dict[str, list[dict[str, Any]]], baselines: dict[str, float], path: Path) -> Path:
    """Quality vs training tokens, one line per system, baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in curve.items():
        if points:
            ax.plot([p["tokens"] / 1e6 for p in points], [p["rougeL"] for p in points], marker="o",
                    label=name)
    for i, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, linestyle="--", color=f"C{len(curve) + i}", label=f"{name} (no training)")
    ax.set_xlabel("training tokens processed (millions)")
    ax.set_ylabel("ROUGE-L (held-out subset)")
    ax.set_title("Quality vs training budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- results
def ratios(
    result: dict[str, Any], federated: Sequence[str], central: str,
) -> dict[str, dict[str, float | None]]:
    """Federated / centralized mean, per federated system and metric."""
    out: dict[str, dict[str, float | None]] = {}
    base = result["systems"][central]["summary"]
    for name in federated:
        summ = result["systems"][name]["summary"]
        out[name] = {}
        for m in TABLE_METRICS:
            a, b = (summ.get(m) or {}).get("mean"), (base.get(m) or {}).get("mean")
            out[name][m] = None if a is None or not b else a / b
    return out


def strongest_retrieval(result: dict[str, Any]) -> str | None:
    """Return the retrieval baseline with the highest mean ROUGE-L (the bar a trained model must clear)."""
    from fedmira.common.compare import RETRIEVAL_KINDS

    names = [n for n, i in result["systems"].items() if i["kind"] in RETRIEVAL_KINDS]
    if not names:
        return None
    return max(names, key=lambda n: _mean(result["systems"][n]["summary"], "rougeL") or 0.0)


def holm_p(result: dict[str, Any], reference: str, system: str, metric: str) -> float | None:
    """Holm-adjusted Wilcoxon p of ``reference`` vs ``system`` on ``metric`` (None: not tested)."""
    for row in result.get("comparisons", []):
        if row["reference"] == reference and row["system"] == system and row["metric"] == metric:
            return row["wilcoxon"].get("p_holm")
    return None


def targets(result: dict[str, Any], ratio: dict[str, dict[str, float | None]]) -> dict[str, dict[str, Any]]:
    """Check each federated system against its targets.

    The targets: >= 0.95x centralized on every metric; above the strongest retrieval on ROUGE-L,
    BERTScore and similarity; and that ROUGE-L gain significant (Holm p < 0.05, only known for the
    compare's reference system).
    """
    bar = strongest_retrieval(result)
    retrieval = result["systems"][bar]["summary"] if bar else None
    out: dict[str, dict[str, Any]] = {}
    for name, per_metric in ratio.items():
        summ = result["systems"][name]["summary"]
        above = None if retrieval is None else all(
            _mean(summ, m) is not None and _mean(retrieval, m) is not None
            and _mean(summ, m) > _mean(retrieval, m)  # type: ignore[operator]
            for m in BEAT_METRICS if _mean(retrieval, m) is not None)
        p = holm_p(result, name, bar, "rougeL") if bar else None
        out[name] = {"ratio_ge_0.95_every_metric": all(v is not None and v >= RATIO_TARGET
                                                       for v in per_metric.values()),
                     "above_retrieval": above, "retrieval_bar": bar, "rougeL_holm_p": p,
                     "significant": None if p is None else bool(p < ALPHA and above)}
    return out


def _mean(summary: dict[str, Any], metric: str) -> float | None:
    return (summary.get(metric) or {}).get("mean")


def _fmt(s: dict[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]"


def _p(v: float | None) -> str:
    return "n/a" if v is None else ("<0.001" if v < 0.001 else f"{v:.3f}")


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _yes(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


def _tokens(doc: dict[str, Any], name: str) -> str:
    t = doc["trained"].get(name, {}).get("tokens")
    return f"{t / 1e6:.2f} M" if t else ""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Return a GitHub Markdown table of ready-made cells (text kept as it is, no number parsing)."""
    return markdown_table(header, rows)


def results_markdown(doc: dict[str, Any]) -> str:
    """Return the results file: context, the table, ratios, targets, ablation, curve, verdict."""
    m, b = doc["machine"], doc["budget"]
    lines = [f"# Quality on real reports ({doc['date']})", "",
             f"- machine: {m['cpus']} CPUs ({m.get('cpu', '?')}), torch {m['torch']}, Python {m['python']}",
             f"- wall time: {doc['wall_s'] / 60:.1f} min this invocation; stage totals over all "
             f"invocations: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in doc["stage_s"].items()),
             f"- data: IU reports, `partition=template` with {b['template_sites']} template sites + "
             f"template_other ({', '.join(f'{s} {n}' for s, n in doc['sites'])} training reports)",
             f"- budget: {b['epochs']:g} epoch(s) of each system's training data (federated: {b['rounds']} "
             f"rounds x {b['epochs'] / b['rounds']:g} local epochs), batch {b['batch_size']}, lr {b['lr']} "
             f"(warm-up {b['warmup_steps']} steps, cosine over the run), prompt `{b['prompt']}` "
             f"(k={b['neighbors']} prior cases of the site), base model {b['model']}, "
             f"LoRA r={doc['lora']['r']} on {', '.join(doc['lora']['target_modules'])}",
             f"- held-out: {doc['n']} reports (test splits, as `fedmira evaluate` picks them)", "",
             _table(["system", "tokens", *TABLE_METRICS.values()],
                    [[name, _tokens(doc, name), *(_fmt(info["summary"].get(k)) for k in TABLE_METRICS)]
                     for name, info in doc["systems"].items()])]
    ratio_rows = []
    for name, per in doc["ratios"].items():
        t = doc["targets"][name]
        cells = ["n/a" if v is None else f"{v:.2f}" for v in per.values()]
        ratio_rows.append([name, *cells, _yes(t["ratio_ge_0.95_every_metric"]),
                           f"{_yes(t['above_retrieval'])} ({t['retrieval_bar']})", _p(t["rougeL_holm_p"])])
    lines += ["", f"Federated / centralized (target >= {RATIO_TARGET} on every metric) and against the "
              "strongest retrieval baseline (target: higher on ROUGE-L, BERTScore and similarity, "
              f"ROUGE-L with Holm-adjusted paired p < {ALPHA}):", "",
              _table(["system", *TABLE_METRICS.values(), ">= 0.95 everywhere", "above retrieval",
                      "ROUGE-L Holm p"], ratio_rows)]
    lines += _ablation_lines(doc) + _curve_lines(doc)
    lines += ["", f"Verdict: {doc['verdict']}", "",
              f"Paired tests (Holm-adjusted, reference `{doc['reference']}`): see {doc['compare_md']}.", ""]
    return "\n".join(lines)


def _ablation_lines(doc: dict[str, Any]) -> list[str]:
    ab = doc.get("ablation")
    if not ab:
        return []
    lines = ["", f"Prompting ablation (pooled training, reference `{ab['reference']}`; Wilcoxon p "
             "Holm-adjusted over this table):", ""]
    rows = []
    for row in ab["rows"]:
        diff = "" if row["diff"] is None else f"{row['diff']:+.3f}"
        rows.append([row["prompt"], row["system"], _num(row["rougeL"]), _num(row["bertscore_f1"]),
                     _num(row["sim"]), diff, _p(row["p_holm"])])
    header = ["prompt", "system", "ROUGE-L", "BERTScore-F1", "Similarity", "ROUGE-L diff (ref - system)",
              "Holm p"]
    return [*lines, _table(header, rows)]


def _curve_lines(doc: dict[str, Any]) -> list[str]:
    curve = doc.get("curve") or {}
    if not any(curve.values()):
        return []
    lines = ["", f"Quality vs budget (ROUGE-L on {doc['curve_n']} held-out reports; plot "
             f"`{doc.get('curve_png', '')}`):", ""]
    rows = [[name, ", ".join(f"{p['tokens'] / 1e6:.2f} M: {p['rougeL']:.3f}" for p in points)]
            for name, points in curve.items()]
    rows += [[f"{name} (no training, same reports)", f"{value:.3f}"]
             for name, value in (doc.get("curve_baselines") or {}).items()]
    return [*lines, _table(["system", "tokens -> ROUGE-L"], rows)]


def machine() -> dict[str, Any]:
    """Return the machine's CPU count and model, torch and Python versions and platform."""
    import torch

    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


# ----------------------------------------------------------------------------- the run
def train_all(
    budget: Budget, work: Path, state: State, cfg: ExperimentConfig, out: TextIO,
) -> dict[str, tuple[str, str]]:
    """Train every system not trained yet; return name -> (adapter folder, prompt)."""
    sites = internal_sites(cfg)
    pooled_reports = sum(n for _, n in sites)
    pooled: dict[str, tuple[str, str]] = {}
    # Pooled first: it answers "does this prompt beat retrieval at all" soonest.
    for prompt in (budget.prompt, *budget.ablation):
        name = CENTRAL if prompt == budget.prompt else f"{CENTRAL}_{prompt}"
        steps = steps_for(budget.epochs, pooled_reports, budget.batch_size)
        pooled[name] = (train_pooled(budget, work, state, name, steps, None, prompt, out), prompt)
    adapters: dict[str, tuple[str, str]] = {}
    for strategy in budget.strategies:
        pooled_steps = steps_for(budget.epochs, pooled_reports, budget.batch_size)
        adapters[f"{FEDERATED_PREFIX}{strategy}"] = (
            train_federated(budget, work, state, strategy, out, pooled_steps), budget.prompt)
    adapters.update(pooled)
    sizes = dict(sites)
    for site in choose_local_sites(sites, budget.local_sites):
        steps = steps_for(budget.epochs, sizes[site], budget.batch_size)
        adapters[f"{LOCAL_PREFIX}{site}"] = (
            train_pooled(budget, work, state, f"{LOCAL_PREFIX}{site}", steps, site, budget.prompt, out),
            budget.prompt)
    return adapters


def ablation(
    budget: Budget, cfg: ExperimentConfig, result: dict[str, Any], specs: Sequence[Any],
) -> dict[str, Any] | None:
    """Test the pooled main prompt against the pooled ablation prompts on the compare's per-sample scores."""
    from fedmira.common.stats import holm_bonferroni, wilcoxon_test

    names = [CENTRAL, *(f"{CENTRAL}_{p}" for p in budget.ablation)]
    names = [n for n in names if n in result["per_sample"]]
    if len(names) < 2:
        return None
    prompts = {s.name: s.template for s in specs}
    ref = [r.get("rougeL") for r in result["per_sample"][CENTRAL]]
    tests = [wilcoxon_test(ref, [r.get("rougeL") for r in result["per_sample"][n]]) for n in names[1:]]
    holm = holm_bonferroni([t["p_value"] for t in tests], ALPHA)
    rows = []
    ref_rouge = _mean(result["systems"][CENTRAL]["summary"], "rougeL")
    for i, name in enumerate(names):
        summ = result["systems"][name]["summary"]
        rows.append({"system": name, "prompt": prompts.get(name), "rougeL": _mean(summ, "rougeL"),
                     "bertscore_f1": _mean(summ, "bertscore_f1"), "sim": _mean(summ, "sim"),
                     "diff": None if i == 0 else ref_rouge - _mean(summ, "rougeL"),
                     "p_holm": None if i == 0 else holm["adjusted"][i - 1]})
    return {"reference": CENTRAL, "rows": rows}


def run_bench(budget: Budget, *, work_root: Path, results_dir: Path,
              out: TextIO = sys.stdout) -> dict[str, Any]:
    """Train what is missing, compare everything, write the results; return the results document."""
    from fedmira.common.compare import SystemSpec, default_systems, run_compare

    t_start = time.perf_counter()
    if not Path(budget.data).is_file():
        raise FedmiraError(f"IU reports not found at {budget.data}; "
                           "pass --data /path/to/indiana_reports.csv.")
    work = work_root / budget.key()
    work.mkdir(parents=True, exist_ok=True)
    (work / "budget.json").write_text(json.dumps(dataclasses.asdict(budget), indent=2))
    state = State(work)
    cfg = _compose(budget, work)
    sites = internal_sites(cfg)
    print(f"work folder {work}; {len(sites)} sites; budget {budget.epochs:g} epoch(s) per trained system",
          file=out)
    adapters = train_all(budget, work, state, cfg, out)
    specs = default_systems([SystemSpec(n, "adapter", a, p) for n, (a, p) in adapters.items()],
                            zero_shot=budget.zero_shot)
    t0 = time.perf_counter()
    reference = f"{FEDERATED_PREFIX}{budget.strategies[0]}" if budget.strategies else CENTRAL
    result = run_compare(cfg, specs, reference=reference, limit=budget.reports, out_dir=work / "compare",
                         cache_dir=work / "cache", use_encoder=budget.encoder, out=out)
    federated = [n for n in adapters if n.startswith(FEDERATED_PREFIX)]
    curve = budget_curve(cfg, state, [*federated, CENTRAL], budget.curve_reports, work / "cache", out) \
        if budget.curve_reports else {}
    bars = curve_baselines(cfg, budget.curve_reports, work / "cache") if budget.curve_reports else {}
    state.add_time("compare", time.perf_counter() - t0)
    ratio = ratios(result, federated, CENTRAL)
    doc = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "wall_s": round(time.perf_counter() - t_start, 1), "stage_s": state.doc["stage_s"],
        "budget": dataclasses.asdict(budget), "sites": sites, "n": result["n"],
        "systems": {n: {"kind": i["kind"], "summary": i["summary"]} for n, i in result["systems"].items()},
        "ratios": ratio, "targets": targets(result, ratio), "verdict": result["verdict"]["sentence"],
        "reference": result["reference"], "comparisons": result["comparisons"], "family": result["family"],
        "ablation": ablation(budget, cfg, result, specs), "curve": curve, "curve_n": budget.curve_reports,
        "curve_baselines": bars,
        "lora": dataclasses.asdict(cfg.lora), "trained": state.doc["systems"],
        "compare_md": result["paths"]["markdown"],
    }
    return write_results(doc, results_dir, out)


def write_results(doc: dict[str, Any], results_dir: Path, out: TextIO) -> dict[str, Any]:
    """Write ``results/quality-<date>.json``, ``.md`` and the budget plot; print the Markdown."""
    from fedmira.common.evaluation import json_safe

    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"quality-{doc['date'][:10]}"
    if any(doc.get("curve", {}).values()):
        bars = doc.get("curve_baselines") or {}  # on the curve's reports, like its points
        png = plot_curve(doc["curve"], bars, stem.with_name(stem.name + "-budget.png"))  # type: ignore[arg-type]
        doc["curve_png"] = str(png)
    stem.with_suffix(".json").write_text(json.dumps(json_safe(doc), indent=2, default=str))
    md = results_markdown(doc)
    stem.with_suffix(".md").write_text(md)
    print("\n" + md, file=out)
    print(f"results: {stem.with_suffix('.md')} and {stem.with_suffix('.json')}", file=out)
    return doc


def _csv(text: str) -> tuple[str, ...]:
    return tuple(s for s in text.split(",") if s)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; defaults come from :class:`Budget`."""
    d = Budget()
    p = argparse.ArgumentParser(prog="python -m fedmira.simulations.bench.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=d.data, help=f"IU reports CSV (default {d.data})")
    p.add_argument("--template-sites", type=int, default=d.template_sites,
                   help="largest templates that become sites; the rest is template_other")
    p.add_argument("--prompt", default=d.prompt, help="prompt of the federated and the main pooled systems")
    p.add_argument("--ablation", default=",".join(d.ablation),
                   help="other prompts trained pooled and tested against the main prompt ('' for none)")
    p.add_argument("--neighbors", type=int, default=d.neighbors, help="prior cases per site_aware_rag prompt")
    p.add_argument("--epochs", type=float, default=d.epochs,
                   help="the budget: passes over each system's training data")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="federated rounds (local epochs per round = epochs / rounds); "
                        "also the curve's points")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (warm-up, then cosine)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--strategies", default=",".join(d.strategies),
                   help="federated strategies, comma-separated; the first is the compare's reference")
    p.add_argument("--server-lr", type=float, default=d.server_lr,
                   help="fedadam/fedyogi server learning rate")
    p.add_argument("--local-sites", default="",
                   help="sites trained alone (default: largest and smallest; "
                        "'none' for no local-only system)")
    p.add_argument("--reports", type=int, default=d.reports, help="held-out reports to evaluate (0: all)")
    p.add_argument("--curve-reports", type=int, default=d.curve_reports,
                   help="held-out reports per point of the quality-vs-budget curve (0: no curve)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="prompt + target tokens")
    p.add_argument("--model", default=d.model, help="base model (tiny-random for a smoke run)")
    p.add_argument("--no-encoder", action="store_true", help="skip BERTScore and similarity")
    p.add_argument("--no-zero-shot", action="store_true",
                   help="skip the zero-shot base model (slow to decode)")
    p.add_argument("--work", default=WORK_DIR, help="work folder (runs, adapters, cache, state)")
    p.add_argument("--results", default=RESULTS_DIR, help="where quality-<date>.json/.md/-budget.png go")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the quality bench; exit code 2 on a user error (printed without a traceback)."""
    args = parse_args(argv)
    budget = Budget(data=args.data, template_sites=args.template_sites, prompt=args.prompt,
                    ablation=_csv(args.ablation), neighbors=args.neighbors, epochs=args.epochs,
                    rounds=args.rounds, batch_size=args.batch_size, lr=args.lr,
                    warmup_steps=args.warmup_steps, strategies=_csv(args.strategies),
                    server_lr=args.server_lr, local_sites=_csv(args.local_sites), reports=args.reports,
                    curve_reports=args.curve_reports,
                    max_length=args.max_length, model=args.model, encoder=not args.no_encoder,
                    zero_shot=not args.no_zero_shot)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_bench(budget, work_root=Path(args.work), results_dir=Path(args.results))
    except FedmiraError as exc:
        print(f"bench-quality: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
