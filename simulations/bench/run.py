"""``make bench``: run the benchmarks, print one table of ratios, write JSON + Markdown results.

Every benchmark measures something next to its baseline in the same run on the same machine
and reports the ratio, so the numbers hold on a noisy shared machine::

    python -m fedmira.simulations.bench.run                        # all, about 6-8 minutes on 2 shared cores
    python -m fedmira.simulations.bench.run --quick                # smoke run: fewer repeats, smaller sizes
    python -m fedmira.simulations.bench.run --only comm,aggregation
    python -m fedmira.simulations.bench.run --out results/ --readme README.md  # also refresh the README table

It writes ``OUT/bench-<date>-<time>.json`` (machine, versions, every row) and ``.md`` (the
same as a table). Benchmarks never assert: a missed target is shown in the table and in the
closing line; the exit code is 1 only when a benchmark failed to run.

Adding a benchmark: write ``simulations/bench/<name>.py`` with ``run(quick: bool) ->
list[BenchRow]`` (see :mod:`simulations.bench.common`) and add ``"<name>"`` to
:data:`BENCHMARKS` below.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fedmira.common import tables
from fedmira.simulations.bench.common import BenchRow

# The registry: module names under simulations/bench/, run in this order.
BENCHMARKS: tuple[str, ...] = (
    "comm",             # 1. bytes per site per round vs the full model (fp32, bf16; 135M and 7B)
    "client_overhead",  # 2. ClientApp training tokens/s vs a bare PEFT loop
    "dp_cost",          # 3. a DP-SGD step vs a plain step on the same batch
    "sim_overhead",     # 4. Flower simulation round wall time vs the sites' compute (N = 8, 42)
    "aggregation",      # 5. each strategy's aggregation vs a bare NumPy weighted mean (42 sites)
    "recipe",           # 6. bf16 autocast, target-only logits, short preamble: a local step's speed-ups
    "secagg",           # 7. a Flower round with SecAgg+ vs a plain round: wall, CPU, bytes, error (8, 42)
)

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"

BenchFn = Callable[[bool], list[BenchRow]]


@dataclass
class BenchResult:
    """One benchmark's rows, how long it took, and the error if it failed."""

    rows: list[BenchRow] = field(default_factory=list)
    wall_s: float = 0.0
    error: str = ""


def load_benchmark(name: str) -> BenchFn:
    """``simulations.bench.<name>.run``.

    Raises
    ------
    ValueError
        When the module has no ``run`` function.
    """
    module = importlib.import_module(f"fedmira.simulations.bench.{name}")
    fn = getattr(module, "run", None)
    if not callable(fn):
        raise ValueError(f"simulations/bench/{name}.py has no run(quick: bool) -> list[BenchRow]")
    return fn  # type: ignore[no-any-return]


def run_benchmarks(names: Sequence[str], quick: bool, loader: Callable[[str], BenchFn] = load_benchmark,
                   log: Callable[[str], None] = print) -> dict[str, BenchResult]:
    """Run each benchmark in turn; a failing one is recorded with its traceback, the rest still run."""
    results: dict[str, BenchResult] = {}
    for name in names:
        log(f"[bench] {name} ...")
        start = time.perf_counter()
        result = BenchResult()
        try:
            rows = loader(name)(quick)
            if not all(isinstance(r, BenchRow) for r in rows):
                raise TypeError(f"{name}.run returned something other than a list of BenchRow")
            result.rows = list(rows)
        except Exception:  # noqa: BLE001  (recorded in the results and the exit code, not hidden)
            result.error = traceback.format_exc(limit=8)
            log(result.error)
        result.wall_s = time.perf_counter() - start
        log(f"[bench] {name}: {len(result.rows)} rows in {result.wall_s:.1f} s"
            + (" (FAILED)" if result.error else ""))
        results[name] = result
    return results


# ----------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """Return the CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        return str(importlib.import_module(module).__version__)
    except ImportError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: CPU, threads, device, load, library versions."""
    import torch

    from fedmira.common.model import resolve_device

    device = resolve_device("auto")
    name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
    return {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": name, "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "versions": {m: _version(m) for m in ("torch", "flwr", "transformers", "peft", "numpy")},
    }


# ----------------------------------------------------------------------------------- output
def fmt(x: float | None) -> str:
    """Format a number for a table: thousands separators when large, 3 significant digits when small."""
    if x is None or x != x:  # None or NaN
        return ""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _target_cell(row: BenchRow) -> str:
    if not row.target:
        return ""
    met = row.met
    return f"{row.target} ({'n/a' if met is None else 'met' if met else 'MISSED'})"


def _cells(bench: str, row: BenchRow) -> list[str]:
    return [bench, row.name, fmt(row.value), row.unit, fmt(row.baseline), fmt(row.ratio),
            _target_cell(row), row.note]


HEADER = ["benchmark", "measurement", "value", "unit", "baseline", "ratio", "target", "note"]


def format_table(rows_by_bench: Mapping[str, Sequence[BenchRow]], notes: bool = False) -> str:
    """Return a plain-text table for the terminal (notes only when asked: they are long)."""
    cols = HEADER if notes else HEADER[:-1]
    body = [_cells(b, r)[: len(cols)] for b, rows in rows_by_bench.items() for r in rows]
    widths = [max(len(c) for c in col) for col in zip(cols, *body)]
    right = {"value", "baseline", "ratio"}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                         for c, w, h in zip(cells, widths, cols)).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(c) for c in body)])


def markdown_table(rows_by_bench: Mapping[str, Sequence[BenchRow]]) -> str:
    """Return the rows as a GitHub Markdown table, notes included."""
    body = [_cells(bench, row) for bench, rows in rows_by_bench.items() for row in rows]
    return tables.markdown_table(HEADER, body)


def document(results: Mapping[str, BenchResult], machine: Mapping[str, Any], quick: bool,
             started: datetime, wall_s: float) -> dict[str, Any]:
    """Everything the JSON file holds."""
    return {
        "date": started.isoformat(timespec="seconds"), "quick": quick, "wall_s": round(wall_s, 1),
        "machine": dict(machine),
        "benchmarks": {
            name: {"wall_s": round(r.wall_s, 1), "error": r.error, "rows": [row.to_dict() for row in r.rows]}
            for name, r in results.items()
        },
    }


def markdown(doc: Mapping[str, Any], results: Mapping[str, BenchResult]) -> str:
    """Title line with date and machine, the table, and any failures."""
    m = doc["machine"]
    v = m["versions"]
    head = (f"Benchmarks of {doc['date']}{' (quick)' if doc['quick'] else ''}: {m['cpu']}, "
            f"{m['cpu_count']} CPUs, device {m['device']}, torch {v['torch']}, flwr {v['flwr']}, "
            f"transformers {v['transformers']}, peft {v['peft']}; load average {m['load_average_1m']} "
            f"at start; {doc['wall_s']:.0f} s in all "
            f"({', '.join(f'{k} {r.wall_s:.0f} s' for k, r in results.items())}).")
    table = markdown_table({k: r.rows for k, r in results.items()})
    failed = [f"- `{k}` failed:\n\n```\n{r.error.strip()}\n```" for k, r in results.items() if r.error]
    return "\n\n".join([head, table, *failed]) + "\n"


def write_results(out_dir: Path, doc: Mapping[str, Any], md: str, stamp: str) -> tuple[Path, Path]:
    """``bench-<stamp>.json`` and ``.md`` in ``out_dir`` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"bench-{stamp}.json", out_dir / f"bench-{stamp}.md"
    json_path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    md_path.write_text(md)
    return json_path, md_path


def update_readme(readme: Path, md: str, source: Path) -> None:
    """Replace the text between the bench markers in ``readme`` with ``md``.

    Raises
    ------
    ValueError
        When the markers are missing (the README is not touched then).
    """
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no '{README_START}' ... '{README_END}' block to replace")
    block = (f"{README_START}\n<!-- written by python -m fedmira.simulations.bench.run from {source} -->"
             f"\n\n{md}\n{README_END}")
    readme.write_text(pattern.sub(lambda _: block, text, count=1))


# ----------------------------------------------------------------------------------- CLI
def _quiet_libraries() -> None:
    """No per-tensor loading bars from transformers between the benchmark lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; ``names`` holds the benchmarks to run, in registry order."""
    parser = argparse.ArgumentParser(
        prog="python -m fedmira.simulations.bench.run", description=__doc__.split("\n\n")[0],
        epilog=f"Benchmarks, in order: {', '.join(BENCHMARKS)}. Each row: a value, the baseline measured "
               "beside it, their ratio and, for some, a target the ratio should meet.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and smaller sizes (a smoke run of every benchmark, ~3 minutes)")
    parser.add_argument("--only", default="",
                        help="comma-separated benchmark names to run (default: all, in registry order)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="folder for bench-<date>.json and .md (default: results/)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also replace the table between the bench markers in this README")
    parser.add_argument("--notes", action="store_true", help="print the notes column in the terminal too")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.names = names
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the table, write the files; exit 1 only if a benchmark failed to run."""
    args = parse_args(argv)
    _quiet_libraries()
    started, t0 = datetime.now().astimezone(), time.perf_counter()
    machine = machine_info()
    results = run_benchmarks(args.names, args.quick, log=lambda s: print(s, file=sys.stderr, flush=True))
    doc = document(results, machine, args.quick, started, time.perf_counter() - t0)
    md = markdown(doc, results)
    json_path, md_path = write_results(args.out, doc, md, started.strftime("%Y%m%d-%H%M%S"))
    if args.readme is not None:
        update_readme(args.readme, md, md_path)
    print(md.split("\n\n", 1)[0])
    print(format_table({k: r.rows for k, r in results.items()}, notes=args.notes))
    missed = [f"{k}: {row.name}" for k, res in results.items() for row in res.rows if row.met is False]
    failed = [k for k, r in results.items() if r.error]
    print(f"\nWrote {json_path} and {md_path}.")
    if missed:
        print("Targets missed: " + "; ".join(missed))
    if failed:
        print(f"FAILED to run: {', '.join(failed)} (tracebacks above and in {md_path})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
