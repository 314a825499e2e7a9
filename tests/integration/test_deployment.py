"""A real deployment on loopback: coordinator + 3 hospitals, TLS, SuperNode authentication, SecAgg+.

Every process is started with the commands of docs/deployment.md (``python -m
fedmira coordinator|hospital``, the same functions as ``fedmira coordinator`` /
``fedmira hospital``), on free ports of 127.0.0.1, and every process (Flower's too) is ended at
the end of each test (``simulations.loopback.Federation`` marks them all).

The run uses secure aggregation (``strategy.secure_aggregation=secaggplus``): the coordinator
only ever unmasks the sum of the hospitals' adapters. (The plain path runs in
test_deployment_security.py and in every simulation test.)

One scenario, since every start costs about a minute of imports on 2 cores:

1. a 4th SuperNode whose key is not on the allow-list is refused with a message that says so;
2. round 1 with the 3 hospitals and the tiny model; the run folder is a simulation's;
3. a hospital killed mid-round (it has shared its SecAgg+ keys and is training) does not stop
   the round: the other two finish it, and its masks are removed with their shares
   (strategy.min_train_sites=2; the dead one is excluded once the SuperLink reports it
   unavailable or after strategy.round_timeout_s), and they reuse the model they loaded (warm
   executor);
4. the coordinator killed mid-run resumes after its last committed round with the hospitals that
   are still up, which reconnect by themselves, and completes rounds 3 and 4.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from fedmira.common.rundir import RunDir
from fedmira.server.certs import make_node_key
from fedmira.simulations.loopback import Federation

pytestmark = pytest.mark.integration

TINY = "+debug=tiny"
QUICK = "--no-dry-run"
SECAGG = ("strategy.secure_aggregation=secaggplus", "strategy.secagg_timeout_s=20")
#: A hospital's log line for the strategy's own train message (not a SecAgg+ train.secagg stage).
TRAIN_TASK = r"task received: train$"  # the dry run is exercised once, by the first hospital


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    federation = Federation(tmp_path).setup()
    yield federation
    left = federation.close()
    assert not left, f"processes still running after the test: {left}"


def _wait_round(run: RunDir, target: int, fed: Federation, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while run.last_round < target:
        assert time.monotonic() < deadline, f"round {target} not committed:\n{fed.log('coordinator')[-3000:]}"
        assert fed.procs["coordinator"].poll() is None, fed.log("coordinator")[-3000:]
        time.sleep(0.5)


def _run_dir(fed: Federation, timeout: float = 60) -> RunDir:
    deadline = time.monotonic() + timeout
    while (path := fed.run_dir()) is None:
        assert time.monotonic() < deadline, fed.log("coordinator")
        time.sleep(0.5)
    return RunDir(path)


def test_deployment_tls_auth_dropout_and_restart(fed: Federation) -> None:
    """One scenario (each phase costs a minute of start-up on 2 cores): see the module docstring."""
    fed.coordinator(TINY, "strategy.rounds=4", "strategy.min_train_sites=2", "strategy.min_evaluate_sites=2",
                    "strategy.round_timeout_s=20", *SECAGG)
    intruder_key = fed.root / "intruder_key"
    intruder_key.write_bytes(make_node_key("intruder")[0])
    intruder_key.chmod(0o600)
    fed.hospital(0, TINY)  # with the dry run: what leaves the hospital
    for i in (1, 2):
        fed.hospital(i, TINY, extra=(QUICK,))
    fed.hospital(2, TINY, key=intruder_key, extra=(QUICK,), name="intruder")

    # 1. An unknown key is refused, with a message that says why.
    assert fed.procs["intruder"].wait(timeout=150) == 2, fed.log("intruder")[-2000:]
    assert "not on its allow-list" in fed.log("intruder")
    assert fed.wait_log("coordinator",
                        r"\[fedmira-security\] refused node on /v1/fleet/activate-node .*HTTP 412",
                        timeout=30), fed.log("coordinator")[-3000:]  # the coordinator sees it too

    # 2. Round 1: three hospitals over TLS with authentication; the run folder is a simulation's.
    run = _run_dir(fed)
    _wait_round(run, 1, fed, timeout=150)
    first = run.metrics()[0]
    assert set(first["train_sites"]) == {"site_01", "site_02", "site_03"}
    assert first["evaluate"]["val-loss"] > 0
    assert (run.path / "rounds" / "round_0001" / "adapter_config.json").is_file()
    assert (fed.root / "outputs" / "coordinator" / "superlink.db").is_file()  # shared by the runs
    assert json.loads((run.path / "sites" / "sites.json").read_text())["train_sites"] == [
        "hospital_01", "hospital_02", "hospital_03"]
    log = fed.log("hospital1")
    assert "LoRA tensors" in log and "never: report text" in log
    assert "SecAgg+: 3 shares, threshold 2" in (run.path / "flower.log").read_text()
    assert "task received: train.secagg (SecAgg+ key or unmask stage)" in log
    up = {s: c["up_bytes"] for s, c in first["comm"]["sites"].items()}
    assert all(b > first["train_sites"][s]["bytes-sent"] for s, b in up.items())  # + keys and shares

    # 3. A hospital dies in the middle of round 2: the other two finish the round.
    assert fed.wait_log("hospital3", rf"(?ms)({TRAIN_TASK}.*){{2}}", timeout=60)
    fed.kill("hospital3")
    _wait_round(run, 2, fed, timeout=90)
    second = run.metrics()[1]
    assert set(second["train_sites"]) == {"site_01", "site_02"}
    assert "site_03" in [r["site"] for r in second["rejected"]]  # logged as excluded
    assert fed.wait_log("coordinator", r"round 2/4 \| .*\| 1 site\(s\) excluded", timeout=30), \
        fed.log("coordinator")[-3000:]  # once, not by node id and by site id
    assert [s["cold-start"] for s in second["train_sites"].values()] == [0, 0]  # the model stayed loaded

    # 4. The coordinator dies mid-run; restarted, it resumes after round 2 with the hospitals left.
    fed.kill("coordinator", signal.SIGKILL)
    done = run.last_round
    assert done in (2, 3)
    fed.resume_coordinator(run.path, "--wait-sites", "2")
    assert fed.wait_log("coordinator", r"Run (completed|FAILED)", timeout=150), fed.log("coordinator")[-3000:]
    assert fed.procs["coordinator"].wait(timeout=60) == 0, fed.log("coordinator")[-3000:]
    rows = run.metrics()
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[-1]["train_sites"]) == {"site_01", "site_02"}
    assert f"Resuming {run.path} after round {done} of 4" in fed.log("coordinator")
    assert (run.path / "final_adapter" / "adapter_model.safetensors").is_file()
    assert run.state()["status"] == "completed"
