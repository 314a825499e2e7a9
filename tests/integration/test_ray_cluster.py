"""``mode.ray_address``: a simulation joins a Ray cluster that is already running.

Scale-out is "start Ray on the machines, point fedmira at the head": this starts a local head
(``ray start --head`` on 127.0.0.1, its own temp folder and an environment marker), runs a tiny
2-round simulation through it, checks the sites ran as tasks of *that* cluster, and stops only
that cluster's processes (``ray stop`` would end every Ray process of the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from fedmira.common.compose import compose_config
from fedmira.common.flower_runtime import free_port
from fedmira.common.rundir import RunDir
from fedmira.simulations.launch import simulate
from fedmira.simulations.loopback import MARKER, pids_with_marker

pytestmark = pytest.mark.integration


@pytest.fixture
def ray_head() -> str:
    marker, port = uuid.uuid4().hex, free_port()
    temp = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(Path(sys.executable).parent / "ray")
    started = subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                              "--num-cpus", "2", "--temp-dir", temp, "--include-dashboard", "false",
                              "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    yield f"127.0.0.1:{port}"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids_with_marker(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while pids_with_marker(marker) and time.monotonic() < deadline:
            time.sleep(0.3)
    assert not pids_with_marker(marker), "processes of the test's Ray cluster still running"
    shutil.rmtree(temp, ignore_errors=True)


def test_a_simulation_runs_on_an_existing_ray_cluster(tmp_path: Path, ray_head: str) -> None:
    cfg = compose_config(["+debug=tiny", f"run.out_dir={tmp_path / 'outputs'}",
                          f"mode.ray_address={ray_head}", "strategy.rounds=2", "mode.client_cpus=1"])
    assert simulate(cfg) == 0
    (run_dir,) = sorted((tmp_path / "outputs" / "synthetic-natural").iterdir())
    rows = RunDir(run_dir).metrics()
    assert [r["round"] for r in rows] == [1, 2] and len(rows[-1]["train_sites"]) == 3
