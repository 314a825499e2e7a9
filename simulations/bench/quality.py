"""Quality on real reports: is federated training as good as pooled training, and worth deploying?

On the IU chest X-ray reports split into pseudo-hospitals by reporting template (the ``template``
partition: the largest templates become sites, the rest ``template_other``), every trained
system gets the same budget of local optimizer steps (batch ``--batch-size``, same learning
rate, constant schedule):

* federated, FedAvg and one LoRA-aware strategy (``--strategies``; default ``ffa_lora``):
  ``rounds x local_steps`` steps at each of the S sites, ``B = rounds x local_steps x S`` in all;
* centralized (pooled train splits): ``B`` steps;
* local-only (``--local-sites``, default the largest and the smallest site): each site alone,
  ``rounds x local_steps`` steps, exactly what it spends in the federation.

Then ``fedmira compare`` runs them with the zero-shot base model, retrieval and the most frequent
impression on ``--reports`` held-out reports (the test splits, as ``fedmira evaluate`` picks
them) and the results go to ``results/quality-<date>.json`` and ``.md`` with the date, the
machine, the wall time, ROUGE-L, BERTScore-F1, similarity, clinical F1 and the
federated/centralized ratio of every metric. The table is printed too (numbers only)::

    make bench-quality                                   # about 30-40 minutes on 2 CPU cores
    python -m simulations.bench.quality --data /path/to/indiana_reports.csv --rounds 2  # quicker

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
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

from common.errors import FedmiraError

DEFAULT_DATA = "../shared/data/iu_xray/indiana_reports.csv"
RESULTS_DIR, WORK_DIR = "results", "outputs/bench-quality"
CENTRAL, FEDERATED_PREFIX, LOCAL_PREFIX = "centralized", "fed_", "local_"
#: Metrics in the results table (per-sample means, clinical micro-F1 pooled), with labels.
TABLE_METRICS: dict[str, str] = {
    "rougeL": "ROUGE-L", "bertscore_f1": "BERTScore-F1", "sim": "Similarity",
    "clinical_f1": "Clinical F1", "clinical_micro_f1": "Clinical micro-F1",
}
RATIO_TARGET = 0.95


@dataclass(frozen=True)
class Budget:
    """The shared step budget and the evaluation size (all of it goes into the work folder's hash)."""

    data: str = DEFAULT_DATA
    template_sites: int = 3
    rounds: int = 4
    local_steps: int = 5
    batch_size: int = 4
    lr: float = 1e-3
    strategies: tuple[str, ...] = ("fedavg", "ffa_lora")
    local_sites: tuple[str, ...] = ()
    reports: int = 150
    max_new_tokens: int = 48
    model: str = "embedded:smollm2-135m"
    encoder: bool = True

    def overrides(self) -> list[str]:
        """Hydra overrides every system shares: data, split, batches, learning rate, decoding."""
        return [
            "data=iu_xray", f"data.path={self.data}", "partition=template",
            f"partition.num_sites={self.template_sites}", f"model.name_or_path={self.model}",
            f"train.batch_size={self.batch_size}", "train.grad_accum=1", f"train.lr={self.lr}",
            "train.warmup_steps=0", "train.schedule=constant", f"generate.max_new_tokens={self.max_new_tokens}",
            "generate.batch_size=16", "eval.every=0", "eval.max_loss_samples=8", "eval.rouge_samples=0",
        ]

    def key(self) -> str:
        """Short hash naming the work folder (the data file's size and mtime included)."""
        from common.config import stable_hash

        path = Path(self.data)
        stamp = [path.stat().st_size, int(path.stat().st_mtime)] if path.is_file() else None
        return stable_hash([dataclasses.asdict(self), stamp])[:10]


# ----------------------------------------------------------------------------- state
class State:
    """``state.json`` of the work folder: what is done, where its adapter is, how long it took."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "state.json"
        self.doc: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.doc.setdefault("systems", {})
        self.doc.setdefault("stage_s", {})

    def adapter(self, name: str) -> str | None:
        """The recorded adapter of a finished system, if it still exists."""
        entry = self.doc["systems"].get(name)
        if entry and (Path(entry["adapter"]) / "adapter_config.json").is_file():
            return str(entry["adapter"])
        return None

    def record(self, name: str, adapter: str, seconds: float, **extra: Any) -> None:
        self.doc["systems"][name] = {"adapter": adapter, "seconds": round(seconds, 1), **extra}
        self.save()

    def add_time(self, stage: str, seconds: float) -> None:
        self.doc["stage_s"][stage] = round(self.doc["stage_s"].get(stage, 0.0) + seconds, 1)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, sort_keys=True))
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- training
def _compose(budget: Budget, work: Path, *extra: str) -> Any:
    from common.compose import compose_config

    return compose_config([*budget.overrides(), f"run.out_dir={work / 'runs'}", *extra])


def internal_sites(cfg: Any) -> list[tuple[str, int]]:
    """(site id, train reports) of the training sites, largest first."""
    from simulations.launch import load_pooled_reports, split_sites

    splits = split_sites(cfg, load_pooled_reports(cfg, io.StringIO()))
    return sorted(((s.site_id, len(s.train)) for s in splits if not s.external and s.train),
                  key=lambda t: (-t[1], t[0]))


def choose_local_sites(sites: Sequence[tuple[str, int]], wanted: Sequence[str]) -> list[str]:
    """The requested sites, or by default the largest and the smallest training site."""
    names = [s for s, _ in sites]
    if wanted:
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise FedmiraError(f"--local-sites {', '.join(unknown)}: no such training site; the "
                               f"sites are {', '.join(names)}.")
        return list(wanted)
    return names[:1] + names[-1:] if len(names) > 1 else names


def train_pooled(budget: Budget, work: Path, state: State, name: str, steps: int,
                 site: str | None, out: TextIO) -> str:
    """Centralized (site None) or local-only training via ``fedmira train``'s function; resumable."""
    from simulations.centralized import train_centralized

    done = state.adapter(name)
    if done:
        print(f"[skip] {name}: adapter already trained ({done})", file=out)
        return done
    print(f"[train] {name}: {steps} steps on {site or 'all sites pooled'}", file=out)
    cfg = _compose(budget, work, f"train.steps={steps}", f"run.name=quality-{name}")
    t0 = time.perf_counter()
    result = train_centralized(cfg, site=site, val_limit=16, out=out)
    seconds = time.perf_counter() - t0
    state.record(name, result["adapter"], seconds, steps=steps, train_reports=result["train_reports"],
                 val_loss_after=result["val_loss_after"])
    state.add_time("train", seconds)
    return str(result["adapter"])


def train_federated(budget: Budget, work: Path, state: State, strategy: str, out: TextIO) -> str:
    """A federated run through ``simulations.launch.simulate``; resumes an interrupted one."""
    from simulations.launch import simulate

    name = f"{FEDERATED_PREFIX}{strategy}"
    done = state.adapter(name)
    if done:
        print(f"[skip] {name}: adapter already trained ({done})", file=out)
        return done
    cfg = _compose(budget, work, f"strategy={strategy}", f"strategy.rounds={budget.rounds}",
                   f"train.steps={budget.local_steps}", "strategy.fraction_train=1.0",
                   "strategy.fraction_evaluate=1.0", f"run.name=quality-{name}")
    runs = sorted((work / "runs" / f"quality-{name}").glob("*/config.json"))
    unfinished = [p.parent for p in runs if not (p.parent / "final_adapter" / "adapter_config.json").is_file()]
    if unfinished:
        print(f"[resume] {name}: {unfinished[-1]}", file=out)
        cfg = cfg.replace(run=dataclasses.replace(cfg.run, resume=str(unfinished[-1])))
    else:
        print(f"[train] {name}: {budget.rounds} rounds x {budget.local_steps} steps per site", file=out)
    t0 = time.perf_counter()
    code = simulate(cfg, out=out)
    seconds = time.perf_counter() - t0
    state.add_time("train", seconds)
    finished = [p.parent for p in sorted((work / "runs" / f"quality-{name}").glob("*/config.json"))
                if (p.parent / "final_adapter" / "adapter_config.json").is_file()]
    if code != 0 or not finished:
        raise FedmiraError(f"The {strategy} run failed (exit {code}); its flower.log is under "
                           f"{work / 'runs' / f'quality-{name}'}. Rerun the bench to resume it.")
    adapter = str(finished[-1] / "final_adapter")
    state.record(name, adapter, seconds, steps_per_site=budget.rounds * budget.local_steps)
    return adapter


# ----------------------------------------------------------------------------- results
def ratios(result: dict[str, Any], federated: Sequence[str], central: str) -> dict[str, dict[str, float | None]]:
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


def targets(result: dict[str, Any], ratio: dict[str, dict[str, float | None]]) -> dict[str, dict[str, bool | None]]:
    """Per federated system: >= 0.95x centralized on every metric, and above retrieval on every metric."""
    retrieval = result["systems"].get("retrieval", {}).get("summary")
    out: dict[str, dict[str, bool | None]] = {}
    for name, per_metric in ratio.items():
        summ = result["systems"][name]["summary"]
        above = None if retrieval is None else all(
            _mean(summ, m) is not None and _mean(summ, m) > _mean(retrieval, m)  # type: ignore[operator]
            for m in TABLE_METRICS if _mean(retrieval, m) is not None)
        out[name] = {"ratio_ge_0.95_every_metric": all(v is not None and v >= RATIO_TARGET
                                                       for v in per_metric.values()),
                     "above_retrieval_every_metric": above}
    return out


def _mean(summary: dict[str, Any], metric: str) -> float | None:
    return (summary.get(metric) or {}).get("mean")


def _fmt(s: dict[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]"


def results_markdown(doc: dict[str, Any]) -> str:
    """The results file: context, the table, ratios, targets, verdict."""
    m, sysinfo = doc["machine"], doc["systems"]
    lines = [f"# Quality on real reports ({doc['date']})", "",
             f"- machine: {m['cpus']} CPUs, torch {m['torch']}, Python {m['python']}, {m['platform']}",
             f"- wall time: {doc['wall_s'] / 60:.1f} min this invocation; stage totals over all "
             f"invocations: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in doc["stage_s"].items()),
             f"- data: IU reports, `partition=template` with {doc['budget']['template_sites']} template "
             f"sites + template_other ({', '.join(f'{s} {n}' for s, n in doc['sites'])} training reports)",
             f"- budget: {doc['budget_steps']} optimizer steps of batch {doc['budget']['batch_size']} per "
             f"trained system (federated: {doc['budget']['rounds']} rounds x {doc['budget']['local_steps']} "
             f"steps x {len(doc['sites'])} sites; local-only: {doc['budget']['rounds'] * doc['budget']['local_steps']} "
             f"steps, a site's share), lr {doc['budget']['lr']}, base model {doc['budget']['model']}, "
             f"LoRA r={doc['lora']['r']} on {', '.join(doc['lora']['target_modules'])}",
             f"- held-out: {doc['n']} reports (test splits, as `fedmira evaluate` picks them)", "",
             "| system | " + " | ".join(TABLE_METRICS.values()) + " |",
             "|---|" + "---|" * len(TABLE_METRICS)]
    for name, info in sysinfo.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(info["summary"].get(k)) for k in TABLE_METRICS) + " |")
    lines += ["", "Federated / centralized (target >= 0.95 on every metric):", "",
              "| system | " + " | ".join(TABLE_METRICS.values()) + " | >= 0.95 everywhere | above retrieval everywhere |",
              "|---|" + "---|" * (len(TABLE_METRICS) + 2)]
    for name, per in doc["ratios"].items():
        t = doc["targets"][name]
        cells = ["n/a" if v is None else f"{v:.2f}" for v in per.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_yes(t['ratio_ge_0.95_every_metric'])} | "
                     f"{_yes(t['above_retrieval_every_metric'])} |")
    lines += ["", f"Verdict: {doc['verdict']}", "",
              f"Paired tests (Holm-adjusted, reference `{doc['reference']}`): see {doc['compare_md']}.", ""]
    return "\n".join(lines)


def _yes(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(terse=True)}


# ----------------------------------------------------------------------------- the run
def run_bench(budget: Budget, *, work_root: Path, results_dir: Path, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Train what is missing, compare everything, write the results; returns the results document."""
    from common.compare import SystemSpec, default_systems, run_compare

    t_start = time.perf_counter()
    if not Path(budget.data).is_file():
        raise FedmiraError(f"IU reports not found at {budget.data}; pass --data /path/to/indiana_reports.csv.")
    work = work_root / budget.key()
    work.mkdir(parents=True, exist_ok=True)
    (work / "budget.json").write_text(json.dumps(dataclasses.asdict(budget), indent=2))
    state = State(work)
    cfg = _compose(budget, work)
    sites = internal_sites(cfg)
    steps = budget.rounds * budget.local_steps
    total = steps * len(sites)
    print(f"work folder {work}; {len(sites)} sites; budget {total} steps per trained system", file=out)
    adapters: dict[str, str] = {}
    for strategy in budget.strategies:
        adapters[f"{FEDERATED_PREFIX}{strategy}"] = train_federated(budget, work, state, strategy, out)
    adapters[CENTRAL] = train_pooled(budget, work, state, CENTRAL, total, None, out)
    for site in choose_local_sites(sites, budget.local_sites):
        adapters[f"{LOCAL_PREFIX}{site}"] = train_pooled(budget, work, state, f"{LOCAL_PREFIX}{site}", steps, site, out)
    specs = default_systems([SystemSpec(n, "adapter", a) for n, a in adapters.items()])
    t0 = time.perf_counter()
    reference = f"{FEDERATED_PREFIX}{budget.strategies[0]}" if budget.strategies else None
    result = run_compare(cfg, specs, reference=reference, limit=budget.reports, out_dir=work / "compare",
                         cache_dir=work / "cache", use_encoder=budget.encoder, out=out)
    state.add_time("compare", time.perf_counter() - t0)
    federated = [n for n in adapters if n.startswith(FEDERATED_PREFIX)]
    ratio = ratios(result, federated, CENTRAL)
    doc = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "wall_s": round(time.perf_counter() - t_start, 1), "stage_s": state.doc["stage_s"],
        "budget": dataclasses.asdict(budget), "budget_steps": total, "sites": sites, "n": result["n"],
        "systems": {n: {"kind": i["kind"], "summary": i["summary"]} for n, i in result["systems"].items()},
        "ratios": ratio, "targets": targets(result, ratio), "verdict": result["verdict"]["sentence"],
        "reference": result["reference"], "comparisons": result["comparisons"], "family": result["family"],
        "lora": dataclasses.asdict(cfg.lora), "trained": state.doc["systems"], "compare_md": result["paths"]["markdown"],
    }
    return write_results(doc, results_dir, out)


def write_results(doc: dict[str, Any], results_dir: Path, out: TextIO) -> dict[str, Any]:
    """``results/quality-<date>.json`` and ``.md``; prints the Markdown."""
    from common.evaluation import json_safe

    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"quality-{doc['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(json_safe(doc), indent=2, default=str))
    md = results_markdown(doc)
    stem.with_suffix(".md").write_text(md)
    print("\n" + md, file=out)
    print(f"results: {stem.with_suffix('.md')} and {stem.with_suffix('.json')}", file=out)
    return doc


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = Budget()
    p = argparse.ArgumentParser(prog="python -m simulations.bench.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=d.data, help=f"IU reports CSV (default {d.data})")
    p.add_argument("--template-sites", type=int, default=d.template_sites,
                   help="largest templates that become sites; the rest is template_other")
    p.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds")
    p.add_argument("--local-steps", type=int, default=d.local_steps, help="optimizer steps per site per round")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--strategies", default=",".join(d.strategies),
                   help="federated strategies, comma-separated; the first is the reference")
    p.add_argument("--local-sites", default="", help="sites trained alone (default: largest and smallest)")
    p.add_argument("--reports", type=int, default=d.reports, help="held-out reports to evaluate")
    p.add_argument("--model", default=d.model, help="base model (tiny-random for a smoke run)")
    p.add_argument("--no-encoder", action="store_true", help="skip BERTScore and similarity")
    p.add_argument("--work", default=WORK_DIR, help="work folder (runs, adapters, cache, state)")
    p.add_argument("--results", default=RESULTS_DIR, help="where quality-<date>.json/.md go")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(data=args.data, template_sites=args.template_sites, rounds=args.rounds,
                    local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                    strategies=tuple(s for s in args.strategies.split(",") if s),
                    local_sites=tuple(s for s in args.local_sites.split(",") if s),
                    reports=args.reports, model=args.model, encoder=not args.no_encoder)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_bench(budget, work_root=Path(args.work), results_dir=Path(args.results))
    except FedmiraError as exc:
        print(f"bench-quality: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
