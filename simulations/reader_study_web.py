"""The reading page of ``fedmira reader-study serve``: FastAPI + uvicorn, plain HTML and JavaScript.

A reader opens ``http(s)://HOST:PORT/#token=...`` (the fragment never reaches the server or its
logs); the page posts the token once to ``/api/login``, which answers with an HttpOnly,
SameSite=Strict cookie. Every other call reads that cookie, checks it against the stored hashes
(``common.reader_store.authenticate``) and sees only that reader's tasks. Each answer is
committed before its reply, so a killed server loses nothing, and a reader who comes back
continues at their first unanswered task.

The HTML, script and style are static files beside this module (``reader_study_static/``): no
build step, and the page runs under a Content-Security-Policy that allows only this origin's
own script. Logs hold methods, paths and status codes (uvicorn's access log) and the messages of
refusals, never report text.
"""

from __future__ import annotations

import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, TextIO

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from fedmira.common.errors import FedmiraError
from fedmira.common.reader_store import StudyError, authenticate, connect, progress, submit_answer, task_view

STATIC = Path(__file__).parent / "reader_study_static"
COOKIE = "fedmira_reader"
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def make_app(study: Path, *, secure_cookie: bool = False) -> Any:
    """Return the FastAPI app serving the study folder ``study`` (its database must exist)."""
    connect(study).close()  # fail now, with the path, rather than at the first reader
    app = FastAPI(title="fedmira reader study", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        response.headers.update(_HEADERS)
        return response

    @app.exception_handler(StudyError)
    async def refused(_: Request, exc: StudyError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    def reader(request: Request, conn: sqlite3.Connection) -> int:
        return int(authenticate(conn, request.cookies.get(COOKIE))["reader_id"])

    async def body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError as exc:
            raise StudyError("the request body must be JSON", 422) from exc

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    def static(name: str) -> FileResponse:
        files = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in files:
            raise StudyError("not found", 404)
        return FileResponse(STATIC / name, media_type=files[name])

    @app.post("/api/login")
    async def login(request: Request) -> JSONResponse:
        payload = await body(request)
        token = payload.get("token") if isinstance(payload, dict) else None
        with closing(connect(study)) as conn:  # one per request; WAL lets readers overlap
            row = authenticate(conn, token if isinstance(token, str) else None)
            done, total = progress(conn, int(row["reader_id"]))
        response = JSONResponse(
            {"name": row["name"], "centre": row["centre"], "answered": done, "total": total}
        )
        response.set_cookie(
            COOKIE,
            str(token),
            httponly=True,
            samesite="strict",
            secure=secure_cookie,
            max_age=60 * 60 * 24 * 30,
        )
        return response

    @app.get("/api/me")
    def me(request: Request) -> JSONResponse:
        with closing(connect(study)) as conn:
            row = authenticate(conn, request.cookies.get(COOKIE))
            done, total = progress(conn, int(row["reader_id"]))
        return JSONResponse({"name": row["name"], "centre": row["centre"], "answered": done, "total": total})

    @app.post("/api/logout")
    def logout() -> JSONResponse:
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE)
        return response

    @app.get("/api/task")
    def task(request: Request, task_id: str | None = None) -> JSONResponse:
        with closing(connect(study)) as conn:
            me = reader(request, conn)
            view = task_view(conn, me, task_id)  # carries the progress itself
            if view is None:
                done, total = progress(conn, me)
                view = {"done_all": True, "answered": done, "total": total}
        return JSONResponse(view)

    @app.post("/api/answer")
    async def answer(request: Request) -> JSONResponse:
        payload = await body(request)
        with closing(connect(study)) as conn:
            me = reader(request, conn)
            submit_answer(conn, me, payload)
            done, total = progress(conn, me)
        return JSONResponse({"ok": True, "answered": done, "total": total})

    return app


def serve(
    study: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the page until interrupted.

    Raises
    ------
    FedmiraError
        A non-loopback address without TLS, or half a TLS pair.
    """
    import uvicorn

    out = out or sys.stdout
    if bool(tls_cert) != bool(tls_key):
        raise FedmiraError(
            "Give both --tls-cert and --tls-key (e.g. the coordinator's certs/ from "
            "`fedmira certs`), or neither for loopback only."
        )
    if host not in LOOPBACK and not tls_cert:
        raise FedmiraError(
            f"--host {host} would expose the reading page (report text) without TLS; pass "
            "--tls-cert and --tls-key, or keep the default --host 127.0.0.1."
        )
    app = make_app(study, secure_cookie=bool(tls_cert))
    scheme = "https" if tls_cert else "http"
    print(
        f"Reader study {study}: {scheme}://{host}:{port}/ (readers open their link from tokens.csv; "
        "Ctrl+C stops, answers are saved as they come)",
        file=out,
        flush=True,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        log_level="info",
        ws="none",  # the page uses no websockets
        access_log=True,
    )
    return 0
