"""A whole deployment on one machine, over loopback: the coordinator and N hospitals as processes.

Used by the deployment test (``tests/integration/test_deployment.py``) and the per-round
overhead benchmark (``python -m fedmira.simulations.bench.deploy_overhead``); docs/deployment.md shows
the same steps as shell commands. Every process runs the real commands (``python -m
fedmira coordinator|hospital``) with TLS and SuperNode authentication, and
carries an environment marker so :meth:`Federation.close` can end all of them, including the
Flower processes they start, whatever state they are in.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmira.common.flower_runtime import _die_with_parent, free_port
from fedmira.server.certs import DevPki, make_dev_pki

MARKER = "FEDMIRA_LOOPBACK"


def write_demo_sites(out: Path, num_sites: int = 3, reports: int = 90, seed: int = 7) -> list[Path]:
    """One folder per hospital (train/val/test.jsonl) from the synthetic corpus."""
    from fedmira.common.partition import partition_reports, write_site_folders
    from fedmira.common.synthetic import make_synthetic_corpus

    splits = partition_reports(make_synthetic_corpus(num_sites, reports, seed))
    return write_site_folders(splits, out)


def pids_with_marker(value: str) -> list[int]:
    """Live processes whose environment holds ``FEDMIRA_LOOPBACK=value`` (Linux)."""
    needle = f"{MARKER}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@dataclass
class Federation:
    """PKI, site folders and the processes of one loopback deployment under ``root``."""

    root: Path
    num_sites: int = 3
    port: int = field(default_factory=free_port)
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    pki: DevPki | None = None
    sites: list[Path] = field(default_factory=list)

    def setup(self) -> Federation:
        """Write the development PKI and the hospitals' site folders."""
        self.pki = make_dev_pki(self.root / "pki", self.num_sites)
        self.sites = write_demo_sites(self.root / "sites", self.num_sites)
        return self

    @property
    def address(self) -> str:
        """Return the SuperLink's Fleet address, ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, MARKER: self.marker, "PYTHONUNBUFFERED": "1"}
        with open(self.root / f"{name}.log", "ab") as log:
            # Own session, and SIGKILL if this process dies (a killed test run leaves nothing:
            # each command's own watchdog then ends the Flower processes it started).
            proc = subprocess.Popen([sys.executable, "-m", "fedmira", *args], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(self.root), preexec_fn=_die_with_parent)
        self.procs[name] = proc
        return proc

    def coordinator(self, *overrides: str, name: str = "coordinator") -> subprocess.Popen[bytes]:
        """``fedmira coordinator --certs PKI mode.superlink=127.0.0.1:PORT run.out_dir=ROOT/outputs ...``."""
        assert self.pki is not None
        return self._start(name, ["coordinator", "--certs", str(self.pki.root),
                                  f"mode.superlink={self.address}", f"run.out_dir={self.root / 'outputs'}",
                                  *overrides])

    def resume_coordinator(self, run_dir: Path, *options: str,
                           name: str = "coordinator") -> subprocess.Popen[bytes]:
        """``fedmira coordinator [options] run.resume=RUN_DIR`` (TLS files and allow-list as recorded)."""
        return self._start(name, ["coordinator", *options, f"run.resume={run_dir}"])

    def hospital(self, index: int, *overrides: str, isolation: str = "warm", key: Path | None = None,
                 extra: tuple[str, ...] = (), name: str | None = None) -> subprocess.Popen[bytes]:
        """``fedmira hospital`` for site ``index`` (0-based) with its own key, data and workdir."""
        assert self.pki is not None
        folder = self.pki.hospital_dirs[index]
        name = name or f"hospital{index + 1}"
        return self._start(name, [
            "hospital", "--superlink", self.address, "--root-cert", str(folder / "ca.crt"),
            "--key", str(key or folder / "supernode_key"), "--data", str(self.sites[index]),
            "--workdir", str(self.root / f"work-{name}"), "--isolation", isolation, *extra, *overrides,
        ])

    def log(self, name: str) -> str:
        """Return a process's log so far (empty before it has one)."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait_log(self, name: str, pattern: str, timeout: float) -> re.Match[str] | None:
        """Wait until ``pattern`` appears in a process's log (None on timeout or exit)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.log(name)):
                return m
            if self.procs[name].poll() is not None:
                return re.search(pattern, self.log(name))
            time.sleep(0.5)
        return None

    def run_dir(self) -> Path | None:
        """Return the newest run folder under ``ROOT/outputs`` (None before there is one)."""
        runs = sorted((self.root / "outputs").glob("*/*/config.json"))
        return runs[-1].parent if runs else None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one process (SIGKILL: as a crash; its own children are ended by their reapers)."""
        proc = self.procs[name]
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            proc.wait(timeout=60)

    def close(self, grace: float = 10.0) -> list[int]:
        """SIGTERM every process of this federation, then SIGKILL; returns PIDs still alive after."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            time.sleep(0.2)
        for pid in pids_with_marker(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)
        return pids_with_marker(self.marker)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

