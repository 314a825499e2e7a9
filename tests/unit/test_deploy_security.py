"""Deployment security without a running Flower process: the fleet address serves only the
Fleet API, busy ports are named, refusals reach the console, allow-listed keys map to node ids.

The same properties against real Flower processes: tests/integration/test_deployment.py.
"""

from __future__ import annotations

import asyncio
import io
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from fedmira.common.errors import FedmiraError
from fedmira.common.flower_runtime import port_in_use
from fedmira.common.rundir import RunDir
from fedmira.server.certs import make_dev_pki, make_node_key, read_allow_list
from fedmira.server.coordinator import (
    CoordinatorTls,
    DeploymentSuperLink,
    SecurityEcho,
    allow_listed_node_ids,
)
from fedmira.server.superlink_gate import SECURITY_TAG, FleetOnly, fleet_path


def _call(
    app: Any, path: str, method: str = "POST", kind: str = "http",
) -> tuple[list[dict[str, Any]], list[str]]:
    sent: list[dict[str, Any]] = []
    logged: list[str] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    gate = FleetOnly(app, logged.append)
    scope = {"type": kind, "path": path, "method": method, "client": ("10.0.0.7", 5555)}
    asyncio.run(gate(scope, receive, send))
    return sent, logged


async def _flower(scope: Any, receive: Any, send: Any) -> None:  # stands in for Flower's app
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"flower"})


@pytest.mark.parametrize("path", ["/v1/fleet/register-node", "/v1/fleet/pull-messages", "/health"])
def test_the_fleet_address_serves_the_fleet_api(path: str) -> None:
    sent, logged = _call(_flower, path)
    assert sent[0]["status"] == 200 and not logged


@pytest.mark.parametrize("path", [
    "/v1/control/register-node",  # `flwr supernode register`: the allow-list bypass
    "/v1/control/stop-run",       # `flwr stop`
    "/v1/control/start-run",      # `flwr run`: an arbitrary ServerApp on the coordinator
    "/v1/runtime/pull-messages",  # the ServerApp's API
    "/v1/fleet/../control/stop-run", "/docs", "/openapi.json", "/",
])
def test_everything_else_is_refused_and_logged_without_payload(path: str) -> None:
    sent, logged = _call(_flower, path)
    assert sent[0]["status"] == 403 and b"flower" not in b"".join(m.get("body", b"") for m in sent)
    (line,) = logged
    assert line.startswith(SECURITY_TAG) and "10.0.0.7" in line and "fleet address" in line


def test_websockets_and_lifespan_never_reach_flower_through_the_fleet_address() -> None:
    sent, logged = _call(_flower, "/v1/control/stop-run", kind="websocket")
    assert sent == [] and len(logged) == 1
    sent, logged = _call(_flower, "", kind="lifespan")
    assert sent == [] and logged == []  # the operator server owns Flower's lifespan
    assert not fleet_path("/v1/fleetx/pull") and not fleet_path("/healthz")


def test_nodes_flower_refuses_on_the_fleet_api_are_security_lines_once_a_minute() -> None:
    """Issue 14: a refused node key showed on the hospital, not on the coordinator. Flower answers
    412 to an unregistered key's activation and 401 to a node id its key does not own."""
    def flower_says(status: int) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        return app

    now = [0.0]
    logged: list[str] = []
    gate = FleetOnly(flower_says(412), logged.append, clock=lambda: now[0])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    def call(app: FleetOnly, path: str) -> None:
        scope = {"type": "http", "path": path, "method": "POST", "client": ("10.0.0.7", 5555)}
        asyncio.run(app(scope, receive, send))

    call(gate, "/v1/fleet/activate-node")
    (line,) = logged
    assert line.startswith(SECURITY_TAG) and "10.0.0.7" in line
    assert "HTTP 412" in line and "allow-list" in line
    now[0] = 30.0
    call(gate, "/v1/fleet/activate-node")  # a retry within the minute: no second line
    assert len(logged) == 1
    now[0] = 61.0
    call(gate, "/v1/fleet/activate-node")
    assert len(logged) == 2
    gate.app = flower_says(401)
    call(gate, "/v1/fleet/send-node-heartbeat")
    assert "HTTP 401" in logged[-1] and "authentication" in logged[-1]
    gate.app = flower_says(200)
    call(gate, "/v1/fleet/pull-messages")
    assert len(logged) == 3  # answered requests are not logged


def test_a_busy_port_is_named(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki", 1)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        assert port_in_use("127.0.0.1", busy)
        link = DeploymentSuperLink(tmp_path / "run", CoordinatorTls.from_dir(pki.root), "127.0.0.1", busy)
        with pytest.raises(FedmiraError, match=f"Port {busy} on 127.0.0.1 is in use by another program"):
            link.start()
        assert link.proc is None  # nothing was started
    assert not port_in_use("127.0.0.1", busy)


def test_the_operator_address_is_loopback_and_hospitals_get_the_fleet_address(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki", 1)
    link = DeploymentSuperLink(tmp_path / "run", CoordinatorTls.from_dir(pki.root), "0.0.0.0", 9092, 9093)
    cmd = link.command()
    assert cmd[1:3] == ["-m", "fedmira.server.superlink_gate"]
    assert cmd[cmd.index("--fleet-host") + 1] == "0.0.0.0" and cmd[cmd.index("--fleet-port") + 1] == "9092"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "9093"
    assert link.address == "127.0.0.1:9093" and 'address = "127.0.0.1:9093"' in link.connection_toml()


def test_security_lines_reach_the_console_and_the_run_folder(tmp_path: Path) -> None:
    log = tmp_path / "superlink.log"
    log.write_text("old line\n")
    out = io.StringIO()
    echo = SecurityEcho(log, tmp_path / "security.log", out)
    with open(log, "a") as f:
        f.write(f"INFO something else\n{SECURITY_TAG} refused POST /v1/control/stop-run from 10.0.0.7\n")
        f.write(f"{SECURITY_TAG} half a line")
    echo.drain()
    assert out.getvalue() == f"{SECURITY_TAG} refused POST /v1/control/stop-run from 10.0.0.7\n"
    with open(log, "a") as f:
        f.write(" now whole\n")
    echo.drain()
    assert out.getvalue().splitlines()[-1] == f"{SECURITY_TAG} half a line now whole"
    assert len((tmp_path / "security.log").read_text().splitlines()) == 2


def _flower_node_table(path: Path, rows: list[tuple[int, bytes | None, str]]) -> None:
    """The columns of Flower 1.42's ``node`` table that fedmira reads."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE node (node_id BIGINT, status VARCHAR, public_key BLOB)")
        db.executemany("INSERT INTO node (node_id, public_key, status) VALUES (?, ?, ?)", rows)


def _pem(ssh_line: str) -> bytes:
    key = serialization.load_ssh_public_key(ssh_line.encode())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_allow_listed_keys_map_to_their_node_ids_and_no_other(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki", 2)
    entries = read_allow_list(pki.allow_list)
    rogue = make_node_key("rogue")[1].decode().strip()
    db = tmp_path / "superlink.db"
    # node ids are uint64, which Flower stores as signed int64: -2 is 2**64 - 2
    _flower_node_table(db, [(11, _pem(entries[0][1]), "online"), (-2, _pem(entries[1][1]), "registered"),
                            (99, _pem(rogue), "online"), (7, None, "online")])
    nodes = allow_listed_node_ids(db, entries)
    assert nodes == {"hospital_01": 11, "hospital_02": 2**64 - 2}
    run = RunDir(tmp_path)
    run.write_allowed_nodes(nodes)
    assert run.allowed_nodes() == frozenset({11, 2**64 - 2})
    with pytest.raises(FedmiraError, match="hospital_02"):
        missing = tmp_path / "other.db"
        _flower_node_table(missing, [(11, _pem(entries[0][1]), "online"),
                                     (12, _pem(entries[1][1]), "unregistered")])
        allow_listed_node_ids(missing, entries)
    with pytest.raises(FedmiraError, match="fedmira coordinator"):
        RunDir(tmp_path / "empty").allowed_nodes()
