"""Simulation overhead: a round's wall time over N sites vs the sites' own compute.

Runs the real ``fedmira simulate`` path (``simulations.launch.simulate``: run folder, private
SuperLink, ``flwr run``, Flower's simulation engine on Ray, ServerApp and ClientApp) with the
tiny random model and a few local steps, so the sites' compute is small and what remains is the
framework's cost. Every site trains and evaluates every round. From the run folder:

- start-up: launch until the ServerApp starts round 1 (split, SuperLink, Flower, Ray, app start);
- per round: ``round_s`` (the ServerApp's wall time of the round) vs the sum of the sites'
  ``train-s`` + ``eval-s`` (training and evaluation inside the ClientApp); the difference is
  the per-round overhead (message passing, Ray scheduling, handler set-up, aggregation, commit).
  Round 1 also loads the model in the simulation worker, so warm rounds (2+) are reported apart;
- shutdown: after the last round until ``simulate`` returns.

Sites run one at a time (``mode.client_cpus`` = all CPUs), so the sum of their compute is a
lower bound of the round's wall time. Each site uses one torch thread: the tiny model gains
nothing from more, and on a shared machine two threads make its step times erratic::

    python -m fedmira.simulations.bench.sim_overhead            # N = 8 and 42, 3 rounds each, ~2-3 minutes
    python -m fedmira.simulations.bench.sim_overhead --quick    # N = 3 and 8, 2 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from fedmira.simulations.bench.common import BenchRow

REPORTS_PER_SITE = 20


def overrides(n_sites: int, rounds: int, out_dir: Path) -> list[str]:
    """``+debug=tiny`` with N synthetic hospitals, all of them in every round, one site at a time."""
    return [
        "+debug=tiny", f"data.synthetic_sites={n_sites}",
        f"data.synthetic_reports={n_sites * REPORTS_PER_SITE}",
        f"strategy.rounds={rounds}", "strategy.fraction_train=1.0", "strategy.fraction_evaluate=1.0",
        f"mode.client_cpus={os.cpu_count() or 1}", "train.threads=1",
        "strategy.norm_factor=0",  # a random-model outlier would be rejected and its compute uncounted
        "data.max_length=320",  # debug/tiny's 224 is too short for site_26's prompt (tiny tokenizer)
        f"run.out_dir={out_dir}", f"run.name=bench-sim-{n_sites}",
    ]


def simulate_once(n_sites: int, rounds: int, root: Path) -> Path:
    """One simulation; returns its run folder.

    Raises
    ------
    RuntimeError
        When the run does not complete (with the end of its output and Flower log).
    """
    from fedmira.common.compose import compose_config
    from fedmira.simulations.launch import simulate

    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # progress lines go to the captured output, not the table
        code = simulate(compose_config(overrides(n_sites, rounds, root)), out=out)
    text = out.getvalue()
    run_dir = next((Path(line.split(":", 1)[1].strip()) for line in text.splitlines()
                    if line.startswith("Run folder:")), None)
    if code != 0 or run_dir is None:
        log = (run_dir / "flower.log").read_text(errors="replace")[-2000:] if run_dir else ""
        raise RuntimeError(f"simulation of {n_sites} sites failed (exit {code}):\n{text[-2000:]}\n{log}")
    return run_dir


def round_timings(run_dir: Path) -> dict[str, Any]:
    """Start-up, per-round wall vs compute, and shutdown, from a finished run folder."""
    state = json.loads((run_dir / "state.json").read_text())
    n_sites = len(json.loads((run_dir / "sites" / "sites.json").read_text())["train_sites"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    rounds = []
    for rec in records:
        train = rec.get("train_sites", {})
        evaluate = rec.get("evaluate_sites", {})
        compute = sum(m.get("train-s", 0.0) for m in train.values()) + sum(
            m.get("eval-s", 0.0) for m in evaluate.values())
        rounds.append({"wall": rec["round_s"], "compute": compute, "tasks": len(train) + len(evaluate),
                       "sites": n_sites, "rejected": len(rec.get("rejected", []))})
    startup = state["rounds_started_at"] - state["launched_at"]
    shutdown = state["wall_s"] - startup - sum(r["wall"] for r in rounds)
    return {"startup": startup, "launcher": state.get("launcher_startup_s", 0.0), "rounds": rounds,
            "shutdown": shutdown, "wall": state["wall_s"]}


def rows_for(t: dict[str, Any]) -> list[BenchRow]:
    """Return the rows of one simulation size."""
    cold, warm = t["rounds"][0], t["rounds"][1:] or t["rounds"][:1]
    n = cold["sites"]
    wall = statistics.median(r["wall"] for r in warm)
    compute = statistics.median(r["compute"] for r in warm)
    overhead = statistics.median(r["wall"] - r["compute"] for r in warm)
    tasks = warm[0]["tasks"]
    return [
        BenchRow(name=f"N={n}: start-up until round 1", value=t["startup"], unit="s",
                 note=f"launcher's own part (split, run folder) {t['launcher']:.1f} s; the rest is "
                      "SuperLink, flwr run, Ray and ServerApp start"),
        BenchRow(name=f"N={n}: round 1 (cold) wall / sites' compute", value=cold["wall"], unit="s",
                 baseline=cold["compute"],
                 note="round 1 also starts the simulation worker and loads the model"),
        BenchRow(name=f"N={n}: warm round wall / sites' compute", value=wall, unit="s", baseline=compute,
                 note=f"median of {len(warm)} rounds; {tasks} site tasks per round (train + evaluate), "
                      f"one site at a time; replies rejected: {sum(r['rejected'] for r in t['rounds'])}"),
        BenchRow(name=f"N={n}: per-round overhead (warm)", value=overhead, unit="s",
                 note=f"round wall - sites' compute = {1000 * overhead / tasks:.0f} ms per site task"),
        BenchRow(name=f"N={n}: shutdown after the last round", value=t["shutdown"], unit="s",
                 note=f"final adapter, Flower/Ray teardown, SuperLink stop; whole run {t['wall']:.0f} s"),
    ]


def marginal_row(small: dict[str, Any], large: dict[str, Any]) -> BenchRow:
    """How much a warm round's overhead grows per added site, between the two sizes."""
    def point(t: dict[str, Any]) -> tuple[int, float]:
        warm = t["rounds"][1:] or t["rounds"][:1]
        return warm[0]["sites"], statistics.median(r["wall"] - r["compute"] for r in warm)

    (n1, o1), (n2, o2) = point(small), point(large)
    per_site = (o2 - o1) / (n2 - n1) if n2 != n1 else float("nan")
    return BenchRow(name=f"overhead per added site per round (N={n1} -> {n2})", value=per_site * 1000,
                    unit="ms",
                    note=f"(overhead at N={n2} - at N={n1}) / {n2 - n1} sites; each site trains and "
                         "evaluates")


def run(quick: bool) -> list[BenchRow]:
    """N = 8 and 42 with 3 rounds (``quick``: N = 3 and 8 with 2 rounds)."""
    sizes, rounds = ((3, 8), 2) if quick else ((8, 42), 3)
    timings = []
    with tempfile.TemporaryDirectory(prefix="fedmira-bench-sim-") as tmp:
        for n in sizes:
            timings.append(round_timings(simulate_once(n, rounds, Path(tmp))))
    rows = [row for t in timings for row in rows_for(t)]
    return rows + [marginal_row(timings[0], timings[-1])]


def main(argv: list[str] | None = None) -> None:
    """Print the rows (the runner, ``python -m fedmira.simulations.bench.run``, also writes them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 3 and 8, 2 rounds")
    args = parser.parse_args(argv)
    from fedmira.simulations.bench.run import format_table

    print(format_table({"sim_overhead": run(args.quick)}, notes=True))


if __name__ == "__main__":
    main()
