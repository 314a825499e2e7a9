"""train.devices: a site's round data-parallel over processes (gloo on CPU) gives one process's adapter."""

from __future__ import annotations

import pytest
import torch

from fedmira.common.adapters import get_adapter_state
from fedmira.common.compose import compose_config
from fedmira.common.errors import ConfigError
from fedmira.common.parallel import Shard, site_devices
from fedmira.common.reports import Report
from fedmira.common.site import ModelCache, SiteData, local_train


@pytest.mark.parametrize("n,world", [(7, 2), (3, 2), (1, 2), (8, 3), (2, 4)])
def test_shards_cover_every_row_once_in_order(n: int, world: int) -> None:
    idx = list(range(10, 10 + n))
    parts = [Shard(r, world).rows(idx) for r in range(world)]
    assert [i for p in parts for i in p] == idx
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_site_devices_on_cpu() -> None:
    assert site_devices(1, "cpu") == [torch.device("cpu")]
    assert site_devices(0, "cpu") == [torch.device("cpu")]  # auto: one process without CUDA
    assert site_devices(2, "cpu") == [torch.device("cpu")] * 2


def test_site_devices_refuses_more_gpus_than_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedmira.common.model as model

    monkeypatch.setattr(model, "resolve_device", lambda _: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert site_devices(0, "cuda") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(ConfigError, match=r"train.devices=3 asks for 3 GPUs but this site sees 2"):
        site_devices(3, "cuda")
    monkeypatch.setattr(model, "resolve_device", lambda _: torch.device("mps"))
    with pytest.raises(ConfigError, match="no collective backend"):
        site_devices(2, "mps")


def test_devices_refused_with_dp_sgd() -> None:
    with pytest.raises(ConfigError, match=r"train.devices.*Set train.devices=1 with privacy.enabled"):
        compose_config(["+debug=tiny", "privacy=dp", "train.devices=2"])


def test_two_gloo_processes_give_the_one_process_adapter(reports: list[Report]) -> None:
    """The site's whole round (local_train) with train.devices=2 vs 1, from the same global
    adapter: uneven slices (batch 3 over 2 processes), 2 micro-batches per step, FedProx and kept
    AdamW moments. Dropout off, since each process draws its own masks."""
    common = ["+debug=tiny", "lora.dropout=0.0", "train.batch_size=3", "train.grad_accum=2",
              "train.steps=3", "train.lr=0.01", "train.keep_optimizer_state=true", "train.threads=1"]
    site = SiteData("site-a", reports[:20], [])
    results = {}
    for devices in (1, 2):
        cfg = compose_config([*common, f"train.devices={devices}"])
        worker, _ = ModelCache().get(cfg.model, cfg.lora, seed=cfg.train.seed)
        start = {k: v.clone() for k, v in get_adapter_state(worker.model).items()}
        start = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5))
                 for k, v in start.items()}  # B is zero at init: start from a non-trivial adapter
        moments: dict[str, torch.Tensor] = {}
        for rnd in (1, 2):  # round 2 resumes AdamW's moments kept from round 1
            state, metrics = local_train(worker, site, cfg, start, lr=cfg.train.lr, steps=cfg.train.steps,
                                         seed=7, proximal_mu=0.1, global_round=rnd, optimizer_store=moments)
            start = state
        results[devices] = (state, metrics, dict(moments))
    (one, m1, opt1), (two, m2, opt2) = results[1], results[2]
    assert one.keys() == two.keys()
    moved = max(float((two[k] - one[k]).abs().max()) for k in one)
    assert moved < 1e-5, f"2 processes differ from 1 by {moved:.2e}"
    assert any(float(v.abs().max()) > 0 for v in one.values())
    for key in ("num-examples", "tokens"):
        assert m2[key] == m1[key]
    assert m2["train-loss"] == pytest.approx(m1["train-loss"], rel=1e-5)
    assert opt1.keys() == opt2.keys() and opt1
    for key in opt1:
        torch.testing.assert_close(opt2[key], opt1[key], rtol=1e-4, atol=1e-7)
