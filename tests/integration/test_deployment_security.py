"""The attacks of issue 14 against a real loopback deployment (TLS, SuperNode authentication).

1. Someone holding only the public CA certificate reaches the hospitals' port: registering a
   SuperNode key of their own (`flwr supernode register`), listing or stopping runs (`flwr ls`,
   `flwr stop`) all fail with 403, and the coordinator's console says so.
2. A third party on the coordinator's machine registers a key through the operator's loopback
   Control API and starts a SuperNode with it: the node is online, but it is not counted as a
   hospital, it gets no task in the round, the run completes with the allow-listed hospitals and
   the coordinator's console names the refused node.
3. A second coordinator started on the live run folder exits 2 naming the holder (pid, start
   time), and the live run completes.
4. The hospitals outlive the run: the coordinator's next run (a new run folder, the same shared
   SuperLink database) trains with the same hospital processes.
5. A round that loses a hospital below strategy.min_train_sites ends the coordinator with exit 3
   and the reason on its console in one line (not a bare traceback header).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedmira.common.rundir import RunDir
from fedmira.server.certs import make_node_key
from fedmira.simulations.loopback import Federation
from tests.integration.test_deployment import QUICK, TINY, _run_dir, fed  # noqa: F401

pytestmark = pytest.mark.integration


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_allow_list_and_the_control_api_hold(fed: Federation) -> None:  # noqa: F811
    fed.coordinator(TINY, "strategy.rounds=1", "strategy.min_train_sites=2", "strategy.min_evaluate_sites=2",
                    "--wait-sites", "2")
    operator = fed.wait_log("coordinator", r"Operator: https://(127\.0\.0\.1:\d+)", timeout=120)
    assert operator, fed.log("coordinator")[-3000:]
    assert fed.wait_log("coordinator", r"hospitals online", timeout=60), fed.log("coordinator")[-3000:]
    run = _run_dir(fed)
    assert fed.pki is not None
    rogue_key, rogue_pub = make_node_key("rogue")
    (fed.root / "rogue_key").write_bytes(rogue_key)
    (fed.root / "rogue_key").chmod(0o600)
    (fed.root / "rogue.pub").write_bytes(rogue_pub)

    # 1. The hospitals' port with only the CA certificate: no Control API.
    attacker = fed.root / "attacker"
    attacker.mkdir()
    (attacker / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "{fed.address}"\n'
        f'root-certificates = "{fed.pki.ca_cert}"\n')
    register = _flwr(attacker, "supernode", "register", str(fed.root / "rogue.pub"), "target",
                     "--format", "json")
    assert "403" in register.stdout and '"success": false' in register.stdout, register.stdout
    for args in (("ls", "target"), ("stop", "1", "target")):
        assert "403" in (r := _flwr(attacker, *args)).stdout + r.stderr, r.stdout + r.stderr
    assert fed.wait_log("coordinator", r"\[fedmira-security\] refused POST /v1/control/register-node",
                        timeout=30)
    assert fed.wait_log("coordinator", r"\[fedmira-security\] refused POST /v1/control/stop-run", timeout=30)
    assert "stop-run" in (run.path / "security.log").read_text()

    # A second coordinator on the live run folder (a resume typed twice) is refused and harms nothing.
    second = fed.resume_coordinator(run.path, name="second")
    assert second.wait(timeout=120) == 2, fed.log("second")[-2000:]
    assert re.search(r"in use by `fedmira coordinator` \(pid \d+", fed.log("second")), fed.log("second")
    assert fed.procs["coordinator"].poll() is None

    # 2. A key registered on the coordinator's machine, outside the allow-list.
    inside = _flwr(run.path / ".flwr", "supernode", "register", str(fed.root / "rogue.pub"), "fedmira",
                   "--format", "json")
    rogue_node = int(json.loads(inside.stdout[inside.stdout.find("{"):])["node-id"])
    fed.hospital(2, TINY, key=fed.root / "rogue_key", extra=(QUICK,), name="rogue")
    assert fed.wait_log("rogue", r"Connected to .* as SuperNode", timeout=150), fed.log("rogue")[-2000:]
    for i in (0, 1):
        fed.hospital(i, TINY, extra=(QUICK,))
    assert fed.procs["coordinator"].wait(timeout=300) == 0, fed.log("coordinator")[-3000:]
    rows = RunDir(run.path).metrics()
    assert [r["round"] for r in rows] == [1] and set(rows[0]["train_sites"]) == {"site_01", "site_02"}
    refused = [r for r in rows[0]["rejected"] if "allow-list" in r["reason"]]
    assert [r["site"] for r in refused] == [f"node-{rogue_node}"]
    assert re.search(rf"Round 1: excluded node-{rogue_node}: not on the allow-list",
                     fed.log("coordinator")), fed.log("coordinator")[-3000:]
    assert "task received" not in fed.log("rogue")

    # 4. The hospitals outlive the run: a new run of the coordinator finds them, nobody restarts them.
    assert fed.procs["hospital1"].poll() is None and fed.procs["hospital2"].poll() is None
    fed.coordinator(TINY, "strategy.rounds=1", "strategy.min_train_sites=2", "strategy.min_evaluate_sites=2",
                    "--wait-sites", "2", name="next_run")
    assert fed.procs["next_run"].wait(timeout=300) == 0, fed.log("next_run")[-3000:]
    runs = sorted((fed.root / "outputs" / "deployment").glob("*/config.json"))
    assert len(runs) == 2
    (row,) = RunDir(runs[-1].parent).metrics()
    assert set(row["train_sites"]) == {"site_01", "site_02"}
    assert "Registered" not in fed.log("next_run")  # the keys were kept in the shared database

    # 5. A hospital lost mid-round below min_train_sites: exit 3, the reason in one console line.
    fed.coordinator(TINY, "strategy.rounds=1", "strategy.min_train_sites=2", "strategy.min_evaluate_sites=2",
                    "strategy.round_timeout_s=20", "--wait-sites", "2", name="short_run")
    assert fed.wait_log("hospital2", r"(?s)(task received: train.*){3}", timeout=240), \
        fed.log("hospital2")[-2000:]
    fed.kill("hospital2")
    assert fed.procs["short_run"].wait(timeout=240) == 3, fed.log("short_run")[-3000:]
    console = fed.log("short_run")
    assert re.search(r"FAILED \(too_few_sites\): Round 1: only 1 of 2 sampled sites .*excluded: ",
                     console), console[-3000:]
    assert "reason:   Round 1: only 1 of 2" in console and "Traceback" not in console
