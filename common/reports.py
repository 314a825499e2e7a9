"""The canonical radiology report record.

A report is what one hospital holds for one exam: ids, where it was made (site), what exam it
was (modality, body part, free-text exam description) and the two sections fedmira learns to
map: ``findings`` -> ``impression``. Optional demographics are kept for patient-level privacy
units and subgroup evaluation; they never enter prompts.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from fedmira.common.errors import ConfigError, DataError, FedmiraError

# DICOM modality codes (plus MR spelled as radiologists do). DR/CR are radiographs.
MODALITIES: tuple[str, ...] = ("CT", "MR", "DR", "CR", "US", "MG", "NM", "PT", "XA", "RF", "OT", "UN")

# Human-readable names used in prompts.
MODALITY_NAMES: dict[str, str] = {
    "CT": "CT",
    "MR": "MRI",
    "DR": "radiograph",
    "CR": "radiograph",
    "US": "ultrasound",
    "MG": "mammogram",
    "NM": "nuclear medicine",
    "PT": "PET",
    "XA": "angiography",
    "RF": "fluoroscopy",
    "OT": "other",
    "UN": "unknown modality",  # an export without a modality column (not a DICOM code)
}


@dataclass(frozen=True)
class Report:
    """One radiology report in fedmira's canonical form."""

    report_id: str
    site_id: str
    modality: str
    body_part: str
    exam: str
    findings: str
    impression: str
    patient_id: str | None = None
    age: int | None = None
    sex: str | None = None
    study_date: str | None = None
    labels: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------------------------
# Problems found while reading a report file
# ---------------------------------------------------------------------------------------------

#: Every code a :class:`Problem` can carry.
PROBLEM_CODES: tuple[str, ...] = (
    "missing_field",
    "empty_field",
    "bad_utf8",
    "malformed_line",
    "too_long",
    "duplicate_id",
    "unknown_modality",
    "bad_value",
)

FORMATS: tuple[str, ...] = ("jsonl", "csv", "iu")
POLICIES: tuple[str, ...] = ("skip", "fail")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one row of a report file.

    Messages name files, lines, ids, fields and sizes but never report text: problems are
    printed, logged and may leave the hospital in a support request.

    Attributes
    ----------
    path : str
        The report file, as given to :func:`load_reports`.
    line : int or None
        1-based physical line where the row starts (``None`` for file-level problems).
    report_id : str or None
        The row's report id when it could be read.
    field : str or None
        The field (column or JSON key) at fault, when there is one.
    code : str
        One of :data:`PROBLEM_CODES`.
    message : str
        What is wrong and what to do about it.
    """

    path: str
    line: int | None
    report_id: str | None
    field: str | None
    code: str
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        if self.report_id is not None:
            where += f" (report {_clip(self.report_id, 64)})"
        return f"{where}: {self.message}"


@dataclass
class LoadResult:
    """The usable reports of a file and everything that was wrong with the rest.

    Attributes
    ----------
    reports : list of Report
        Rows that passed every check, in file order.
    problems : list of Problem
        Problems in file order; a skipped row has at least one.
    rows_total : int
        Data rows (records) seen, header and blank lines excluded.
    path : str
        The file read.
    format : str
        The format actually used: ``jsonl``, ``csv`` or ``iu``.
    """

    reports: list[Report]
    problems: list[Problem]
    rows_total: int
    path: str
    format: str

    @property
    def rows_skipped(self) -> int:
        """Rows that did not become a report."""
        return self.rows_total - len(self.reports)


# ---------------------------------------------------------------------------------------------
# Field rules
# ---------------------------------------------------------------------------------------------

_REQUIRED: tuple[str, ...] = (
    "report_id", "site_id", "modality", "body_part", "exam", "findings", "impression",
)
_OPTIONAL: tuple[str, ...] = ("patient_id", "age", "sex", "study_date", "labels")
# What a bare RIS export must have: an id (under any of these names), findings, impression.
_ID_NAMES: tuple[str, ...] = ("report_id", "id", "accession", "accession_number")
_MINIMAL: tuple[str, ...] = ("findings", "impression")
# Fields an export may not have at all, and what they are then (a field it has but leaves
# blank is still reported: that is a broken export, not a bare one). site_id: see _Context.
_ABSENT_DEFAULTS: dict[str, str] = {"modality": "UN", "body_part": "unknown", "exam": "unknown"}
# Bounds checked on the raw bytes before a JSONL line is parsed: json recurses per nesting level
# (100k "[" raise RecursionError) and holds the whole line in memory.
MAX_JSON_DEPTH = 64
# The exam description and body part are context for the prompt; many exports leave them blank.
_MAY_BE_EMPTY: frozenset[str] = frozenset({"body_part", "exam"})
# max_chars guards the two texts that enter prompts and targets.
_LENGTH_CHECKED: tuple[str, ...] = ("findings", "impression")

# The IU header is uid,MeSH,Problems,image,indication,comparison,findings,impression; these
# are the columns used (matched case-insensitively).
_IU_REQUIRED: tuple[str, ...] = ("uid", "problems", "image", "findings", "impression")
# Problems in IU files name the IU column, which is what the user sees in the file.
_IU_FIELD_NAMES: dict[str, str] = {"report_id": "uid", "exam": "image", "labels": "Problems"}

# Spellings seen in exports, keyed with spaces, '-' , '_' and '/' removed and upper-cased.
_MODALITY_SYNONYMS: dict[str, str] = {
    "UNKNOWN": "UN",
    "MRI": "MR",
    "XR": "DR",
    "XRAY": "DR",
    "RADIOGRAPH": "DR",
    "RADIOGRAPHY": "DR",
    "CXR": "DR",
    "DX": "DR",
    "CTSCAN": "CT",
    "PET": "PT",
    "PETCT": "PT",
    "ULTRASOUND": "US",
    "MAMMOGRAM": "MG",
    "MAMMOGRAPHY": "MG",
}

_AGE_RANGE: tuple[int, int] = (0, 150)
# Lone surrogates come from undecodable bytes (surrogateescape) or from "\\udXXX" JSON escapes;
# either way the text cannot be written back as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def normalize_modality(value: str) -> str | None:
    """Map a modality as written in a file to a code of :data:`MODALITIES`.

    Parameters
    ----------
    value : str
        E.g. ``"ct"``, ``"MRI"``, ``"X-ray"``.

    Returns
    -------
    str or None
        The DICOM code, or ``None`` if the value is not recognised.
    """
    key = re.sub(r"[\s_/-]", "", value).upper()
    if key in MODALITIES:
        return key
    return _MODALITY_SYNONYMS.get(key)


def _clip(value: str, limit: int) -> str:
    """Shorten ``value`` to ``limit`` characters, marking the cut."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Reading context: collects problems and applies the policy
# ---------------------------------------------------------------------------------------------


@dataclass
class _Context:
    """Per-file state shared by the format readers and the row checks."""

    path: str
    policy: str
    max_chars: int
    site_id: str | None
    #: Site of rows without a site_id field: ``site_id`` when given, else the file's stem (a
    #: file without the field is one hospital's export).
    default_site: str = ""
    field_names: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    seen_ids: dict[str, int] = field(default_factory=dict)

    def report(
        self, line: int | None, report_id: str | None, fld: str | None, code: str, message: str
    ) -> None:
        """Record a problem; under ``policy="fail"`` stop the whole load right here."""
        shown = None if fld is None else self.field_names.get(fld, fld)
        problem = Problem(self.path, line, report_id, shown, code, message)
        self.problems.append(problem)
        if self.policy == "fail":
            raise DataError(str(problem))

    def name(self, fld: str) -> str:
        """Return the field's name as it appears in the file."""
        return self.field_names.get(fld, fld)


# Problems of one row before they are reported: (canonical field, code, message).
_Found = list[tuple[str, str, str]]


@dataclass(frozen=True)
class _Row:
    """One record: its starting line and raw values keyed by canonical field name."""

    line: int
    values: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Public API: loading
# ---------------------------------------------------------------------------------------------


def load_reports(
    path: str | Path,
    *,
    fmt: str = "auto",
    policy: str = "skip",
    max_chars: int = 20000,
    site_id: str | None = None,
) -> LoadResult:
    """Read a report file, checking every row.

    Parameters
    ----------
    path : str or Path
        JSONL, canonical CSV or IU/Open-i CSV file.
    fmt : str
        ``auto`` (by extension and CSV header), ``jsonl``, ``csv`` or ``iu``.
    policy : str
        ``skip``: drop bad rows and collect their problems; ``fail``: raise at the first one.
    max_chars : int
        Rows whose findings or impression are longer than this are dropped (``too_long``).
    site_id : str, optional
        Site of the IU rows (default ``"iu"``); for JSONL/CSV, used for rows whose site_id is
        empty or absent (absent without it: the file's stem).

    A bare export needs only an id (``report_id``, ``id``, ``accession`` or
    ``accession_number``), ``findings`` and ``impression``: an absent ``modality`` is ``UN``
    (unknown), an absent ``body_part`` / ``exam`` is ``"unknown"``. A JSONL line longer than
    ``12 x max_chars + 64 KiB`` bytes or nested deeper than :data:`MAX_JSON_DEPTH` is refused
    before it is parsed.

    Returns
    -------
    LoadResult
        The usable reports and the problems of the others.

    Raises
    ------
    DataError
        The file is missing, is a directory, cannot be read or its layout is unknown; or,
        with ``policy="fail"``, any row has a problem.
    ConfigError
        ``fmt`` or ``policy`` is not one of the allowed values.
    """
    _check_args(fmt, policy, max_chars)
    file = Path(path)
    data = _read_bytes(file)
    ctx = _Context(str(path), policy, max_chars, site_id, default_site=site_id or file.stem)
    if fmt == "jsonl" or (fmt == "auto" and file.suffix.lower() in (".jsonl", ".ndjson")):
        return _finish(ctx, "jsonl", _jsonl_rows(data, ctx))
    if fmt == "auto" and file.suffix.lower() != ".csv":
        raise DataError(
            f"Cannot tell the format of {path} from its extension {file.suffix or '(none)'!r}; "
            "name it .jsonl, .ndjson or .csv, or set data.format to jsonl, csv or iu."
        )
    text = data.decode("utf-8", errors="surrogateescape")
    _allow_csv_fields(len(text) + 1)
    reader, lines, header = _open_csv(text, ctx)
    resolved = _csv_layout(header, fmt, ctx.path)
    if resolved == "iu":
        ctx.field_names = dict(_IU_FIELD_NAMES)
    return _finish(ctx, resolved, _csv_rows(reader, lines, header, resolved, ctx))


def read_jsonl(path: str | Path, **kwargs: Any) -> LoadResult:
    """Read a JSONL report file; :func:`load_reports` with ``fmt="jsonl"``."""
    return load_reports(path, fmt="jsonl", **kwargs)


def write_jsonl(reports: Iterable[Report], path: str | Path) -> None:
    """Write reports as UTF-8 JSONL, one object per line, fields in :class:`Report` order.

    The file is written next to its destination and renamed into place, so a crash never
    leaves a half-written file that would later load as "cut off".

    Parameters
    ----------
    reports : iterable of Report
        Reports to write.
    path : str or Path
        Destination; parent folders are created.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as handle:
        for report in reports:
            record = {f.name: getattr(report, f.name) for f in fields(Report)}
            record["labels"] = list(report.labels)
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, dest)


def _check_args(fmt: str, policy: str, max_chars: int) -> None:
    """Reject option values early, naming the config key they come from."""
    if fmt not in ("auto", *FORMATS):
        raise ConfigError(
            f"data.format must be one of auto, jsonl, csv, iu; got {_clip(str(fmt), 32)!r}."
        )
    if policy not in POLICIES:
        raise ConfigError(f"data.policy must be skip or fail; got {_clip(str(policy), 32)!r}.")
    if not isinstance(max_chars, int) or max_chars < 1:
        raise ConfigError(f"data.max_chars must be a positive integer; got {max_chars!r}.")


def _read_bytes(path: Path) -> bytes:
    """Read the whole file as bytes, turning OS errors into a DataError that says what to do."""
    if path.is_dir():
        raise DataError(
            f"Report file {path} is a directory. Set data.path to a .jsonl or .csv file inside it."
        )
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"Report file not found: {path}. Check data.path (relative paths start from the "
            "current directory), or leave it empty to use the synthetic corpus."
        ) from None
    except OSError as err:
        raise DataError(f"Cannot read report file {path}: {err.strerror}. Check its permissions.") from None


def _finish(ctx: _Context, fmt: str, rows: Iterator[_Row | None]) -> LoadResult:
    """Check every row and gather the result; ``None`` rows were already reported."""
    reports: list[Report] = []
    total = 0
    for row in rows:
        total += 1
        report = None if row is None else _to_report(row, ctx)
        if report is not None:
            reports.append(report)
    return LoadResult(reports, ctx.problems, total, ctx.path, fmt)


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------


def _jsonl_rows(data: bytes, ctx: _Context) -> Iterator[_Row | None]:
    """Yield one row per non-blank line; undecodable or non-JSON lines are reported as None."""
    # Split on b"\n" only: U+2028 and friends are legal inside JSON strings.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if not raw.strip():
            continue
        yield _jsonl_row(raw, number, ctx)


def _json_depth(raw: bytes, limit: int) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text outside strings, stopping once past ``limit``."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _line_bounded(raw: bytes, number: int, ctx: _Context) -> bool:
    """Whether a line is small and flat enough to parse; else report it (no text quoted)."""
    longest = 12 * ctx.max_chars + 65536  # two texts as \uXXXX escapes, plus the other fields
    if len(raw) > longest:
        ctx.report(number, None, None, "line_too_long",
                   f"line has {len(raw):,} bytes, more than {longest:,} (12 x data.max_chars + 64 KiB); "
                   "it cannot be a report: fix the export or delete the line.")
        return False
    # Counting first keeps the scan off ordinary lines.
    if (raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH
            and _json_depth(raw, MAX_JSON_DEPTH) > MAX_JSON_DEPTH):
        ctx.report(number, None, None, "too_deep",
                   f"line nests JSON arrays/objects more than {MAX_JSON_DEPTH} levels deep; a report "
                   "is one flat object: fix the export or delete the line.")
        return False
    return True


def _jsonl_row(raw: bytes, number: int, ctx: _Context) -> _Row | None:
    """Decode and parse one JSONL line."""
    if not _line_bounded(raw, number, ctx):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        ctx.report(number, None, None, "bad_utf8",
                   f"line is not valid UTF-8 (bad byte at byte {err.start + 1}); "
                   "re-save the file as UTF-8 or fix the line.")
        return None
    try:
        obj = json.loads(text)
    except RecursionError:  # deep nesting the byte scan missed (it stops at the limit)
        ctx.report(number, None, None, "too_deep",
                   f"line nests JSON more than {MAX_JSON_DEPTH} levels deep; fix it or delete it.")
        return None
    except json.JSONDecodeError as err:
        # err.msg is a parser message such as "Unterminated string"; it never quotes the text.
        ctx.report(number, None, None, "malformed_line",
                   f"not valid JSON ({err.msg} at column {err.colno}); the line may be cut off: "
                   "fix it or delete it.")
        return None
    if not isinstance(obj, dict):
        ctx.report(number, None, None, "malformed_line",
                   f"line is a JSON {_json_type(obj)}, not an object; write one JSON object "
                   "with the report fields per line.")
        return None
    return _Row(number, obj)


# ---------------------------------------------------------------------------------------------
# CSV (canonical and IU)
# ---------------------------------------------------------------------------------------------


def _allow_csv_fields(size: int) -> None:
    """Raise csv's field size limit (131072 by default) to ``size`` if it is lower.

    With the default limit a quote left open mid-file makes csv fail part-way through the
    swallowed text and then parse the rest line by line, burying the one real problem under
    thousands of bogus ones. With no practical limit the open quote runs to EOF and is reported
    once. The limit is process-wide, so it is only ever raised, never lowered again, which keeps
    concurrent loads safe; it bounds nothing else that matters here (``max_chars`` does).
    """
    if csv.field_size_limit() < size:
        csv.field_size_limit(min(size, sys.maxsize))


def _open_csv(text: str, ctx: _Context) -> tuple[Any, list[str], list[str]]:
    """Start a CSV reader over physical lines and read the header (lower-cased, stripped)."""
    # newline="" keeps "\r\n" inside quoted fields intact and splits lines the way csv expects.
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(lines)
    for header in reader:
        if not any(cell.strip() for cell in header):
            continue
        if _SURROGATE.search("".join(header)):
            raise DataError(f"The header of {ctx.path} is not valid UTF-8. Re-save the file as UTF-8.")
        names = [cell.strip().lstrip("\ufeff").strip().lower() for cell in header]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(
                f"The header of {ctx.path} repeats column(s) {_shown_header(dupes)}. Keep one of each."
            )
        return reader, lines, names
    raise DataError(f"{ctx.path} is empty: it has no CSV header. Export the reports again.")


def _csv_layout(header: list[str], fmt: str, path: str) -> str:
    """Decide between canonical CSV and the IU layout, or explain which columns are missing."""
    have = set(header)
    canonical = all(col in have for col in _MINIMAL) and any(n in have for n in _ID_NAMES)
    iu = all(col in have for col in _IU_REQUIRED)
    if fmt in ("csv", "auto") and canonical:
        return "csv"
    if fmt in ("iu", "auto") and iu:
        return "iu"
    bare = ("report_id", *_MINIMAL)  # the id may also be id, accession or accession_number
    wanted = {"csv": [bare], "iu": [_IU_REQUIRED], "auto": [bare, _IU_REQUIRED]}[fmt]
    expected = " or ".join(",".join(cols) for cols in wanted)
    missing = ",".join(c for c in wanted[0] if c not in have)
    optional = "" if fmt == "iu" else (f"; the id may be named {', '.join(_ID_NAMES[1:])}; canonical CSV "
                                       f"may add site_id,modality,body_part,exam,{','.join(_OPTIONAL)}")
    raise DataError(
        f"{path} does not have the columns of a fedmira report CSV. Expected a header with "
        f"{expected} (any order{optional}); found: "
        f"{_shown_header(header)} (missing {missing}). Rename the columns or set data.format."
    )


def _shown_header(names: list[str]) -> str:
    """Header names for a message, unless the first line looks like data rather than names.

    A file exported without a header has a report as its first line; echoing it would put
    report text into an error message.
    """
    if all(re.fullmatch(r"[a-z_][\w-]{0,31}", n) for n in names if n) and len(names) <= 64:
        return ",".join(names)
    return f"{len(names)} columns whose first line does not look like a header (is the header missing?)"


def _csv_rows(
    reader: Any, lines: list[str], header: list[str], layout: str, ctx: _Context
) -> Iterator[_Row | None]:
    """Yield one row per CSV record with the line where it starts.

    ``reader`` is a ``csv.reader`` (its type is private); ``reader.line_num`` counts the
    physical lines consumed so far, so a record spans ``previous line_num + 1 .. line_num``.
    """
    end = reader.line_num
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            # e.g. "field larger than field limit": a quote left open swallowing later rows.
            end = reader.line_num
            ctx.report(start, None, None, "malformed_line",
                       f"cannot parse this CSV record ({err}); a quote may be left open here. "
                       "Fix the quoting of this row.")
            yield None
            continue
        end = reader.line_num
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue  # blank line
        yield _csv_record(cells, start, end, lines, header, layout, ctx)


def _csv_record(
    cells: list[str],
    start: int,
    end: int,
    lines: list[str],
    header: list[str],
    layout: str,
    ctx: _Context,
) -> _Row | None:
    """Check one CSV record's shape and map it to canonical fields."""
    if end == len(lines) and _quote_left_open("".join(lines[start - 1:end])):
        ctx.report(start, None, None, "malformed_line",
                   f"a quoted field starting in this row is never closed, so lines {start}-{end} "
                   "(the rest of the file) were read as one row: the file may be cut off or a "
                   "quote is missing. Re-export the file or close the quote.")
        return None
    if len(cells) != len(header):
        # A row spanning lines is usually a stray quote that joined rows: say where it ends.
        span = f" (it spans lines {start}-{end})" if end > start else ""
        ctx.report(start, None, None, "malformed_line",
                   f"row has {len(cells)} column{'s' if len(cells) != 1 else ''} but the header "
                   f"has {len(header)}{span}; quote fields that contain commas or line breaks, or "
                   "fix the row.")
        return None
    named = dict(zip(header, cells))
    return _Row(start, _iu_values(named, ctx) if layout == "iu" else _canonical_csv_values(named))


def _quote_left_open(record: str) -> bool:
    """Whether a record ends inside a quoted field (a cut-off file).

    The lenient reader used for the file swallows everything up to EOF into such a field; a
    strict re-read of just this record turns that into an error we can detect.
    """
    try:
        for _ in csv.reader(io.StringIO(record, newline=""), strict=True):
            pass
    except csv.Error as err:
        return "unexpected end of data" in str(err)
    return False


def _canonical_csv_values(named: dict[str, str]) -> dict[str, Any]:
    """Canonical CSV cells keyed by field; optional columns that are blank count as absent."""
    values: dict[str, Any] = {k: named[k] for k in (*_REQUIRED, *_ID_NAMES[1:]) if k in named}
    for key in _OPTIONAL:
        if key in named and named[key].strip():
            values[key] = named[key]
    return values


def _iu_values(named: dict[str, str], ctx: _Context) -> dict[str, Any]:
    """Map an IU/Open-i row to canonical fields: every report is a chest radiograph."""
    uid = named["uid"].strip()
    return {
        "report_id": f"iu-{uid}" if uid else "",
        "site_id": ctx.site_id or "iu",
        "modality": "DR",
        "body_part": "chest",
        "exam": named["image"],
        "findings": named["findings"],
        "impression": named["impression"],
        "labels": named["problems"],
    }


# ---------------------------------------------------------------------------------------------
# Row checks shared by all formats
# ---------------------------------------------------------------------------------------------


def _to_report(row: _Row, ctx: _Context) -> Report | None:
    """Validate one row; report every problem it has and return a Report only if none."""
    values = _with_defaults(row.values, ctx)
    if ctx.site_id and _is_blank(values.get("site_id")):
        values = {**values, "site_id": ctx.site_id}
    if not _encoding_ok(row.line, values, ctx):
        return None
    found: _Found = []
    rid = _text_field(values, "report_id", found, ctx)
    texts = {name: _text_field(values, name, found, ctx) for name in _REQUIRED[1:]}
    modality = _modality(texts["modality"], found)
    optional = _optional_fields(values, found, ctx)
    for name in _LENGTH_CHECKED:
        text = texts[name]
        if text is not None and len(text) > ctx.max_chars:
            found.append((name, "too_long",
                          f"field '{ctx.name(name)}' has {len(text)} characters, more than "
                          f"max_chars={ctx.max_chars}; shorten it, drop the row or raise data.max_chars."))
    if not found and rid in ctx.seen_ids:
        found.append(("report_id", "duplicate_id",
                      f"{ctx.name('report_id')} is already used by the report on line "
                      f"{ctx.seen_ids[rid]}; "
                      "give every report a unique id or drop the duplicate."))
    for fld, code, message in found:
        ctx.report(row.line, rid or None, fld, code, message)
    if found:
        return None
    present = {name: text for name, text in texts.items() if text is not None}
    assert rid is not None and modality is not None and len(present) == len(texts)  # nothing found
    ctx.seen_ids[rid] = row.line
    return Report(
        report_id=rid,
        site_id=present["site_id"],
        modality=modality,
        body_part=present["body_part"].lower(),  # a category: "Chest" and "chest" are one part
        exam=present["exam"],
        findings=present["findings"],
        impression=present["impression"],
        **optional,
    )


def _with_defaults(values: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    """Fill what a bare export does not have: the id under another name, the site, the exam."""
    out = dict(values)
    if "report_id" not in out:
        alias = next((n for n in _ID_NAMES[1:] if n in out), None)
        if alias is not None:
            out["report_id"] = out[alias]
            ctx.field_names.setdefault("report_id", alias)
    if "site_id" not in out:
        out["site_id"] = ctx.default_site
    for name, default in _ABSENT_DEFAULTS.items():
        out.setdefault(name, default)
    return out


def _is_blank(value: Any) -> bool:
    """Absent, null or only whitespace."""
    return value is None or isinstance(value, str) and not value.strip()


def _has_surrogate(value: Any) -> bool:
    """Whether a string, or any string in a list, holds a lone surrogate."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    return isinstance(value, list) and any(_has_surrogate(v) for v in value)


def _encoding_ok(line: int, values: dict[str, Any], ctx: _Context) -> bool:
    """Report ``bad_utf8`` once for the row if any field used holds undecodable text.

    CSV files are decoded with ``surrogateescape``, so a bad byte shows up here as a lone
    surrogate in just the field that holds it; JSON can also smuggle one in as an escape.
    """
    bad = [k for k in (*_REQUIRED, *_OPTIONAL) if _has_surrogate(values.get(k))]
    if not bad:
        return True
    rid = values.get("report_id")
    rid = rid.strip() if isinstance(rid, str) and "report_id" not in bad and rid.strip() else None
    names = ", ".join(repr(ctx.name(k)) for k in bad)
    ctx.report(line, rid, bad[0], "bad_utf8",
               f"field(s) {names} contain bytes that are not valid UTF-8; re-save the file as "
               "UTF-8 (e.g. iconv -f latin1 -t utf-8) or fix the row.")
    return False


def _text_field(values: dict[str, Any], name: str, found: _Found, ctx: _Context) -> str | None:
    """Read a required text field, stripped; append a problem and return None if unusable."""
    shown = ctx.name(name)
    if name not in values or values[name] is None:
        found.append((name, "missing_field",
                      f"field '{shown}' is missing; add it to the row or drop the row."))
        return None
    text = _as_text(values[name])
    if text is None:
        found.append((name, "bad_value",
                      f"field '{shown}' must be text, not a JSON {_json_type(values[name])}; "
                      "write it as a string."))
        return None
    text = text.strip()
    if not text and name not in _MAY_BE_EMPTY:
        found.append((name, "empty_field", f"field '{shown}' is empty; fill it in or drop the row."))
        return None
    return text


def _as_text(value: Any) -> str | None:
    """Strings as they are; whole numbers (ids written unquoted) as their digits; else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _json_type(value: Any) -> str:
    """JSON name of a Python value's type, for messages."""
    names = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _modality(text: str | None, found: _Found) -> str | None:
    """Normalise the modality, appending ``unknown_modality`` when it is not recognised."""
    if text is None:
        return None
    code = normalize_modality(text)
    if code is None:
        # The value is a code, not report text, but it is clipped in case a column slipped.
        found.append(("modality", "unknown_modality",
                      f"modality {_clip(text, 16)!r} is not a known code; use one of "
                      f"{', '.join(MODALITIES)} (MRI, XR, X-ray and CXR are accepted too)."))
    return code


def _optional_fields(values: dict[str, Any], found: _Found, ctx: _Context) -> dict[str, Any]:
    """patient_id, age, sex, study_date and labels; blank values become None / ()."""
    out: dict[str, Any] = {}
    for name in ("patient_id", "sex", "study_date"):
        raw = values.get(name)
        text = None if raw is None else _as_text(raw)
        if raw is not None and text is None:
            found.append((name, "bad_value",
                          f"field '{name}' must be text, not a JSON {_json_type(raw)}; "
                          "write it as a string."))
        out[name] = (text.strip() or None) if text is not None else None
    out["age"] = _age(values.get("age"), found)
    out["labels"] = _labels(values.get("labels"), found, ctx)
    return out


def _age(raw: Any, found: _Found) -> int | None:
    """Age in whole years, from a JSON number or a string of digits."""
    if raw is None or isinstance(raw, str) and not raw.strip():
        return None
    age: int | None = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        age = raw
    elif isinstance(raw, float) and raw.is_integer():
        age = int(raw)
    elif isinstance(raw, str) and raw.strip().isdigit():
        age = int(raw.strip())
    if age is None or not _AGE_RANGE[0] <= age <= _AGE_RANGE[1]:
        found.append(("age", "bad_value",
                      f"field 'age' must be a whole number of years from {_AGE_RANGE[0]} to "
                      f"{_AGE_RANGE[1]}; fix it or leave it empty."))
        return None
    return age


def _labels(raw: Any, found: _Found, ctx: _Context) -> tuple[str, ...]:
    """Labels from a JSON list or ``;``-separated text: stripped, de-duplicated, in order."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        items: list[Any] = raw.split(";")
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        items = raw
    else:
        found.append(("labels", "bad_value",
                      f"field '{ctx.name('labels')}' must be a list of strings (JSONL) or "
                      "';'-separated text (CSV); fix it or leave it empty."))
        return ()
    return tuple(dict.fromkeys(x.strip() for x in items if x.strip()))


# ---------------------------------------------------------------------------------------------
# Profile and `fedmira data check`
# ---------------------------------------------------------------------------------------------


def profile(result: LoadResult, count_tokens: Callable[[str], int] | None = None) -> dict[str, Any]:
    """Summarise a loaded file: rows, problems, sites, modalities, body parts and lengths.

    Parameters
    ----------
    result : LoadResult
        What :func:`load_reports` returned.
    count_tokens : callable, optional
        Token counter (e.g. the model tokenizer's); adds token lengths next to word lengths.

    Returns
    -------
    dict
        Keys ``path``, ``format``, ``rows_total``, ``rows_kept``, ``rows_skipped``,
        ``problems`` (code -> count), ``sites``, ``modalities``, ``body_parts`` (value ->
        count, most frequent first) and ``lengths``: ``{"findings"|"impression": {"words":
        stats, "tokens": stats}}`` with stats ``min, p50, p90, max, mean`` (``tokens`` only
        when ``count_tokens`` is given).
    """
    reports = result.reports
    lengths: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for name in ("findings", "impression"):
        texts = [getattr(r, name) for r in reports]
        lengths[name] = {"words": _stats([len(t.split()) for t in texts])}
        if count_tokens is not None:
            lengths[name]["tokens"] = _stats([count_tokens(t) for t in texts])
    return {
        "path": result.path,
        "format": result.format,
        "rows_total": result.rows_total,
        "rows_kept": len(reports),
        "rows_skipped": result.rows_skipped,
        "problems": dict(sorted(Counter(p.code for p in result.problems).items())),
        "sites": _counts(r.site_id for r in reports),
        "modalities": _counts(r.modality for r in reports),
        "body_parts": _counts(r.body_part or "(none)" for r in reports),
        "lengths": lengths,
    }


def _counts(values: Iterable[str]) -> dict[str, int]:
    """Count values, most frequent first, ties by name (stable output for diffs and tests)."""
    return dict(sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0])))


def _stats(values: list[int]) -> dict[str, float | int | None]:
    """min, nearest-rank p50/p90, max and mean (1 decimal); all None when empty."""
    if not values:
        return {"min": None, "p50": None, "p90": None, "max": None, "mean": None}
    ordered = sorted(values)

    def rank(q: float) -> int:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "min": ordered[0],
        "p50": rank(0.5),
        "p90": rank(0.9),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
    }


def format_profile(prof: dict[str, Any], max_rows: int = 20) -> str:
    """Render :func:`profile` output as a plain-text table.

    Parameters
    ----------
    prof : dict
        Output of :func:`profile`.
    max_rows : int
        Most values listed per category (sites can number in the hundreds).

    Returns
    -------
    str
        Multi-line text, no trailing newline.
    """
    out = [
        f"Report file: {prof['path']} (format {prof['format']})",
        f"Rows: {prof['rows_total']} total, {prof['rows_kept']} kept, "
        f"{prof['rows_skipped']} skipped",
    ]
    out += _count_block("Problems by kind", prof["problems"], max_rows)
    out += _count_block("Sites", prof["sites"], max_rows)
    out += _count_block("Modalities", prof["modalities"], max_rows)
    out += _count_block("Body parts", prof["body_parts"], max_rows)
    out += _length_block(prof["lengths"])
    return "\n".join(out)


def _count_block(title: str, counts: dict[str, int], max_rows: int) -> list[str]:
    """Format a titled two-column list, clipped to ``max_rows`` entries."""
    if not counts:
        return [f"{title}: none"]
    shown = list(counts.items())[:max_rows]
    width = max(len(_clip(k, 40)) for k, _ in shown)
    lines = [f"{title} ({len(counts)}):"]
    lines += [f"  {_clip(k, 40):<{width}}  {v:>7}" for k, v in shown]
    if len(counts) > max_rows:
        lines.append(f"  ... and {len(counts) - max_rows} more")
    return lines


def _length_block(lengths: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Length statistics as an aligned table, one line per text and unit."""
    cols = ("min", "p50", "p90", "max", "mean")
    lines = ["Lengths:", f"  {'':<20}" + "".join(f"{c:>8}" for c in cols)]
    for name, units in lengths.items():
        for unit, stats in units.items():
            cells = "".join(f"{'-' if stats[c] is None else stats[c]:>8}" for c in cols)
            lines.append(f"  {name + ' ' + unit:<20}{cells}")
    return lines


def check_data(
    path: str | Path,
    *,
    fmt: str = "auto",
    policy: str = "skip",
    max_chars: int = 20000,
    count_tokens: Callable[[str], int] | None = None,
    max_problems_shown: int = 50,
    out: TextIO | None = None,
) -> int:
    """Load a report file, print its problems and profile, and return an exit code.

    Parameters
    ----------
    path, fmt, policy, max_chars
        As for :func:`load_reports`.
    count_tokens : callable, optional
        Adds token lengths to the profile.
    max_problems_shown : int
        Problems printed one per line; the rest are summarised by code.
    out : text stream, optional
        Where to print (default: ``sys.stdout`` at call time).

    Returns
    -------
    int
        0 if at least one usable report remains, 1 if none does, 2 if the file cannot be used
        at all (missing, unknown layout, or a problem under ``policy="fail"``).
    """
    stream = sys.stdout if out is None else out
    try:
        result = load_reports(path, fmt=fmt, policy=policy, max_chars=max_chars)
    except FedmiraError as err:  # the message says what to do; a traceback would not help
        print(f"error: {err}", file=stream)
        return 2
    _print_problems(result.problems, max_problems_shown, stream)
    print(format_profile(profile(result, count_tokens)), file=stream)
    if not result.reports:
        print(f"No usable reports in {result.path}: fix the problems above.", file=stream)
        return 1
    return 0


def _print_problems(problems: list[Problem], limit: int, stream: TextIO) -> None:
    """One line per problem up to ``limit``, then a summary of the rest by code."""
    shown = problems[: max(limit, 0)]
    for problem in shown:
        print(problem, file=stream)
    rest = problems[len(shown):]
    if rest:
        codes = ", ".join(f"{c} {n}" for c, n in sorted(Counter(p.code for p in rest).items()))
        print(f"... and {len(rest)} more problems (codes: {codes})", file=stream)
