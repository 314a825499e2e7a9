"""SecAgg+ through Flower's simulation engine: ``fedmira simulate strategy.secure_aggregation=secaggplus``.

One round of the tiny model with 3 simulated hospitals, with and without SecAgg+, through the
launcher users run (a private SuperLink, Ray, the real ClientApp). The secure global adapter
must equal the plain one within the protocol's stated quantization bound, every site must stay
in the round, and what the sites sent must be masked integers. (Across several rounds the
sites' training amplifies a round's tiny difference, so the bound is stated per round.)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedmira.common.compose import compose_config
from fedmira.common.rundir import RunDir
from fedmira.common.secagg import SecAggParams, error_bound
from fedmira.simulations.launch import simulate

pytestmark = pytest.mark.integration

TINY = ["+debug=tiny", "strategy.rounds=1", "eval.every=0"]


def _run(tmp_path: Path, *extra: str) -> tuple[RunDir, str]:
    out = io.StringIO()
    cfg = compose_config([*TINY, f"run.out_dir={tmp_path / 'outputs'}", *extra])
    code = simulate(cfg, out=out)
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if (p / "config.json").is_file()]
    run = RunDir(run_dir)
    assert code == 0, out.getvalue() + (run.path / "flower.log").read_text()[-3000:]
    return run, out.getvalue()


def _adapter(run: RunDir) -> dict[str, np.ndarray]:
    return load_file(str(run.path / "final_adapter" / "adapter_model.safetensors"))


def test_simulate_with_secaggplus_matches_plain_fedavg_within_the_bound(tmp_path: Path) -> None:
    plain_run, _ = _run(tmp_path / "plain")
    secure_run, _ = _run(tmp_path / "secure", "strategy.secure_aggregation=secaggplus")
    (row,) = secure_run.metrics()
    assert row["rejected"] == [] and row["train"]["num-sites"] == 3
    counts = [int(m["num-examples"]) for m in row["train_sites"].values()]
    s = compose_config(TINY).strategy
    bound = error_bound(counts, SecAggParams(
        num_shares=s.secagg_num_shares, reconstruction_threshold=s.secagg_reconstruction_threshold,
        clipping_range=s.secagg_clipping_range, quantization_range=s.secagg_quantization_range,
        max_weight=max(counts)))
    plain, secure = _adapter(plain_run), _adapter(secure_run)
    assert set(plain) == set(secure)
    worst = max(float(np.abs(plain[k] - secure[k]).max()) for k in plain)
    assert 0 < worst <= bound, (worst, bound)
    # the protocol's key and unmask messages are counted: a site sends more than its adapter
    (plain_row,) = plain_run.metrics()
    for site, comm in row["comm"]["sites"].items():
        assert comm["up_bytes"] > plain_row["comm"]["sites"][site]["up_bytes"]
    assert "SecAgg+: 3 shares, threshold 2" in (secure_run.path / "flower.log").read_text()
