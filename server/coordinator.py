"""``fedmira coordinator``: the coordinator's side of a real deployment.

It starts a Flower SuperLink that serves HTTPS with the coordinator's certificate and accepts
only SuperNodes whose public key was registered (SuperNode authentication), registers every key
of the allow-list, waits until enough hospitals are online, submits the fedmira app with
``mode=deployment`` and streams the rounds. Its run folder is the one a simulation writes
(``config.json``, ``metrics.jsonl``, ``rounds/``, ``final_adapter/``, ``loss.png``, the
SuperLink's state database and logs) except ``sites/``, which holds only ``sites.json`` with
the hospitals of the allow-list: reports never reach the coordinator.

Resume after a crash or restart: ``fedmira coordinator run.resume=RUN_DIR``. The SuperLink's
state database (``mode.state_db``, by default ``OUT_DIR/coordinator/superlink.db``, shared by
all runs so a hospital stays registered from one run to the next) keeps the registered keys, the
hospitals' SuperNodes reconnect by themselves (they retry), the interrupted Flower run is stopped
and a new one continues after the last committed round (``server/server_app.py`` reads the run folder).

Flower 1.42 specifics this module works with:

- one HTTPS port serves the Fleet API (hospitals), the Control API (``flwr`` CLI) and the
  ServerApp's Runtime API; the Control API is unauthenticated without Flower's enterprise
  OIDC plugin, so expose only ``/v1/fleet/`` of that port beyond the coordinator (see
  docs/deployment.md);
- there is no allow-list file: keys are registered with ``flwr supernode register`` and kept in
  the state database (``--auth-list-public-keys`` is refused);
- ``flwr run --stream`` exits 0 even when the run failed: success is judged from the run
  folder and the SuperLink's run status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from cryptography.exceptions import InvalidSignature

from fedmira.common.config import ExperimentConfig
from fedmira.common.errors import ConfigError, FedmiraError
from fedmira.common.flower_runtime import (
    SimulationSuperLink,
    parse_address,
    port_in_use,
    run_status,
    stop_recorded,
    stream_run,
)
from fedmira.common.rundir import RunDir, RunLock
from fedmira.common.runs import (
    RunFollower,
    create_run_folder,
    finish_run,
    resume_run,
    shown,
    write_run_config,
)
from fedmira.server.certs import ALLOW_LIST, read_allow_list
from fedmira.server.superlink_gate import READY_LINE, SECURITY_TAG

DEFAULT_EXPERIMENT = "deployment"
DEPLOYMENT_BASE = ("mode=deployment",)  # what `fedmira coordinator` adds before the user's overrides
LOOPBACK = "127.0.0.1"
COORDINATOR_STATE_KEY = "coordinator"


# ------------------------------------------------------------------------------ TLS files
@dataclass(frozen=True)
class CoordinatorTls:
    """The SuperLink's certificate, its key and the CA certificate the hospitals trust."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def from_dir(cls, folder: str | Path) -> CoordinatorTls:
        """Read the TLS files from a folder.

        ``folder/{ca.crt,server.crt,server.key}`` (``fedmira certs``' ``superlink/``), or a
        ``fedmira certs`` output folder itself.
        """
        root = Path(folder).expanduser().resolve()
        if (root / "superlink" / "server.crt").is_file():
            root = root / "superlink"
        return cls(root / "ca.crt", root / "server.crt", root / "server.key")

    def to_dict(self) -> dict[str, str]:
        """Return the paths as strings (for the run folder's coordinator.json)."""
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}

    def check(self) -> list[str]:
        """Validate the files (present, PEM, key matches certificate, chain); return the SANs."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.is_file():
                raise FedmiraError(f"TLS file {path} not found; `fedmira certs out=DIR` writes a development "
                                   "set, or pass --certs DIR with ca.crt, server.crt and server.key.")
        try:
            cert = x509.load_pem_x509_certificate(self.server_cert.read_bytes())
            ca = x509.load_pem_x509_certificates(self.ca_cert.read_bytes())
            key = serialization.load_pem_private_key(self.server_key.read_bytes(), None)
        except (ValueError, TypeError) as exc:
            raise FedmiraError(f"Cannot read the TLS files in {self.server_cert.parent} as PEM "
                               f"(unencrypted key expected): {exc}") from exc
        if key.public_key().public_bytes(*_spki()) != cert.public_key().public_bytes(*_spki()):
            raise FedmiraError(f"{self.server_key} is not the key of {self.server_cert}.")
        if not any(_issued_by(cert, c) for c in ca):
            raise FedmiraError(f"{self.server_cert} is not issued by a CA in {self.ca_cert}; hospitals "
                               "verify the SuperLink with that file, so they would refuse it.")
        return _sans(cert)


def _issued_by(cert: Any, ca: Any) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _spki() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def _sans(cert: Any) -> list[str]:
    from cryptography import x509

    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.get_values_for_type(x509.IPAddress)] + ext.get_values_for_type(x509.DNSName)


# ------------------------------------------------------------------------------ SuperLink
class DeploymentSuperLink(SimulationSuperLink):
    """The coordinator's SuperLink: HTTPS, SuperNode authentication, state database in the run.

    Two addresses (``server/superlink_gate.py``): hospitals reach only the Fleet API on
    ``fleet_host:fleet_port``; the Control API (register keys, start and stop runs) and the
    ServerApp's Runtime API are on ``127.0.0.1:control_port``, for this machine only.
    """

    def __init__(self, run_dir: Path, tls: CoordinatorTls, host: str, port: int, control_port: int = 0,
                 database: Path | None = None) -> None:
        super().__init__(run_dir, host=LOOPBACK, port=control_port)
        self.fleet_host, self.fleet_port = host, port
        self.database = database or run_dir / "superlink.db"
        self.tls = tls
        self.ready_marker = READY_LINE.encode()

    @property
    def fleet_address(self) -> str:
        """Where hospitals connect."""
        return f"{self.fleet_host}:{self.fleet_port}"

    def check_ports(self) -> None:
        """Both addresses free, or a message naming the port (exit 2 from the CLI)."""
        for host, port, who in ((self.fleet_host, self.fleet_port, "hospitals' (mode.superlink)"),
                                (self.host, self.port, "operator's (mode.control_port)")):
            if port_in_use(host, port):
                raise FedmiraError(f"Port {port} on {host} is in use by another program; it is the "
                                   f"{who} port. Stop that program or choose another port.")

    def connection_toml(self) -> str:
        """Return the ``flwr`` CLI's connection config for this SuperLink (TLS, its CA)."""
        return ('[superlink]\ndefault = "fedmira"\n\n[superlink.fedmira]\n'
                f'address = "{self.address}"\nroot-certificates = "{self.tls.ca_cert}"\n')

    def command(self) -> list[str]:
        """Return the SuperLink's command line, behind fedmira's fleet-only gate."""
        return [
            sys.executable, "-m", "fedmira.server.superlink_gate",
            "--fleet-host", self.fleet_host, "--fleet-port", str(self.fleet_port), "--",
            "--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
            "--ssl-keyfile", str(self.tls.server_key), "--enable-supernode-auth",
            "--host", self.host, "--port", str(self.port),
            "--database", str(self.database),
            "--disable-runtime-dependency-installation",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink once its ports are known to be free."""
        self.check_ports()
        try:
            super().start(timeout)
        except FedmiraError as exc:
            text = self.log_path.read_text(errors="replace")[-3000:]
            if "address already in use" in text.lower() or "Errno 98" in text:
                raise FedmiraError(f"Port {self.fleet_port} on {self.fleet_host} or {self.port} on "
                                   f"{self.host} is in use by another program; stop it or choose another "
                                   "mode.superlink=HOST:PORT / mode.control_port.") from exc
            raise

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a ``flwr`` CLI command against this SuperLink."""
        return subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)


def _json_out(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    start = proc.stdout.find("{")
    try:
        return dict(json.loads(proc.stdout[start:])) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def register_keys(link: DeploymentSuperLink, entries: list[tuple[str, str]]) -> list[str]:
    """Register every allow-list key (already registered ones are fine); returns new names."""
    keys_dir = link.flwr_home / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    added = []
    for name, line in entries:
        path = keys_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.pub"
        path.write_text(line + "\n")
        doc = _json_out(link.flwr("supernode", "register", str(path), "fedmira", "--name", name[:60],
                                  "--format", "json"))
        if doc.get("success"):
            added.append(name)
        elif "already in use" not in str(doc.get("error-message", "")):
            raise FedmiraError(f"Could not register the key of {name}: "
                               f"{doc.get('error-message', 'no answer from the SuperLink')}")
    return added


def allow_listed_node_ids(database: Path, entries: list[tuple[str, str]]) -> dict[str, int]:
    """Map each allow-listed hospital to the node id its key registered under.

    Read-only, from the SuperLink's state database. The ``flwr`` CLI lists node ids but not
    their keys, and an already registered key's id is not returned again, so the database is
    the one place that maps them.
    """
    import sqlite3

    from cryptography.hazmat.primitives.serialization import load_pem_public_key, load_ssh_public_key
    from flwr.supercore.utils import int64_to_uint64

    wanted = {load_ssh_public_key(line.encode()).public_bytes(*_spki()): name for name, line in entries}
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT node_id, public_key, status FROM node").fetchall()
    found: dict[str, int] = {}
    for node_id, key, status in rows:
        if key is None or status == "unregistered":
            continue
        try:
            der = load_pem_public_key(bytes(key)).public_bytes(*_spki())
        except ValueError:
            continue
        if der in wanted:  # Flower keeps the uint64 node id as a signed int64 in SQLite
            found[wanted[der]] = int64_to_uint64(int(node_id))
    missing = [name for name, _ in entries if name not in found]
    if missing:
        raise FedmiraError(f"The SuperLink's database {database} holds no node for the key(s) of "
                           f"{', '.join(missing)}; restart the coordinator so it registers them.")
    return found


def online_nodes(link: DeploymentSuperLink, allowed: frozenset[int] | None = None) -> int:
    """Count the registered SuperNodes online now.

    Only allow-listed ones when given: a key registered by anyone else is not a hospital.
    """
    doc = _json_out(link.flwr("supernode", "ls", "fedmira", "--format", "json"))
    return sum(1 for n in doc.get("nodes", []) if n.get("status") == "online"
               and (allowed is None or int(n.get("node-id", -1)) in allowed))


def wait_for_sites(link: DeploymentSuperLink, wanted: int, out: TextIO, poll_s: float = 2.0,
                   allowed: frozenset[int] | None = None) -> None:
    """Block until ``wanted`` hospitals are online, printing progress when it changes."""
    shown = -1
    while (n := online_nodes(link, allowed)) < wanted:
        if link.proc is not None and link.proc.poll() is not None:
            raise FedmiraError(f"The SuperLink exited; see {link.log_path}.")
        if n != shown:
            print(f"{n}/{wanted} hospitals online; waiting (hospitals start `fedmira hospital`)...", file=out)
            shown = n
        time.sleep(poll_s)
    print(f"{n} hospitals online.", file=out)


def stop_flower_run(link: DeploymentSuperLink, run_id: int | None) -> None:
    """Stop a Flower run that a killed coordinator left running (no-op when it is finished)."""
    if run_id is not None and "running" in run_status(link, run_id):
        link.flwr("stop", str(run_id), "fedmira")


# ------------------------------------------------------------------------------ run folder
def deployment_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Return the config checked for ``mode.name=deployment`` and, unnamed, named ``deployment``."""
    if cfg.mode.name != "deployment":
        raise ConfigError("fedmira coordinator needs mode=deployment (it is added for you unless another "
                          "mode=... override is given).")
    if not cfg.mode.superlink:
        raise ConfigError("mode.superlink is empty: give the address to listen on, e.g. "
                          "mode.superlink=0.0.0.0:9092.")
    if not cfg.run.name:
        cfg = cfg.replace(run=dataclasses.replace(cfg.run, name=DEFAULT_EXPERIMENT))
    return cfg


def new_deployment_run(cfg: ExperimentConfig,
                       hospitals: list[str]) -> tuple[ExperimentConfig, RunDir, dict[str, Any]]:
    """Create the run folder; ``sites/sites.json`` lists the allow-listed hospitals (no data)."""
    cfg, run = create_run_folder(cfg)
    index = {"train_sites": hospitals, "external_sites": [], "deployment": True}
    (run.path / "sites").mkdir(exist_ok=True)
    (run.path / "sites" / "sites.json").write_text(json.dumps(index, indent=2))
    return cfg, run, index


def _open_run(cfg: ExperimentConfig, hospitals: list[str], resume_overrides: Sequence[str],
              out: TextIO) -> tuple[ExperimentConfig, RunDir]:
    if cfg.run.resume:
        cfg, run, _ = resume_run(cfg.run.resume, resume_overrides, base=DEPLOYMENT_BASE)
        if cfg.mode.name != "deployment":
            raise ConfigError(f"{run.path} is a simulation; resume it with "
                              "`fedmira simulate run.resume=...`.")
        stop_recorded(run.path)
        print(f"Resuming {run.path} after round {run.repair()} of {cfg.strategy.rounds}.", file=out)
        return cfg, run
    cfg, run, _ = new_deployment_run(deployment_config(cfg), hospitals)
    print(f"Run folder: {run.path}", file=out)
    return cfg, run


def resolve_settings(saved: dict[str, Any], certs: str | None,
                     allow_list: str | None) -> tuple[CoordinatorTls, Path]:
    """TLS files and allow-list: the given ones, else those ``saved`` by the run's first start."""
    if certs and not Path(certs).expanduser().is_dir():
        raise FedmiraError(f"--certs {certs}: no such folder; give the folder with ca.crt, server.crt and "
                           "server.key (`fedmira certs out=DIR` writes a development set).")
    if certs:
        tls = CoordinatorTls.from_dir(certs)
    elif saved.get("tls"):
        tls = CoordinatorTls(**{k: Path(v) for k, v in saved["tls"].items()})
    else:
        raise FedmiraError("Give the SuperLink's TLS files: --certs DIR (ca.crt, server.crt, server.key; "
                           "`fedmira certs out=DIR` writes a development set).")
    if allow_list:
        path = Path(allow_list).expanduser().resolve()
    elif saved.get("allow_list"):
        path = Path(saved["allow_list"])
    elif certs and (Path(certs).expanduser() / ALLOW_LIST).is_file():
        path = Path(certs).expanduser().resolve() / ALLOW_LIST
    else:
        raise FedmiraError(f"Give the hospitals' public keys: --allow-list FILE (one supernode_key.pub "
                           f"line per hospital, like {ALLOW_LIST} of `fedmira certs`).")
    return tls, path


# ------------------------------------------------------------------------------ coordinate
def coordinate(
    cfg: ExperimentConfig, *, certs: str | None = None, allow_list: str | None = None,
    wait_sites: int = 0, resume_overrides: Sequence[str] = (), out: TextIO = sys.stdout,
    verbose: bool = False,
) -> int:
    """Run a deployment from the coordinator; returns the exit code (0: all rounds committed).

    Parameters
    ----------
    cfg : ExperimentConfig
        Composed config with ``mode=deployment``; ``mode.superlink`` is the listen address.
    certs, allow_list : str, optional
        TLS folder and allow-list file; on resume the recorded ones are used unless given.
    wait_sites : int
        Start the run once this many hospitals are online (0: every allow-listed hospital).
    resume_overrides : sequence of str
        The Hydra overrides given with ``run.resume`` (they must not change the recorded config,
        except where the run is served: ``common.compose.RESUMABLE_KEYS``).
    """
    with contextlib.ExitStack() as held:
        if cfg.run.resume:  # before anything of the run is read or stopped: one coordinator per run
            held.enter_context(RunLock(Path(cfg.run.resume).expanduser(), "coordinator"))
        return _coordinate(cfg, held, certs=certs, allow_list=allow_list, wait_sites=wait_sites,
                           resume_overrides=resume_overrides, out=out, verbose=verbose)


def _coordinate(cfg: ExperimentConfig, held: contextlib.ExitStack, *, certs: str | None,
                allow_list: str | None, wait_sites: int, resume_overrides: Sequence[str], out: TextIO,
                verbose: bool) -> int:
    t0, launched_at = time.perf_counter(), time.time()
    resuming = bool(cfg.run.resume)
    saved = RunDir(cfg.run.resume).state().get(COORDINATOR_STATE_KEY, {}) if resuming else {}
    tls, list_path = resolve_settings(saved, certs, allow_list)
    sans = tls.check()
    entries = read_allow_list(list_path)
    wait_sites = wait_sites or int(saved.get("wait_sites", 0))  # a resume keeps the launch's option
    wanted = wait_sites or len(entries)
    if not cfg.run.resume:  # checked before a run folder is made; a resumed run's config below
        _check_start(cfg, wanted)
    cfg, run = _open_run(cfg, [name for name, _ in entries], resume_overrides, out)
    if not resuming:  # a resumed run's lock is already held
        held.enter_context(RunLock(run.path, "coordinator"))
    _check_start(cfg, wanted)
    database = state_database(cfg, run, saved)
    if database.parent != run.path:  # one SuperLink per shared database (the run's is locked)
        held.enter_context(RunLock(database.parent, "coordinator"))
    run.mark(launched_at=launched_at, failure=None, **{COORDINATOR_STATE_KEY: {
        "tls": tls.to_dict(), "allow_list": str(list_path), "wait_sites": wait_sites,
        "state_db": str(database)}})
    host, port = parse_address(cfg.mode.superlink)
    _check_loopback_san(sans, tls)
    link = DeploymentSuperLink(run.path, tls, host, port, cfg.mode.control_port, database)
    print(f"{len(entries)} hospitals on the allow-list {list_path}, {cfg.strategy.rounds} rounds, model "
          f"{cfg.model.name_or_path}, config {cfg.config_hash()}; certificate valid for "
          f"{', '.join(sans) or 'no SAN'}", file=out)
    print(f"Hospitals connect to https://{host}:{port} (Fleet API only). Operator: https://{link.address} "
          f"on this machine only (Control API: `FLWR_HOME={link.flwr_home} flwr ls fedmira`).", file=out)
    status, started = _serve(link, run, cfg, entries, wanted, out, verbose)
    return finish_run(cfg, run, status, started - t0, time.perf_counter() - t0, out, command="coordinator")


def state_database(cfg: ExperimentConfig, run: RunDir, saved: dict[str, Any]) -> Path:
    """Return the SuperLink's state database.

    That is the one a resumed run used (runs from before the shared database kept theirs in the
    run folder), else ``mode.state_db`` or ``run.out_dir/coordinator/superlink.db``, shared by
    the coordinator's runs so that the hospitals' node registrations outlive a run.
    """
    if saved.get("state_db"):
        return Path(saved["state_db"])
    if (run.path / "superlink.db").is_file():
        return run.path / "superlink.db"
    default = Path(cfg.run.out_dir) / "coordinator" / "superlink.db"
    path = Path(cfg.mode.state_db or default).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _check_loopback_san(sans: list[str], tls: CoordinatorTls) -> None:
    """Check the certificate holds 127.0.0.1: the ServerApp and the flwr CLI verify it there."""
    if LOOPBACK not in sans:
        raise FedmiraError(f"{tls.server_cert} is not valid for {LOOPBACK} "
                           f"(SANs: {', '.join(sans) or 'none'}); "
                           "the ServerApp and the flwr CLI reach the SuperLink's operator address on "
                           f"{LOOPBACK}. Add IP:{LOOPBACK} to the certificate's subjectAltName "
                           "(`fedmira certs` does).")


def _check_start(cfg: ExperimentConfig, wanted: int) -> None:
    """Refuse settings that could never start a round, before anything is written or started."""
    parse_address(cfg.mode.superlink)
    if wanted < cfg.strategy.min_train_sites:
        raise ConfigError(f"Waiting for {wanted} hospital(s) but strategy.min_train_sites="
                          f"{cfg.strategy.min_train_sites}; raise --wait-sites or lower min_train_sites.")


def _serve(link: DeploymentSuperLink, run: RunDir, cfg: ExperimentConfig, entries: list[tuple[str, str]],
           wanted: int, out: TextIO, verbose: bool) -> tuple[str, float]:
    """SuperLink up, keys registered, hospitals online, run streamed; (Flower status, start time)."""
    toml_path = write_run_config(run, cfg)
    with open(run.path / "flower.log", "a", encoding="utf-8") as log_file, link, \
            SecurityEcho(link.log_path, run.path / "security.log", out):
        stop_flower_run(link, run.state().get("flower_run_id"))
        added = register_keys(link, entries)
        if added:
            print(f"Registered {len(added)} hospital key(s): {', '.join(added)}", file=out)
        nodes = allow_listed_node_ids(link.database, entries)
        run.write_allowed_nodes(nodes)
        wait_for_sites(link, wanted, out, allowed=frozenset(nodes.values()))
        started = time.perf_counter()
        with RunFollower(run, cfg.strategy.rounds, lambda text, g: print(text, file=out, flush=True)):
            run_id = stream_run(link, toml_path, [], _progress(run, out, verbose), log_file)
        status = run_status(link, run_id) if run_id is not None else "not started"
    return status, started


class SecurityEcho:
    """Follow the SuperLink's log while the run lives.

    Every ``[fedmira-security]`` line (a request refused on the fleet address) goes to the
    console and to ``RUN_DIR/security.log``.
    """

    def __init__(self, source: Path, sink: Path, out: TextIO, poll_s: float = 0.5) -> None:
        self.source, self.sink, self.out, self.poll_s = source, sink, out, poll_s
        self.offset = source.stat().st_size if source.is_file() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="fedmira-security-echo", daemon=True)

    def __enter__(self) -> SecurityEcho:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.drain()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.drain()

    def drain(self) -> None:
        """Echo the security lines written since the last call."""
        if not self.source.is_file():
            return
        with open(self.source, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # whole lines only; the rest is read next time
        self.offset += end
        lines = [ln for ln in chunk[:end].decode(errors="replace").splitlines() if SECURITY_TAG in ln]
        if lines:
            with open(self.sink, "a", encoding="utf-8") as sink:
                for line in lines:
                    text = line[line.index(SECURITY_TAG):]
                    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}", file=sink)
                    print(text, file=self.out, flush=True)


def _progress(run: RunDir, out: TextIO, verbose: bool) -> Callable[[str], None]:
    """Flower's output: its errors (all of it with -v); progress comes from the run folder."""
    def on_line(line: str) -> None:
        if verbose or shown(line):
            print(line, file=out, flush=True)
        if "Successfully started run" in line:
            run.mark(flower_run_id=int(line.rsplit(" ", 1)[-1]))

    return on_line


def coordinator_command(overrides: Sequence[str], *, certs: str | None = None,
                        allow_list: str | None = None, wait_sites: int = 0, verbose: bool = False) -> int:
    """``fedmira coordinator [--certs DIR] [--allow-list FILE] [--wait-sites N] [overrides]``."""
    from fedmira.common.compose import compose_config

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise FedmiraError(f"Unexpected argument(s) {bad}: overrides look like key=value (see --help).")
    resume = any(o.startswith(("run.resume=", "+run.resume=")) for o in overrides)
    given_mode = any(o.startswith(("mode=", "+mode=")) for o in overrides)
    cfg = compose_config([*([] if given_mode else DEPLOYMENT_BASE), *overrides])
    return coordinate(cfg, certs=certs, allow_list=allow_list, wait_sites=wait_sites,
                      resume_overrides=overrides if resume else (), verbose=verbose)
