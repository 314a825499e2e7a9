"""``fedmira partition out=DIR [overrides]``: write a partition to look at, without training.

Loads the pooled reports and splits them into sites exactly as ``fedmira simulate`` does
(:func:`simulations.launch.load_pooled_reports` and :func:`simulations.launch.split_sites`),
then writes into ``DIR``: one folder per site (``<site_id>/{train,val,test}.jsonl``),
``manifest.json`` (deterministic; its hash identifies the partition), ``summary.csv``,
``summary.md`` and ``sites.png``. Only counts, ids and exam templates are printed or
summarised, never report text.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fedmira.common.config import ExperimentConfig
from fedmira.common.partition import (
    SiteSplit,
    load_pooled_reports,
    plot_sites,
    site_templates,
    split_sites,
    summarize,
    write_manifest,
    write_site_folders,
)
from fedmira.common.tables import markdown_table

MANIFEST = "manifest.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
PLOT = "sites.png"
# Largest templates named in the printed summary (the full list is in the manifest).
TEMPLATES_SHOWN = 5


def run_partition(cfg: ExperimentConfig, out_dir: str | Path, *,
                  out: TextIO | None = None) -> dict[str, Any]:
    """Partition the configured reports and write site folders, manifest, summaries and plot.

    Parameters
    ----------
    cfg : ExperimentConfig
        Uses ``data`` (what to load) and ``partition`` (how to split), like ``simulate``.
    out_dir : str or Path
        Output folder; created if missing. Existing files of the same names are replaced.
    out : text stream, optional
        Where to print the summary (default: ``sys.stdout`` at call time).

    Returns
    -------
    dict
        See :func:`write_partition`; ``method`` is ``cfg.partition.method``.
    """
    stream = sys.stdout if out is None else out
    started = time.perf_counter()
    reports = load_pooled_reports(cfg, out=stream)
    splits = split_sites(cfg, reports)
    extra: dict[str, Any] = {"lock_hash": cfg.lock_hash(), "method": cfg.partition.method,
                             "partition": dataclasses.asdict(cfg.partition)}
    if cfg.partition.method == "template":
        extra["templates"] = site_templates(splits)
    return write_partition(splits, out_dir, seed=cfg.partition.seed, extra=extra, out=stream,
                           started=started)


def write_partition(splits: list[SiteSplit], out_dir: str | Path, *, seed: int,
                    extra: dict[str, Any], out: TextIO | None = None,
                    started: float | None = None) -> dict[str, Any]:
    """Write a partition's site folders, manifest, summaries and plot; print a summary.

    Parameters
    ----------
    splits : list[SiteSplit]
        The partition.
    out_dir : str or Path
        Output folder; created if missing.
    seed : int
        Partition seed, recorded in the manifest.
    extra : dict
        Manifest metadata; ``method`` is printed and, when present, ``templates`` (site id ->
        template) adds a ``template`` column to the summaries.
    out : text stream, optional
        Where to print (default: ``sys.stdout`` at call time).
    started : float, optional
        ``time.perf_counter()`` at the start of the work, for the reported duration.

    Returns
    -------
    dict
        ``manifest_hash``, ``method``, ``sites``, ``external_sites`` (count), ``reports``,
        ``site_sizes`` (``min``, ``median``, ``max``), ``seconds`` and ``paths`` (``out_dir``,
        ``manifest``, ``summary_csv``, ``summary_md``, ``plot``).
    """
    stream = sys.stdout if out is None else out
    started = time.perf_counter() if started is None else started
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _warn_stale(root, splits, stream)
    write_site_folders(splits, root)
    paths = {"out_dir": root, "manifest": root / MANIFEST, "summary_csv": root / SUMMARY_CSV,
             "summary_md": root / SUMMARY_MD, "plot": root / PLOT}
    digest = write_manifest(splits, paths["manifest"], seed=seed, extra=extra)
    rows = _summary_rows(splits, extra.get("templates"))
    _write_csv(rows, paths["summary_csv"])
    paths["summary_md"].write_text(summary_markdown(rows, title=_title(extra, digest)),
                                   encoding="utf-8")
    plot_sites(splits, paths["plot"])
    sizes = [len(s.train) + len(s.val) + len(s.test) for s in splits]
    result: dict[str, Any] = {
        "manifest_hash": digest, "method": extra.get("method"), "sites": len(splits),
        "external_sites": sum(s.external for s in splits), "reports": sum(sizes),
        "site_sizes": {"min": min(sizes), "median": statistics.median(sizes),
                       "max": max(sizes)},
        "seconds": round(time.perf_counter() - started, 2),
        "paths": {k: str(v) for k, v in paths.items()},
    }
    _print_summary(result, splits, extra.get("templates"), stream)
    return result


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def _summary_rows(splits: list[SiteSplit], templates: dict[str, str] | None) -> list[dict[str, Any]]:
    """:func:`summarize` rows, with a ``template`` column after ``site_id`` when known."""
    rows = summarize(splits)
    if not templates:
        return rows
    return [{"site_id": r["site_id"], "template": templates.get(r["site_id"], ""),
             **{k: v for k, v in r.items() if k != "site_id"}} for r in rows]


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows as CSV with a header (csv module: template text is quoted if it needs to be)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def _title(extra: dict[str, Any], digest: str) -> str:
    """Heading of ``summary.md``: method and manifest hash."""
    return f"Partition `{extra.get('method', '?')}` (manifest {digest})"


def _cell(value: Any) -> str:
    """Return a table cell's value: booleans as yes / blank (markdown_table escapes ``|``)."""
    if isinstance(value, bool):
        return "yes" if value else ""
    return str(value)


def summary_markdown(rows: list[dict[str, Any]], *, title: str = "Partition") -> str:
    """Summary rows as a Markdown document: a heading and one table row per site.

    Parameters
    ----------
    rows : list[dict]
        Rows with the same keys (e.g. :func:`common.partition.summarize`).
    title : str
        Level-1 heading.

    Returns
    -------
    str
        Markdown text ending in a newline.
    """
    lines = [f"# {title}", ""]
    if rows:
        cols = list(rows[0])
        body = [[_cell(r[c]) for c in cols] for r in rows]
        lines.append(markdown_table(cols, body))
    return "\n".join(lines) + "\n"


def _warn_stale(root: Path, splits: list[SiteSplit], stream: TextIO) -> None:
    """Say when ``root`` holds site folders of another partition (they are not deleted)."""
    current = {s.site_id for s in splits}
    stale = sorted(p.name for p in root.iterdir()
                   if p.is_dir() and (p / "train.jsonl").is_file() and p.name not in current)
    if stale:
        print(f"note: {len(stale)} site folders in {root} are not part of this partition "
              f"(e.g. {', '.join(stale[:3])}); delete them or use a new out dir.", file=stream)


def _print_summary(result: dict[str, Any], splits: list[SiteSplit],
                   templates: dict[str, str] | None, stream: TextIO) -> None:
    """Print a few lines: method, counts, split totals, site sizes, largest templates, paths."""
    totals = {name: sum(len(getattr(s, name)) for s in splits if not s.external)
              for name in ("train", "val", "test")}
    external = sum(len(s.test) for s in splits if s.external)
    size = result["site_sizes"]
    print(f"partition {result['method']}: {result['sites']} sites "
          f"({result['external_sites']} external), {result['reports']} reports; "
          f"train {totals['train']}, val {totals['val']}, test {totals['test']}, "
          f"external {external}; site size min {size['min']}, median {size['median']}, "
          f"max {size['max']}; manifest {result['manifest_hash']} "
          f"({result['seconds']} s)", file=stream)
    if templates:
        by_size = sorted(splits, key=lambda s: -(len(s.train) + len(s.val) + len(s.test)))
        for split in by_size[:TEMPLATES_SHOWN]:
            n = len(split.train) + len(split.val) + len(split.test)
            print(f"  {split.site_id:<14} {n:>6}  {templates.get(split.site_id, '')}",
                  file=stream)
    for key, path in result["paths"].items():
        print(f"  {key:<12} {path}", file=stream)
