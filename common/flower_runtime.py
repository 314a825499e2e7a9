"""Start a private Flower SuperLink, submit a run with ``flwr run``, stream it, stop everything.

Why a private SuperLink instead of ``flwr run``'s managed local one: the managed one is detached,
listens on a fixed port (so two runs collide) and outlives the command. Ours listens on a free
loopback port, keeps its state database and log in the run folder, dies with the launcher (also
on SIGKILL, through the kernel's parent-death signal), and is stopped when the run ends.

Runtime dependency installation is disabled (it would pull a CUDA torch online and fails
offline), and so are telemetry and update checks.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from fedmira.common.errors import ConfigError, FedmiraError

PR_SET_PDEATHSIG = 1
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Every process of a run (SuperLink, SuperExec, flwr-simulation, Ray's daemons and workers)
# inherits this variable; it is how the run's whole process tree is found again, even after
# Flower's children moved to sessions of their own and the launcher died.
RUN_MARKER = "FEDMIRA_RUN_DIR"


def port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound now (another program listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port), with a message that says what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"Address {address!r} is not host:port (e.g. 127.0.0.1:9092 or "
                          "coordinator.example.org:9092); set mode.superlink.")
    return host.strip("[]"), int(port)


def free_port() -> int:
    """Find a TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()  # own process group: stop() signals the whole tree at once
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: stop() still cleans up on normal exits
        pass


def flower_env(flwr_home: Path, ray_address: str = "", run_dir: Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: offline-safe, quiet, and finding the venv's commands."""
    env = dict(os.environ)
    if run_dir is not None:
        env[RUN_MARKER] = str(run_dir)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "0",
    })
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


class SimulationSuperLink:
    """A SuperLink in simulation mode on a free loopback port, owned by this process.

    Subclasses change what is started (:meth:`command`), how the ``flwr`` CLI reaches it
    (:meth:`connection_toml`) and where (``host``, ``port``): ``server/coordinator.py`` starts
    the coordinator's TLS SuperLink with SuperNode authentication this way.
    """

    def __init__(self, run_dir: Path, ray_address: str = "", *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.run_dir = run_dir
        self.flwr_home = run_dir / ".flwr"
        self.host = host
        self.port = port or free_port()
        self.env = flower_env(self.flwr_home, ray_address, run_dir)
        self.reaper: subprocess.Popen[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = run_dir / "superlink.log"
        #: The log line that says the SuperLink serves (a subclass may wait for another).
        self.ready_marker = b"Application startup complete"

    @property
    def address(self) -> str:
        """Where the ``flwr`` CLI reaches the SuperLink (its Control API)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"

    def connection_toml(self) -> str:
        """Return the ``$FLWR_HOME/config.toml`` text naming this SuperLink as connection ``fedmira``."""
        return ('[superlink]\ndefault = "fedmira"\n\n[superlink.fedmira]\n'
                f'address = "{self.address}"\ninsecure = true\n')

    def command(self) -> list[str]:
        """Build the ``flower-superlink`` command line."""
        return [
            "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", self.host, "--port", str(self.port),
            "--database", str(self.run_dir / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink (and its reaper) and wait up to ``timeout`` s for it to be ready."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(self.connection_toml())
        start_at = self.log_path.stat().st_size if self.log_path.is_file() else 0
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        record_pids(self.run_dir, [self.proc.pid])
        self.reaper = start_reaper(self.run_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FedmiraError(f"The Flower SuperLink exited at start-up; see {self.log_path}.")
            with open(self.log_path, "rb") as f:  # this start's lines only (the log is appended to)
                f.seek(start_at)
                if self.ready_marker in f.read():
                    return
            time.sleep(0.3)
        raise FedmiraError(f"The Flower SuperLink did not start within {timeout:.0f} s; see {self.log_path}.")

    def stop(self) -> None:
        """Stop the SuperLink, the processes it left behind and the reaper."""
        if self.proc is not None and self.proc.poll() is None:
            stop_group(self.proc.pid)
        self.proc = None
        kill_marked(self.run_dir)  # Flower's children that left the SuperLink's process group
        if self.reaper is not None:
            self.reaper.kill()
            self.reaper.wait()
            self.reaper = None

    def __enter__(self) -> SimulationSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM a process group, then SIGKILL whatever is left after ``grace`` seconds."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def marked_pids(run_dir: Path) -> list[int]:
    """Find the PIDs of live processes started for ``run_dir`` by the marker in their environment.

    With psutil; processes of other users, or already gone, are skipped.
    """
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(RUN_MARKER) == str(run_dir):
                found.append(proc.pid)
        except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
            continue
    return found


def kill_marked(run_dir: Path, grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL, every process of ``run_dir``; returns how many there were."""
    import psutil

    procs = []
    for pid in marked_pids(run_dir):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    alive = list(procs)
    for method in ("terminate", "kill"):
        for proc in alive:
            try:
                getattr(proc, method)()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=grace)
        if not alive:
            break
    return len(procs)


def start_reaper(run_dir: Path) -> subprocess.Popen[bytes]:
    """Start a small watchdog that ends the run's processes if the launcher dies (even by SIGKILL)."""
    env = {k: v for k, v in os.environ.items() if k != RUN_MARKER}
    return subprocess.Popen(
        [sys.executable, "-m", "fedmira.common.flower_runtime", str(os.getpid()), str(run_dir)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, cwd=str(PROJECT_ROOT),
    )


def _reap(parent: int, run_dir: Path) -> None:
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            kill_marked(run_dir)
            return
        time.sleep(0.5)


def record_pids(run_dir: Path, pids: list[int]) -> None:
    """Record ``pids`` in ``run_dir/processes.json`` for :func:`stop_recorded` after a crash."""
    (run_dir / "processes.json").write_text(json.dumps({"pids": pids}))


def stop_recorded(run_dir: Path) -> None:
    """Stop processes a previous (killed) launcher of this run may have left behind."""
    path = run_dir / "processes.json"
    if not path.is_file():
        return
    ours = set(marked_pids(run_dir))  # a recorded pid may since belong to another program
    for pid in json.loads(path.read_text()).get("pids", []):
        if int(pid) in ours:
            stop_group(int(pid), grace=5.0)
    path.unlink(missing_ok=True)
    kill_marked(run_dir)


def submit_and_stream(
    link: SimulationSuperLink, run_config_toml: Path, num_sites: int, client_cpus: float,
    client_gpus: float, on_line: Callable[[str], None], log_file: TextIO,
) -> int | None:
    """``flwr run`` this project on ``link`` and stream its logs; returns the run id."""
    fed = (f"num-supernodes={num_sites} client-resources-num-cpus={client_cpus} "
           f"client-resources-num-gpus={client_gpus}")
    return stream_run(link, run_config_toml, ["--federation-config", fed], on_line, log_file)


def stream_run(link: SimulationSuperLink, run_config_toml: Path, extra: list[str],
               on_line: Callable[[str], None], log_file: TextIO) -> int | None:
    """``flwr run PROJECT fedmira --run-config TOML [extra] --stream``; returns the run id."""
    cmd = ["flwr", "run", str(PROJECT_ROOT), "fedmira", "--run-config", str(run_config_toml),
           *extra, "--stream"]
    proc = subprocess.Popen(cmd, env=link.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, bufsize=1, cwd=str(PROJECT_ROOT))
    run_id: int | None = None
    assert proc.stdout is not None
    for line in proc.stdout:
        log_file.write(line)
        log_file.flush()
        m = re.search(r"Successfully started run (\d+)", line)
        if m:
            run_id = int(m.group(1))
        on_line(line.rstrip("\n"))
    proc.wait()
    return run_id


def run_status(link: SimulationSuperLink, run_id: int) -> str:
    """Ask the SuperLink for the status of a run (e.g. 'finished:completed', 'finished:failed')."""
    out = subprocess.run(["flwr", "ls", "fedmira", "--run-id", str(run_id), "--format", "json"],
                         env=link.env, capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(out.stdout).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"
    except (json.JSONDecodeError, AttributeError):
        return "unknown"


if __name__ == "__main__":  # the reaper: python -m fedmira.common.flower_runtime LAUNCHER_PID RUN_DIR
    _reap(int(sys.argv[1]), Path(sys.argv[2]))
