"""``fedmira reader-study create | serve | analyze``: radiologists judge the impressions, blinded.

* ``create`` reads the cases (a ``fedmira compare`` folder, or a cases JSONL file), designs the
  study (``common.reader_design``) and writes the study folder: ``study.sqlite`` and
  ``tokens.csv`` (each reader's secret login link, readable by the owner only; the database keeps
  only hashes).
* ``serve`` runs the reading page (``simulations.reader_study_web``) on 127.0.0.1 unless told
  otherwise; a non-loopback address needs TLS (the deployment's certificates).
* ``analyze`` writes ``STUDY/analysis/``: report.md, summary.json, judgments.csv, drafts.csv and
  shares.png (``common.reader_analysis``).

Only counts, ids and paths reach the console; report text stays in the study folder.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from fedmira.common.errors import DataError
from fedmira.common.reader_design import REFERENCE, Case, Reader, StudySettings, design_study
from fedmira.common.reader_store import create_store

TOKENS_FILE = "tokens.csv"


def cases_from_compare(folder: Path) -> list[Case]:
    """Return the cases of a ``fedmira compare`` output folder: ``cases.jsonl`` + ``predictions/*.jsonl``.

    Raises
    ------
    DataError
        A missing file, or predictions that do not cover the same reports.
    """
    from fedmira.common.compare import CASES_FILE, PREDICTIONS_DIR
    from fedmira.common.reports import load_reports

    cases_path = folder / CASES_FILE
    if not cases_path.is_file():
        raise DataError(
            f"{cases_path}: not found. Run `fedmira compare` again (it writes {CASES_FILE} since "
            "this version), or pass --cases FILE."
        )
    reports = load_reports(cases_path, policy="fail").reports
    systems: dict[str, dict[str, str]] = {}
    for path in sorted((folder / PREDICTIONS_DIR).glob("*.jsonl")):
        systems[path.stem] = _predictions(path)
    if not systems:
        raise DataError(f"{folder / PREDICTIONS_DIR}: no <system>.jsonl files; is {folder} a compare folder?")
    out = []
    for i, r in enumerate(reports):
        missing = [s for s, preds in systems.items() if r.report_id not in preds]
        if missing:
            raise DataError(
                f"{folder / PREDICTIONS_DIR / (missing[0] + '.jsonl')}: no prediction for report "
                f"{r.report_id}; the folder mixes two compare runs. Run `fedmira compare` again."
            )
        out.append(
            Case(
                f"c{i + 1:04d}",
                r.report_id,
                r.site_id,
                r.modality,
                r.findings,
                r.impression,
                {s: preds[r.report_id] for s, preds in systems.items()},
            )
        )
    return out


def _predictions(path: Path) -> dict[str, str]:
    out = {}
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            try:
                row = json.loads(line)
                out[str(row["report_id"])] = str(row["impression"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{path}:{line_no}: not a prediction line with report_id and impression "
                    f"({type(exc).__name__}); rerun `fedmira compare`."
                ) from exc
    return out


def cases_from_file(path: Path) -> list[Case]:
    """Return the cases of a JSONL file.

    Each line: ``report_id, site_id, modality, findings, reference, candidates: {system: text}``.

    Raises
    ------
    DataError
        Naming the file, line and field that is wrong.
    """
    out = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg}).") from exc
            for key in ("report_id", "site_id", "modality", "findings", "reference", "candidates"):
                if key not in row:
                    raise DataError(
                        f"{path}:{line_no}: field {key} is missing; each line needs report_id, "
                        "site_id, modality, findings, reference and candidates {system: impression}."
                    )
            cands = row["candidates"]
            if not isinstance(cands, dict) or not all(isinstance(v, str) for v in cands.values()):
                raise DataError(f"{path}:{line_no}: field candidates must map system names to impressions.")
            if REFERENCE in cands:
                raise DataError(
                    f"{path}:{line_no}: field candidates: {REFERENCE!r} is the radiologist's own "
                    "impression (field reference); rename that system."
                )
            out.append(
                Case(
                    f"c{len(out) + 1:04d}",
                    str(row["report_id"]),
                    str(row["site_id"]),
                    str(row["modality"]),
                    str(row["findings"]),
                    str(row["reference"]),
                    dict(cands),
                )
            )
    if not out:
        raise DataError(f"{path}: no cases.")
    return out


def parse_readers(specs: Sequence[str], readers_file: Path | None) -> list[Reader]:
    """``NAME[@CENTRE]`` arguments and/or a CSV with columns ``name,centre``."""
    readers = []
    for spec in specs:
        name, _, centre = spec.partition("@")
        readers.append(Reader(name.strip(), centre.strip()))
    if readers_file is not None:
        with readers_file.open(encoding="utf-8", newline="") as handle:
            for line_no, row in enumerate(csv.DictReader(handle), 2):
                if not (row.get("name") or "").strip():
                    raise DataError(f"{readers_file}:{line_no}: field name is empty (columns: name,centre).")
                readers.append(Reader(row["name"].strip(), (row.get("centre") or "").strip()))
    return readers


def parse_arms(specs: Sequence[str], systems: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``A:B`` arguments; none: every system against the reference."""
    if not specs:
        return tuple((s, REFERENCE) for s in systems)
    arms = []
    for spec in specs:
        a, sep, b = spec.partition(":")
        if not sep or not a or not b:
            raise DataError(f"--arm {spec!r}: write SYSTEM:OTHER, e.g. fedavg:reference or fedavg:central.")
        arms.append((a, b))
    return tuple(arms)


def create(args: Any, out: TextIO | None = None) -> int:
    """``fedmira reader-study create``; returns the exit code."""
    out = out or sys.stdout
    cases = cases_from_compare(Path(args.compare)) if args.compare else cases_from_file(Path(args.cases))
    systems = sorted({s for c in cases for s in c.candidates})
    settings = StudySettings(
        arms=parse_arms(args.arm, systems),
        pairwise_cases=args.n_cases,
        draft_cases=args.draft_cases,
        draft_system=args.draft_system or "",
        readers_per_item=args.readers_per_item,
        seed=args.seed,
    )
    readers = parse_readers(args.reader, Path(args.readers) if args.readers else None)
    design = design_study(cases, readers, settings)
    folder = Path(args.out)
    tokens = create_store(folder, design)
    path = folder / TOKENS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the owner only
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "centre", "token", "link"])
        for r in readers:
            writer.writerow([r.name, r.centre, tokens[r.name], f"/#token={tokens[r.name]}"])
    per_reader = {r.name: sum(1 for t in design.tasks if t.reader == i) for i, r in enumerate(readers)}
    print(
        f"Study: {folder} ({len(design.cases)} cases, {len(design.tasks)} tasks, arms: "
        f"{', '.join(f'{a} vs {b}' for a, b in settings.arms)})",
        file=out,
    )
    print("Tasks per reader: " + ", ".join(f"{n} {c}" for n, c in per_reader.items()), file=out)
    print(
        f"Each reader's login link is in {path} (readable by you only; the database keeps only hashes). "
        f"Give reader X the link http(s)://HOST:PORT/#token=... of their row.",
        file=out,
    )
    print(f"Next: fedmira reader-study serve {folder}", file=out)
    return 0


def analyze_cmd(args: Any, out: TextIO | None = None) -> int:
    """``fedmira reader-study analyze``; returns the exit code."""
    out = out or sys.stdout
    from fedmira.common.reader_analysis import analyze, report_markdown, write_report
    from fedmira.common.reader_store import connect, load_all, settings_of

    folder = Path(args.study)
    conn = connect(folder)
    data, settings = load_all(conn), settings_of(conn)
    result = analyze(data, settings, seed=settings.seed)
    paths = write_report(Path(args.out) if args.out else folder / "analysis", result, data, settings)
    print(report_markdown(result), file=out)
    for key, path in paths.items():
        print(f"  {key}: {path}", file=out)
    return 0


def serve_cmd(args: Any, out: TextIO | None = None) -> int:
    """``fedmira reader-study serve``; returns the exit code when the server stops."""
    out = out or sys.stdout
    from fedmira.simulations.reader_study_web import serve

    return serve(
        Path(args.study),
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        out=out,
    )
