"""A reader study's SQLite database: the design, the readers' tokens, and every answer.

``study.sqlite`` in the study folder holds everything (``fedmira reader-study create`` writes it,
``serve`` reads tasks and writes answers, ``analyze`` reads it). Written by hand on the standard
library's ``sqlite3`` rather than an ORM: six small tables, and every write is one short
transaction, committed before the reply (WAL mode, so a killed server loses no answer and
readers answering at once do not block each other's reads).

Security: a reader's token is shown once at ``create`` and only its SHA-256 is stored; a token is
checked against every reader's hash with :func:`hmac.compare_digest` (constant time); a reader
sees and answers only their own tasks (another reader's task id is "no such task", so ids reveal
nothing); an answer is validated field by field before anything is written, and a task takes one
answer (a replay is refused). Errors name the field, never report text.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from fedmira.common.errors import FedmiraError
from fedmira.common.reader_design import (
    ERROR_FLAGS,
    PAIRWISE,
    REFERENCE,
    StudyDesign,
    StudySettings,
)

DB_NAME = "study.sqlite"
SCHEMA_VERSION = 1
#: Longest impression a reader may write, and the longest active time of one draft (1 hour).
MAX_TEXT, MAX_ACTIVE_MS = 5000, 3_600_000

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE cases (case_id TEXT PRIMARY KEY, report_id TEXT NOT NULL, site_id TEXT NOT NULL,
                    modality TEXT NOT NULL, findings TEXT NOT NULL, reference TEXT NOT NULL);
CREATE TABLE candidates (case_id TEXT NOT NULL REFERENCES cases, system TEXT NOT NULL,
                         impression TEXT NOT NULL, PRIMARY KEY (case_id, system));
CREATE TABLE readers (reader_id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, centre TEXT NOT NULL,
                      token_sha256 TEXT NOT NULL);
CREATE TABLE tasks (task_id TEXT PRIMARY KEY, reader_id INTEGER NOT NULL REFERENCES readers,
                    kind TEXT NOT NULL, case_id TEXT NOT NULL REFERENCES cases, position INTEGER NOT NULL,
                    left_system TEXT NOT NULL, right_system TEXT NOT NULL, condition TEXT NOT NULL,
                    draft_system TEXT NOT NULL);
CREATE TABLE answers (task_id TEXT PRIMARY KEY REFERENCES tasks, reader_id INTEGER NOT NULL,
                      answered_at REAL NOT NULL, preference TEXT, accept_a INTEGER, accept_b INTEGER,
                      flags_a TEXT, flags_b TEXT, text TEXT, active_ms INTEGER);
"""


class StudyError(FedmiraError):
    """A refused request; ``status`` is the HTTP status the web page answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def connect(folder: Path) -> sqlite3.Connection:
    """Open the database of the study folder ``folder`` (WAL, foreign keys on, rows as mappings)."""
    path = Path(folder) / DB_NAME
    if not path.is_file():
        raise StudyError(
            f"{path}: no study database here; create one with `fedmira reader-study create`", 404
        )
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")  # an answer acknowledged is on disk
    return conn


def create_store(folder: Path, design: StudyDesign) -> dict[str, str]:
    """Write ``folder/study.sqlite`` from a design; return each reader's token (shown once).

    Raises
    ------
    StudyError
        The folder already holds a study (never overwritten: it may hold answers).
    """
    path = folder / DB_NAME
    if path.exists():
        raise StudyError(
            f"{path} exists: a study (and its answers) is already there; choose another --out", 409
        )
    folder.mkdir(parents=True, exist_ok=True)
    tokens = {r.name: secrets.token_urlsafe(24) for r in design.readers}
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(_SCHEMA)
        meta = {
            "schema": str(SCHEMA_VERSION),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "settings": json.dumps(asdict(design.settings)),
        }
        conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        conn.executemany(
            "INSERT INTO cases VALUES (?, ?, ?, ?, ?, ?)",
            [(c.case_id, c.report_id, c.site_id, c.modality, c.findings, c.reference) for c in design.cases],
        )
        shown = design.settings.systems
        conn.executemany(
            "INSERT INTO candidates VALUES (?, ?, ?)",
            [(c.case_id, s, c.candidates[s]) for c in design.cases for s in shown],
        )
        conn.executemany(
            "INSERT INTO readers VALUES (?, ?, ?, ?)",
            [(i, r.name, r.centre, _hash(tokens[r.name])) for i, r in enumerate(design.readers)],
        )
        conn.executemany(
            "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    t.task_id,
                    t.reader,
                    t.kind,
                    t.case_id,
                    t.position,
                    t.left,
                    t.right,
                    t.condition,
                    t.draft_system,
                )
                for t in design.tasks
            ],
        )
    return tokens


def settings_of(conn: sqlite3.Connection) -> StudySettings:
    """Return the settings the study was created with."""
    raw = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()[0])
    raw["arms"] = tuple(tuple(a) for a in raw["arms"])
    raw["strata"] = tuple(raw["strata"])
    return StudySettings(**raw)


def authenticate(conn: sqlite3.Connection, token: str | None) -> sqlite3.Row:
    """Return the reader row whose token this is.

    Every stored hash is compared (constant time each), so the time does not say which matched.

    Raises
    ------
    StudyError
        401 for a missing or unknown token.
    """
    if not token:
        raise StudyError("no reader token: open the link your study coordinator gave you", 401)
    wanted = _hash(token)
    found: sqlite3.Row | None = None
    for row in conn.execute("SELECT reader_id, name, centre, token_sha256 FROM readers"):
        if hmac.compare_digest(row["token_sha256"], wanted):
            found = row
    if found is None:
        raise StudyError("unknown reader token: check the link, or ask the study coordinator for yours", 401)
    return found


def tasks_of(conn: sqlite3.Connection, reader_id: int) -> list[sqlite3.Row]:
    """Return a reader's tasks in reading order, each with ``answered`` (0/1)."""
    return list(
        conn.execute(
            "SELECT t.*, (a.task_id IS NOT NULL) AS answered "
            "FROM tasks t LEFT JOIN answers a USING (task_id) "
            "WHERE t.reader_id = ? ORDER BY t.position",
            (reader_id,),
        )
    )


def progress(conn: sqlite3.Connection, reader_id: int) -> tuple[int, int]:
    """(answered, total) for one reader."""
    rows = tasks_of(conn, reader_id)
    return sum(int(r["answered"]) for r in rows), len(rows)


def task_view(conn: sqlite3.Connection, reader_id: int, task_id: str | None = None) -> dict[str, Any] | None:
    """Return what the page shows for a task (default: the reader's first unanswered one; None when done).

    Pairwise: the findings and the impressions shown as A and B (never which system is which).
    Draft: the findings and, with the draft, the draft system's impression.

    Raises
    ------
    StudyError
        404 for a task id that is not this reader's.
    """
    rows = tasks_of(conn, reader_id)
    if task_id is None:
        pending = [r for r in rows if not r["answered"]]
        if not pending:
            return None
        row = pending[0]
    else:
        match = next((r for r in rows if r["task_id"] == task_id), None)
        if match is None:
            raise StudyError("no such task for this reader", 404)
        row = match
    case = conn.execute("SELECT * FROM cases WHERE case_id = ?", (row["case_id"],)).fetchone()
    view: dict[str, Any] = {
        "task_id": row["task_id"],
        "kind": row["kind"],
        "findings": case["findings"],
        "position": row["position"] + 1,
        "total": len(rows),
        "answered": sum(int(r["answered"]) for r in rows),
        "done": bool(row["answered"]),
    }
    if row["kind"] == PAIRWISE:
        view["a"] = _impression(conn, case, row["left_system"])
        view["b"] = _impression(conn, case, row["right_system"])
    else:
        view["condition"] = row["condition"]
        view["draft"] = _impression(conn, case, row["draft_system"]) if row["draft_system"] else ""
    return view


def _impression(conn: sqlite3.Connection, case: sqlite3.Row, system: str) -> str:
    if system == REFERENCE:
        return str(case["reference"])
    row = conn.execute(
        "SELECT impression FROM candidates WHERE case_id = ? AND system = ?", (case["case_id"], system)
    ).fetchone()
    return str(row["impression"])


def submit_answer(conn: sqlite3.Connection, reader_id: int, answer: Mapping[str, Any]) -> None:
    """Validate and store one answer, committed before this returns.

    Raises
    ------
    StudyError
        422 for a malformed answer (the message names the field), 404 for a task that is not
        this reader's, 409 for a task already answered. Nothing is written then.
    """
    if not isinstance(answer, Mapping):
        raise StudyError("the answer must be a JSON object", 422)
    task_id = answer.get("task_id")
    if not isinstance(task_id, str):
        raise StudyError("field task_id: missing or not a string", 422)
    row = conn.execute(
        "SELECT kind FROM tasks WHERE task_id = ? AND reader_id = ?", (task_id, reader_id)
    ).fetchone()
    if row is None:
        raise StudyError("no such task for this reader", 404)
    values = _pairwise_values(answer) if row["kind"] == PAIRWISE else _draft_values(answer)
    try:
        conn.execute(
            "INSERT INTO answers (task_id, reader_id, answered_at, preference, accept_a, accept_b, "
            "flags_a, flags_b, text, active_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (task_id, reader_id, time.time(), *values),
        )
    except sqlite3.IntegrityError as exc:
        raise StudyError("this task is already answered; answers cannot be changed", 409) from exc


_PAIRWISE_KEYS = {"task_id", "preference", "accept_a", "accept_b", "flags_a", "flags_b"}
_DRAFT_KEYS = {"task_id", "text", "active_ms"}


def _unknown(answer: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(answer) - allowed)
    if extra:
        raise StudyError(f"field {extra[0]}: not part of this task's answer", 422)


def _pairwise_values(answer: Mapping[str, Any]) -> tuple[Any, ...]:
    _unknown(answer, _PAIRWISE_KEYS)
    pref = answer.get("preference")
    if pref not in ("A", "equal", "B"):
        raise StudyError("field preference: must be A, equal or B", 422)
    accept = []
    for key in ("accept_a", "accept_b"):
        v = answer.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5:
            raise StudyError(f"field {key}: must be an integer rating from 1 to 5", 422)
        accept.append(v)
    flags = []
    for key in ("flags_a", "flags_b"):
        v = answer.get(key, [])
        if not isinstance(v, list) or any(f not in ERROR_FLAGS for f in v) or len(set(v)) != len(v):
            raise StudyError(
                f"field {key}: must be a list of distinct flags from {', '.join(ERROR_FLAGS)}", 422
            )
        flags.append(json.dumps(sorted(v)))
    return pref, accept[0], accept[1], flags[0], flags[1], None, None


def _draft_values(answer: Mapping[str, Any]) -> tuple[Any, ...]:
    _unknown(answer, _DRAFT_KEYS)
    text = answer.get("text")
    if not isinstance(text, str) or not text.strip():
        raise StudyError("field text: the impression must not be empty", 422)
    if len(text) > MAX_TEXT:
        raise StudyError(f"field text: longer than {MAX_TEXT} characters", 422)
    ms = answer.get("active_ms")
    if isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms <= MAX_ACTIVE_MS:
        raise StudyError(f"field active_ms: must be an integer from 0 to {MAX_ACTIVE_MS}", 422)
    return None, None, None, None, None, text, ms


def load_all(conn: sqlite3.Connection) -> dict[str, list[dict[str, Any]]]:
    """Every table as plain dicts, for ``analyze`` (tokens left out)."""
    out = {}
    for table in ("cases", "candidates", "tasks", "answers"):
        out[table] = [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]  # noqa: S608 (fixed names)
    out["readers"] = [
        {k: r[k] for k in ("reader_id", "name", "centre")} for r in conn.execute("SELECT * FROM readers")
    ]
    for a in out["answers"]:
        for key in ("flags_a", "flags_b"):
            a[key] = json.loads(a[key]) if a[key] else []
    return out
