"""``fedmira reader-study`` end to end without a browser: the CLI on a compare folder, the page's
HTTP API (login cookie, refusals, headers), 24 readers at once on a real server, and analyze.

The browser itself is driven in tests/integration/test_reader_study_browser.py.
"""

from __future__ import annotations

import contextlib
import csv
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from fedmira.cli import main
from fedmira.common.errors import FedmiraError
from fedmira.common.reports import Report, write_jsonl
from fedmira.simulations.reader_study_web import make_app, serve

SYSTEMS = ("fedavg", "central")


def _compare_folder(root: Path, n: int = 24) -> Path:
    """A folder laid out as `fedmira compare` writes it (synthetic text only)."""
    reports = [
        Report(
            f"r{i:03d}",
            f"site_{i % 3}",
            "XR" if i % 2 else "CT",
            "chest",
            "chest",
            f"Synthetic findings {i}.",
            f"Synthetic reference {i}.",
        )
        for i in range(n)
    ]
    write_jsonl(reports, root / "cases.jsonl")
    (root / "predictions").mkdir(parents=True)
    for s in SYSTEMS:
        with (root / "predictions" / f"{s}.jsonl").open("w") as f:
            for r in reports:
                f.write(
                    json.dumps(
                        {
                            "report_id": r.report_id,
                            "site_id": r.site_id,
                            "impression": f"{s} impression {r.report_id}.",
                            "reference": r.impression,
                        }
                    )
                    + "\n"
                )
    return root


@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    folder = _compare_folder(tmp_path / "compare")
    readers = [a for i in range(4) for a in ("--reader", f"reader{i}@centre{i % 2}")]
    code = main(
        [
            "reader-study",
            "create",
            "--compare",
            str(folder),
            *readers,
            "--n-cases",
            "8",
            "--draft-cases",
            "4",
            "--draft-system",
            "fedavg",
            "--seed",
            "3",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert code == 0
    tokens_file = tmp_path / "s" / "tokens.csv"
    assert tokens_file.stat().st_mode & 0o077 == 0  # readable by the owner only
    with tokens_file.open() as f:
        tokens = {row["name"]: row["token"] for row in csv.DictReader(f)}
    return tmp_path / "s", tokens


def _client(study: Path) -> TestClient:
    return TestClient(make_app(study))


def test_create_from_a_compare_folder_makes_every_system_an_arm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _compare_folder(tmp_path / "compare")
    args = [
        "reader-study",
        "create",
        "--compare",
        str(folder),
        "--reader",
        "a",
        "--reader",
        "b@c",
        "--n-cases",
        "6",
        "--out",
        str(tmp_path / "s"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "6 cases, 24 tasks, arms: central vs reference, fedavg vs reference" in out  # 6 x 2 arms x 2
    with (tmp_path / "s" / "tokens.csv").open() as f:
        tokens = [row["token"] for row in csv.DictReader(f)]
    assert "Synthetic" not in out and all(t not in out for t in tokens)  # no text, no token
    assert main(args) != 0  # never over an existing study
    assert "exists" in capsys.readouterr().err


def test_the_api_logs_in_with_a_cookie_and_refuses_what_it_must(study: tuple[Path, dict[str, str]]) -> None:
    folder, tokens = study
    client = _client(folder)
    assert client.get("/api/task").status_code == 401  # no cookie
    assert client.post("/api/login", json={"token": "nope"}).status_code == 401
    assert (
        client.post(
            "/api/login", content=b"{bad json", headers={"Content-Type": "application/json"}
        ).status_code
        == 422
    )
    login = client.post("/api/login", json={"token": tokens["reader0"]})
    assert login.status_code == 200 and login.json()["name"] == "reader0"
    assert client.get("/api/me").json()["name"] == "reader0"
    cookie = login.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    task = client.get("/api/task").json()
    assert task["kind"] == "pairwise" and "fedavg" not in json.dumps(task) and "reference" not in task
    page = client.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store" and client.get("/static/app.js").status_code == 200
    assert client.get("/static/../reader_study_web.py").status_code == 404
    answer = {
        "task_id": task["task_id"],
        "preference": "B",
        "accept_a": 2,
        "accept_b": 4,
        "flags_a": ["wrong_severity"],
        "flags_b": [],
    }
    assert client.post("/api/answer", json=answer).json() == {
        "ok": True,
        "answered": 1,
        "total": task["total"],
    }
    replay = client.post("/api/answer", json=answer)
    assert replay.status_code == 409 and "already answered" in replay.json()["error"]
    bad = client.post(
        "/api/answer", json={**answer, "task_id": client.get("/api/task").json()["task_id"], "accept_a": 9}
    )
    assert bad.status_code == 422 and "accept_a" in bad.json()["error"]
    other = _client(folder)
    other.post("/api/login", json={"token": tokens["reader1"]})
    theirs = other.get("/api/task").json()["task_id"]
    for response in (
        client.get("/api/task", params={"task_id": theirs}),
        client.post("/api/answer", json={**answer, "task_id": theirs}),
    ):
        assert response.status_code == 404 and response.json() == {"error": "no such task for this reader"}
    assert client.post("/api/logout").status_code == 200


def test_serve_refuses_an_exposed_page_without_tls(study: tuple[Path, dict[str, str]]) -> None:
    folder, _ = study
    with pytest.raises(FedmiraError, match="without TLS"):
        serve(folder, host="0.0.0.0")
    with pytest.raises(FedmiraError, match="both --tls-cert and --tls-key"):
        serve(folder, tls_cert="cert.pem")


@contextlib.contextmanager
def page_in_thread(study: Path, **ssl: str) -> Iterator[int]:
    """The reading page of ``study`` on a real uvicorn server in a thread; yields its loopback port.

    ``ssl``: ``ssl_certfile`` and ``ssl_keyfile``; the login cookie is then Secure.
    """
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(make_app(study, secure_cookie=bool(ssl)), host="127.0.0.1", port=port,
                            log_level="warning", ws="none", **ssl)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the reading page did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live(study: tuple[Path, dict[str, str]]) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """The page on a real uvicorn server in a thread, on a free loopback port."""
    folder, tokens = study
    with page_in_thread(folder) as port:
        yield f"http://127.0.0.1:{port}", folder, tokens


def _read_everything(base: str, token: str, errors: list[BaseException]) -> None:
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            assert c.post("/api/login", json={"token": token}).status_code == 200
            while "task_id" in (task := c.get("/api/task").json()):
                body: dict[str, Any] = (
                    {"task_id": task["task_id"], "preference": "A", "accept_a": 4, "accept_b": 3}
                    if task["kind"] == "pairwise"
                    else {
                        "task_id": task["task_id"],
                        "text": task.get("draft") or "Normal.",
                        "active_ms": 1500,
                    }
                )
                r = c.post("/api/answer", json=body)
                assert r.status_code == 200, r.text
    except BaseException as exc:  # noqa: BLE001 (reported by the test)
        errors.append(exc)


def test_24_readers_at_once_lose_no_answer(tmp_path: Path) -> None:
    folder = _compare_folder(tmp_path / "compare", n=60)
    readers = [a for i in range(24) for a in ("--reader", f"r{i}")]
    assert (
        main(
            [
                "reader-study",
                "create",
                "--compare",
                str(folder),
                *readers,
                "--n-cases",
                "48",
                "--draft-cases",
                "12",
                "--draft-system",
                "fedavg",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    with (tmp_path / "s" / "tokens.csv").open() as f:
        tokens = [row["token"] for row in csv.DictReader(f)]
    errors: list[BaseException] = []
    with page_in_thread(tmp_path / "s") as port:
        workers = [
            threading.Thread(target=_read_everything, args=(f"http://127.0.0.1:{port}", t, errors))
            for t in tokens
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert not errors, errors[:3]
    import sqlite3

    with sqlite3.connect(tmp_path / "s" / "study.sqlite") as conn:
        answered, tasks = (
            conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("answers", "tasks")
        )
    assert answered == tasks == 48 * 2 * 2 + 12 * 2 * 2


def test_a_restarted_server_resumes_and_analyze_writes_the_report(
    live: tuple[str, Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, folder, tokens = live
    with httpx.Client(base_url=base) as c:
        c.post("/api/login", json={"token": tokens["reader2"]})
        first = c.get("/api/task").json()
        c.post(
            "/api/answer",
            json={"task_id": first["task_id"], "preference": "equal", "accept_a": 3, "accept_b": 3},
        )
    again = _client(folder)  # a second server process on the same folder: the answer is there
    again.post("/api/login", json={"token": tokens["reader2"]})
    assert again.get("/api/task").json()["position"] == 2
    errors: list[BaseException] = []
    for token in tokens.values():
        _read_everything(base, token, errors)
    assert not errors
    capsys.readouterr()
    assert main(["reader-study", "analyze", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "tasks answered by 4 readers" in out and (folder / "analysis" / "report.md").is_file()
    assert "Synthetic" not in out


def test_the_page_serves_over_tls_with_the_deployments_certificates(
    study: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    import ssl

    from fedmira.server.certs import make_dev_pki

    folder, tokens = study
    pki = make_dev_pki(tmp_path / "pki", hospitals=1)  # what `fedmira certs` writes for the coordinator
    certs = {"ssl_certfile": str(pki.server_cert), "ssl_keyfile": str(pki.server_key)}
    with page_in_thread(folder, **certs) as port:
        verify = ssl.create_default_context(cafile=str(pki.ca_cert))
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=verify) as c:
            login = c.post("/api/login", json={"token": tokens["reader3"]})
            assert login.status_code == 200 and "secure" in login.headers["set-cookie"].lower()
            assert c.get("/api/task").json()["kind"] == "pairwise"
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA is refused
            httpx.get(f"https://127.0.0.1:{port}/")
