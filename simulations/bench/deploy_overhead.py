"""Per-round overhead at a deployed site: Flower's per-task processes vs fedmira's warm executor.

Runs a real deployment on loopback (coordinator + 3 hospitals, TLS and node authentication, the
same commands as docs/deployment.md) once per isolation mode and reports, per site and task:

- task time at the site: from the SuperNode's "Receiving: <type> message" (the task arrived) to
  its "Sending: <type> message" (the reply leaves), from the timestamped ``supernode.log``;
- ClientApp work: ``train-s`` / ``eval-s`` the ClientApp reports (the training or evaluation
  itself);
- overhead = task time - work: process start, imports, FAB unpacking, model load
  (``setup-s``), message pulling and reply pushing; almost all of it comes before training
  starts, so it is the "task arrival to training start" time plus the reply's push;

and the round wall time the coordinator recorded (which also holds Flower's polling: SuperNode
and ServerApp each poll every 3 s)::

    python -m fedmira.simulations.bench.deploy_overhead                 # tiny model, 3 rounds, both modes
    python -m fedmira.simulations.bench.deploy_overhead +debug=tiny model=smollm2_135m --rounds 2
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fedmira.simulations.loopback import Federation

KINDS = (("train", "train_sites", "train-s"), ("evaluate", "evaluate_sites", "eval-s"))
COLUMNS = ("task_s", "work_s", "setup_s", "overhead_s")
TASK_LINE = re.compile(r"^(\S+) .*(Receiving|Sending): (train|evaluate) message")


def task_durations(supernode_log: Path) -> dict[str, list[float]]:
    """Seconds from 'Receiving' to 'Sending' of each task, in order, by message type."""
    opened: dict[str, datetime] = {}
    out: dict[str, list[float]] = {"train": [], "evaluate": []}
    for line in supernode_log.read_text(errors="replace").splitlines():
        m = TASK_LINE.match(line)
        if not m:
            continue
        stamp, what, kind = datetime.fromisoformat(m.group(1)), m.group(2), m.group(3)
        if what == "Receiving":
            opened[kind] = stamp
        elif kind in opened:
            out[kind].append((stamp - opened.pop(kind)).total_seconds())
    return out


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def site_rows(run_dir: Path, workdirs: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per (site, round, task): task time, work, setup-s, overhead."""
    records = _metrics(run_dir)
    rows = []
    for site, workdir in workdirs.items():
        durations = task_durations(workdir / "supernode.log")
        for kind, sites_key, work_key in KINDS:
            for rec, took in zip(records, durations[kind]):
                m = rec.get(sites_key, {}).get(site)
                if m is None:
                    continue
                rows.append({"site": site, "round": rec["round"], "task": kind, "task_s": took,
                             "work_s": m[work_key], "setup_s": m["setup-s"], "cold": m["cold-start"],
                             "overhead_s": took - m[work_key]})
    return rows


def run_mode(root: Path, isolation: str, rounds: int, overrides: list[str], timeout: float) -> dict[str, Any]:
    """One loopback deployment in ``isolation``; returns its rows and round times."""
    with Federation(root).setup() as fed:
        fed.coordinator("+debug=tiny", f"strategy.rounds={rounds}", *overrides)
        for i in range(fed.num_sites):
            fed.hospital(i, "+debug=tiny", *overrides, isolation=isolation, extra=("--no-dry-run",))
        if not fed.wait_log("coordinator", r"Run (completed|FAILED)", timeout):
            raise RuntimeError(f"{isolation}: the run did not finish within {timeout:.0f} s; see {root}")
        run_dir = fed.run_dir()
        assert run_dir is not None
        names = {f"site_{i + 1:02d}": root / f"work-hospital{i + 1}" for i in range(fed.num_sites)}
        rows = site_rows(run_dir, names)
        rounds_s = [r["round_s"] for r in _metrics(run_dir)]
    return {"rows": rows, "round_s": rounds_s}


def summarize(name: str, result: dict[str, Any]) -> str:
    """Return a few lines per mode: task time split into work and overhead, per round, median."""
    rows = result["rows"]
    lines = [f"== {name}"]
    for kind in ("train", "evaluate"):
        for first in (True, False):
            sel = [r for r in rows if r["task"] == kind and (r["round"] == 1) == first]
            if not sel:
                continue
            med = {k: statistics.median(r[k] for r in sel) for k in COLUMNS}
            cold = sum(r["cold"] for r in sel)
            lines.append(f"  {kind:8s} {'round 1 ' if first else 'rounds 2+'}: task {med['task_s']:5.2f} s = "
                         f"work {med['work_s']:5.2f} s + overhead {med['overhead_s']:5.2f} s (of which "
                         f"setup-s {med['setup_s']:4.2f} s); cold starts {cold}/{len(sel)} (medians)")
    per_round = {}
    for r in rows:
        if r["round"] > 1:
            per_round.setdefault((r["site"], r["round"]), 0.0)
            per_round[(r["site"], r["round"])] += r["overhead_s"]
    if per_round:
        lines.append(f"  per-round overhead at a site (train + evaluate, rounds 2+): median "
                     f"{statistics.median(per_round.values()):.2f} s")
    lines.append(f"  round wall time (coordinator): {', '.join(f'{s:.1f}' for s in result['round_s'])} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run a loopback deployment per isolation mode and print each one's summary."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="subprocess,warm", help="comma-separated isolation modes")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", help="keep the deployments' folders here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for coordinator and hospitals")
    args = parser.parse_args(argv)
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedmira-overhead-"))
    for mode in args.modes.split(","):
        start = time.perf_counter()
        result = run_mode(base / mode, mode, args.rounds, args.overrides, args.timeout)
        print(summarize(f"{mode} isolation ({time.perf_counter() - start:.0f} s in all)", result), flush=True)
    print(f"(folders: {base})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
