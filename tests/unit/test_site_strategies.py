"""What each strategy changes at a hospital: FedProx's term, FFA-LoRA's frozen A, per-site ranks,
16-bit transport. On the tiny model, through ``common.engine``/``common.site`` and the ClientApp.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

import fedmira.client.client_app as client_app
from fedmira.common.adapters import get_adapter_state
from fedmira.common.aggregation import adapter_rank, hetero_aggregate, truncate_adapter
from fedmira.common.compose import compose_config
from fedmira.common.config import DataConfig, ExperimentConfig, TrainConfig
from fedmira.common.engine import encode_reports, train_steps
from fedmira.common.errors import ConfigError
from fedmira.common.model import LoadedModel, apply_lora, load_base_model
from fedmira.common.reports import Report, write_jsonl
from fedmira.common.site import ModelCache, fit_rank, site_rank
from fedmira.common.transport import decode_array
from fedmira.server.ffa_lora import FedmiraFFALoRA
from fedmira.server.hetero_svd import FedmiraHeteroSVD

Factory = Callable[..., Any]


# --------------------------------------------------------------------------- FedProx in the engine
def _distance(model: Any, reference: list[torch.Tensor]) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    return float(sum(((p.detach() - r) ** 2).sum() for p, r in zip(params, reference)).sqrt())


def test_proximal_term_keeps_the_adapter_near_the_reference(
    tiny: LoadedModel, new_lora: Factory, perturb: Factory, reports: list[Report], data_cfg: DataConfig,
) -> None:
    examples = encode_reports(reports, tiny.tokenizer, data_cfg)
    cfg = TrainConfig(steps=6, batch_size=4, lr=2e-2, max_grad_norm=0.0)
    moved = {}
    for mu in (0.0, 50.0):
        model = new_lora()
        perturb(model, seed=1, scale=0.05)
        reference = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        result = train_steps(model, examples, cfg, tiny.device, int(tiny.tokenizer.pad_token_id), seed=3,
                             proximal=(mu, reference))
        moved[mu] = _distance(model, reference)
        assert np.isfinite(result.mean_loss)
    assert 0 < moved[50.0] < 0.5 * moved[0.0], moved


def test_proximal_reference_must_match_the_trainable_parameters(
    tiny: LoadedModel, new_lora: Factory, reports: list[Report], data_cfg: DataConfig,
) -> None:
    examples = encode_reports(reports[:4], tiny.tokenizer, data_cfg)
    with pytest.raises(ValueError, match="proximal reference"):
        train_steps(new_lora(), examples, TrainConfig(steps=1), tiny.device, int(tiny.tokenizer.pad_token_id),
                    proximal=(0.1, [torch.zeros(3)]))


# --------------------------------------------------------------------------- ranks at a site
def _hetero(ranks: list[int], r: int = 16) -> ExperimentConfig:
    listed = ",".join(map(str, ranks))
    return compose_config(["+debug=tiny", "strategy=hetero_svd", f"strategy.site_ranks=[{listed}]",
                           f"lora.r={r}"])


def test_site_rank_cycles_the_config_and_node_config_wins() -> None:
    cfg = _hetero([4, 8, 16])
    assert [site_rank(cfg, {}, i, own_rank=True) for i in range(5)] == [4, 8, 16, 4, 8]
    assert site_rank(cfg, {"lora-rank": 2}, 0, own_rank=True) == 2
    assert site_rank(cfg, {"lora-rank": "12"}, 0, own_rank=True) == 12
    with pytest.raises(ConfigError, match=r"lora-rank.*lora\.r=16"):
        site_rank(cfg, {"lora-rank": 32}, 0, own_rank=True)
    fedavg = compose_config(["+debug=tiny"])
    # only a message with own-rank (hetero_svd's) lets a site's rank differ
    assert site_rank(fedavg, {"lora-rank": 2}, 1, own_rank=False) == fedavg.lora.r
    assert site_rank(cfg, {"lora-rank": 2}, 1, own_rank=False) == cfg.lora.r
    no_list = compose_config(["+debug=tiny", "strategy=hetero_svd", "strategy.site_ranks=[]"])
    assert site_rank(no_list, {}, 3, own_rank=True) == no_list.lora.r


def test_model_cache_rewraps_for_another_rank_without_reloading() -> None:
    cfg = compose_config(["+debug=tiny"])
    cache = ModelCache()
    w8, cold8 = cache.get(cfg.model, cfg.lora)
    base = w8.loaded.model
    w4, cold4 = cache.get(cfg.model, dataclasses.replace(cfg.lora, r=4))
    assert (cold8, cold4) == (True, False) and w4.loaded.model is base
    assert adapter_rank({k: v.numpy() for k, v in get_adapter_state(w4.model).items()}) == 4
    again, cold = cache.get(cfg.model, dataclasses.replace(cfg.lora, r=4))
    assert again is w4 and not cold


def test_fit_rank_cuts_only_larger_adapters() -> None:
    rng = np.random.default_rng(0)
    state = {"m.lora_A.weight": rng.standard_normal((8, 6)).astype(np.float32),
             "m.lora_B.weight": rng.standard_normal((5, 8)).astype(np.float32)}
    glob = hetero_aggregate([state], [1], alpha=16, rank=8)
    torch_state = {k: torch.from_numpy(v) for k, v in glob.items()}
    assert fit_rank(torch_state, 8) is torch_state
    cut = fit_rank(torch_state, 4)
    for k, v in truncate_adapter(glob, 4).items():
        np.testing.assert_array_equal(cut[k].numpy(), v)


# --------------------------------------------------------------------------- the ClientApp per strategy
@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmira.common.synthetic import make_synthetic_corpus

    reports = list(make_synthetic_corpus(num_sites=2, num_reports=30, seed=3))[:10]
    folder = tmp_path_factory.mktemp("hospital") / "site_x"
    write_jsonl(reports[:8], folder / "train.jsonl")
    write_jsonl(reports[8:], folder / "val.jsonl")
    return folder


@pytest.fixture
def fresh_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_app, "_MODELS", ModelCache())
    monkeypatch.setattr(client_app, "_SITES", {})


def _initial(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    return get_adapter_state(apply_lora(load_base_model(cfg.model).model, cfg.lora, seed=cfg.train.seed))


def _train(cfg: ExperimentConfig, folder: Path, state: dict[str, torch.Tensor], node: dict[str, Any],
           **config: Any) -> Message:
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN)
    conf = {"lr": 5e-3, "local-steps": 2, "global-round": 1, **config}
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(conf)})
    msg = Message(content=content, metadata=metadata)
    ctx = Context(run_id=1, node_id=1, node_config={"data-path": str(folder), "site-id": "site_x", **node},
                  state=RecordDict(), run_config=cfg.to_run_config())
    reply = client_app.train(msg, ctx)
    assert not reply.has_error(), reply.error
    return reply


def test_ffa_lora_site_sends_only_b_and_keeps_a(site_dir: Path, fresh_caches: None) -> None:
    cfg = compose_config(["+debug=tiny", "strategy=ffa_lora"])
    state = _initial(cfg)
    reply = _train(cfg, site_dir, state, {}, **FedmiraFFALoRA.client_flags)  # what the strategy sends
    sent = reply.content["arrays"]
    assert set(sent) == {k for k in state if "lora_B" in k}
    assert reply.content["metrics"]["bytes-sent"] == sum(a.numpy().nbytes for a in sent.values())
    model = client_app._MODELS.get(cfg.model, cfg.lora, seed=cfg.train.seed)[0].model
    after = get_adapter_state(model)
    for k in state:
        if "lora_A" in k:
            assert torch.equal(after[k], state[k])  # A frozen at the shared init
    assert any(not torch.equal(after[k], state[k]) for k in state if "lora_B" in k)


def test_the_client_obeys_the_message_not_the_strategy_name(site_dir: Path, fresh_caches: None) -> None:
    """Issue 15: the client decided by comparing strategy names; now only the message's flags count."""
    cfg = compose_config(["+debug=tiny", "strategy=ffa_lora"])
    state = _initial(cfg)
    reply = _train(cfg, site_dir, state, {})  # an ffa_lora run, but this message says nothing
    assert set(reply.content["arrays"]) == set(state)  # so A is trained and sent too
    plain = compose_config(["+debug=tiny"])
    reply = _train(plain, site_dir, _initial(plain), {}, **{"freeze-lora-a": True})
    assert {k for k in reply.content["arrays"]} == {k for k in state if "lora_B" in k}


def test_bfloat16_transport_halves_the_upload(site_dir: Path, fresh_caches: None) -> None:
    cfg = compose_config(["+debug=tiny", "strategy.transport_dtype=bfloat16"])
    state = _initial(cfg)
    reply = _train(cfg, site_dir, state, {})
    arrays = reply.content["arrays"]
    assert {a.dtype for a in arrays.values()} == {"uint16"}
    full = sum(v.numel() * 4 for v in state.values())
    assert reply.content["metrics"]["bytes-sent"] == full // 2
    assert all(np.isfinite(decode_array(a.numpy())).all() for a in arrays.values())


def test_hetero_site_trains_at_its_rank_and_fedprox_mu_is_read(site_dir: Path, fresh_caches: None) -> None:
    cfg = _hetero([4, 8], r=8)
    state = _initial(cfg)  # the server's global adapter at lora.r = 8
    reply = _train(cfg, site_dir, state, {"lora-rank": 4}, **{"proximal-mu": 0.5},
                   **FedmiraHeteroSVD.client_flags)
    sent = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert set(sent) == set(state) and adapter_rank(sent) == 4
    assert reply.content["metrics"]["lora-rank"] == 4
    assert reply.content["metrics"]["bytes-received"] == sum(v.numel() * 4 for v in state.values())
