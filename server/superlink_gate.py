r"""Flower's SuperLink with its Fleet API alone on the hospitals' address.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr`` CLI: register node
keys, start and stop runs) and the Runtime API (the ServerApp) on one HTTPS port, and the
Control API has no authentication without Flower's enterprise plugin. Exposed to hospitals,
anyone holding the public CA certificate could register a SuperNode key of their own or stop a
run (issue 14). This launcher runs Flower's own SuperLink (its argument parser, its FastAPI app,
its lifespan) and serves that one app twice:

- the **operator address** (``--host``/``--port`` of ``flower-superlink``, loopback): every
  API, for the coordinator's ``flwr`` CLI and the ServerApp's SuperExec, which Flower connects
  to this address;
- the **fleet address** (``--fleet-host``/``--fleet-port``): only ``/v1/fleet/`` and
  ``/health``. Any other path is answered 403 and logged as one ``[fedmira-security]`` line
  (method, path, client address; no payload), which ``fedmira coordinator`` echoes to its
  console.

Written by hand (about 100 lines) because Flower has no option for it and a separate reverse
proxy would be one more TLS process for hospital IT to run; the app, its state and its TLS
files are Flower's, only the routing is ours. ``uvicorn.run`` is replaced for this process only.

Usage (``fedmira coordinator`` builds the command)::

    python -m fedmira.server.superlink_gate --fleet-host 0.0.0.0 --fleet-port 9092 -- \
        --host 127.0.0.1 --port 9093 --ssl-certfile ... --enable-supernode-auth ...
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from typing import Any, Awaitable, Callable, MutableMapping, Sequence

#: Paths the fleet address serves: the SuperNodes' API and Flower's health check.
FLEET_PATHS = ("/v1/fleet/", "/health")
SECURITY_TAG = "[fedmira-security]"
READY_LINE = "[fedmira] fleet address ready"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def fleet_path(path: str) -> bool:
    """Tell whether the fleet address serves ``path``.

    Exact prefixes; no ``..`` tricks: ASGI paths arrive decoded and are matched as they are
    routed.
    """
    return path == "/health" or (path.startswith("/v1/fleet/") and ".." not in path)


def _printable(text: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9/_.:-]", "?", text)[:limit]


#: Fleet answers that mean a node was refused -> what the coordinator's console says.
REFUSALS = {
    412: ("a SuperNode key that is not registered (not on the allow-list) tried to connect; the "
          "hospital sees \"Failed to activate SuperNode\""),
    401: ("a SuperNode failed authentication (a node id its key does not own: a node of another "
          "SuperLink state database, or a forged request); the hospital's SuperNode stops"),
}
REFUSAL_QUIET_S = 60.0  # one line per client and kind per minute: heartbeats retry every few seconds


class FleetOnly:
    """ASGI wrapper: pass fleet paths to ``app``, answer everything else 403.

    It also logs the fleet requests Flower refused (unknown key, failed authentication) as
    security lines.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], log: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.log, self.clock = app, log, clock
        self._last: dict[tuple[str, int], float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection: a fleet path goes through, anything else gets 403."""
        if scope["type"] == "lifespan":  # the operator server owns the lifespan
            return
        path = str(scope.get("path", ""))
        client = scope.get("client") or ("?", 0)
        if scope["type"] == "http" and fleet_path(path):
            async def watch(message: MutableMapping[str, Any]) -> None:
                if message.get("type") == "http.response.start":
                    self._refused(int(message.get("status", 0)), path, str(client[0]))
                await send(message)

            await self.app(scope, receive, watch)
            return
        self.log(f"{SECURITY_TAG} refused {_printable(str(scope.get('method', scope['type'])))} "
                 f"{_printable(path)} from {_printable(str(client[0]))} on the fleet address: only the "
                 "Fleet API is served to hospitals (the Control API listens on loopback)")
        if scope["type"] != "http":
            return
        body = b"Not served on the fleet address.\n"
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _refused(self, status: int, path: str, client: str) -> None:
        if status not in REFUSALS:
            return
        now, key = self.clock(), (client, status)
        if now - self._last.get(key, -REFUSAL_QUIET_S) < REFUSAL_QUIET_S:
            return
        self._last[key] = now
        self.log(f"{SECURITY_TAG} refused node on {_printable(path)} from {_printable(client)} "
                 f"(HTTP {status}): {REFUSALS[status]}")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def two_servers(fleet_host: str, fleet_port: int) -> Callable[..., None]:
    """Return a drop-in for ``uvicorn.run`` that also serves the app fleet-only on a second address.

    The app is served on its own address and, behind :class:`FleetOnly`, on
    ``fleet_host:fleet_port``.
    """
    import uvicorn

    def run(app: Any, *, host: str, port: int, ssl_keyfile: str | None = None,
            ssl_certfile: str | None = None, log_config: Any = None, **kw: Any) -> None:
        common = {"ssl_keyfile": ssl_keyfile, "ssl_certfile": ssl_certfile, "log_config": log_config,
                  "workers": 1}
        operator = uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=True, **common))
        fleet = uvicorn.Server(uvicorn.Config(FleetOnly(app, _stderr), host=fleet_host, port=fleet_port,
                                              lifespan="off", access_log=False, **common))
        asyncio.run(_serve(operator, fleet))

    return run


async def _serve(operator: Any, fleet: Any) -> None:
    """Serve the operator address first, then the fleet address; when either stops, both stop.

    The operator server goes first because it runs Flower's lifespan (state, SuperExec).
    """
    main = asyncio.create_task(operator.serve())  # captures SIGTERM/SIGINT
    while not operator.started:
        if main.done():
            await main  # start-up failed: re-raise
            return
        await asyncio.sleep(0.05)
    side = asyncio.create_task(fleet._serve())  # no signal capture: the operator server has it
    while not fleet.started and not side.done():
        await asyncio.sleep(0.05)
    if fleet.started:
        _stderr(READY_LINE)
    await asyncio.wait({main, side}, return_when=asyncio.FIRST_COMPLETED)
    operator.should_exit = fleet.should_exit = True
    await asyncio.gather(main, side, return_exceptions=True)
    if side.done() and not side.cancelled() and side.exception() is not None:
        raise side.exception()  # type: ignore[misc]
    if not fleet.started:
        raise SystemExit(f"The fleet address {fleet.config.host}:{fleet.config.port} could not be served "
                         "(port in use?); see the lines above.")


def main(argv: Sequence[str] | None = None) -> None:
    """Run Flower's SuperLink with its Fleet API alone on the hospitals' address."""
    parser = argparse.ArgumentParser(
        prog="python -m fedmira.server.superlink_gate",
        description="Flower SuperLink serving only its Fleet API on the hospitals' address; the "
                    "flower-superlink arguments after `--` (their --host/--port: the operator "
                    "address, keep it on loopback).")
    parser.add_argument("--fleet-host", required=True, help="address hospitals connect to, e.g. 0.0.0.0")
    parser.add_argument("--fleet-port", type=int, required=True, help="port hospitals connect to")
    parser.add_argument("superlink_args", nargs=argparse.REMAINDER,
                        help="-- then flower-superlink's arguments")
    args = parser.parse_args(argv)
    rest = list(args.superlink_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    import importlib

    import uvicorn

    # the module, not the function of the same name that flwr.superlink.cli exports
    superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")
    uvicorn.run = two_servers(args.fleet_host, args.fleet_port)  # type: ignore[assignment]
    sys.argv = ["flower-superlink", *rest]
    superlink.flower_superlink()


if __name__ == "__main__":
    main()
