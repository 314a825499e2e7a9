"""The hospital's ClientApp: parse the message, call ``common.site``, reply with adapter + metrics.

Where the site's reports are:

- deployment: the SuperNode's node config ``data-path`` (a folder with ``train.jsonl`` and
  ``val.jsonl``) and ``site-id``; hospital paths come only from there.
- simulation: the launcher wrote one folder per simulated hospital under ``RUN_DIR/sites`` and
  ``sites.json`` maps Flower's ``partition-id`` to a site id.

With ``strategy=hetero_svd`` a hospital trains at its own LoRA rank: node config ``lora-rank``
(deployment), else ``strategy.site_ranks`` cycled over the simulated sites (``common.site``).

Only LoRA tensors and numeric metrics go back; never report text, never base weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import ExperimentConfig
from common.site import (
    ModelCache, SiteData, load_site, local_evaluate, local_train, site_lora, site_rank,
)
from common.transport import encode_state

app = ClientApp()

# Process-wide caches: a Ray actor (simulation) or a long-lived SuperNode process serves many
# rounds; loading the base model and reading the reports once saves seconds per round.
_MODELS = ModelCache()
_SITES: dict[str, SiteData] = {}


def _site(context: Context, cfg: ExperimentConfig) -> tuple[SiteData, int]:
    node = context.node_config
    if "data-path" in node:
        folder = Path(str(node["data-path"]))
        site_id = str(node.get("site-id", folder.name))
        index = int(node.get("site-index", 0))
    else:
        sites_dir = Path(cfg.run.dir) / "sites"
        site_ids = json.loads((sites_dir / "sites.json").read_text())["train_sites"]
        index = int(node["partition-id"])
        site_id = site_ids[index]
        folder = sites_dir / site_id
    key = str(folder)
    if key not in _SITES:
        _SITES[key] = load_site(folder, site_id)
    return _SITES[key], index


def _prepare(msg: Message, context: Context) -> tuple[ExperimentConfig, SiteData, int, object, bool, float]:
    start = time.perf_counter()
    cfg = ExperimentConfig.from_run_config(context.run_config)
    site, index = _site(context, cfg)
    lora = site_lora(cfg, site_rank(cfg, context.node_config, index))
    worker, cold = _MODELS.get(cfg.model, lora, seed=cfg.train.seed)
    return cfg, site, index, worker, cold, time.perf_counter() - start


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local LoRA training on this hospital's reports."""
    cfg, site, index, worker, cold, setup_s = _prepare(msg, context)
    conf = msg.content["config"]
    g = int(conf["global-round"])
    global_state = msg.content["arrays"].to_torch_state_dict()
    state, metrics = local_train(
        worker, site, cfg, global_state,  # type: ignore[arg-type]
        lr=float(conf["lr"]), steps=int(conf["local-steps"]), seed=cfg.train.seed * 1000003 + g * 1009 + index,
        proximal_mu=float(conf.get("proximal-mu", 0.0)),  # type: ignore[arg-type]  (sent by fedprox)
    )
    metrics.update({"setup-s": setup_s, "cold-start": int(cold), "site-index": index})
    payload = encode_state(state, cfg.strategy.transport_dtype)  # bfloat16 as uint16 bits
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in payload.items()}),
        "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
        "site": ConfigRecord({"site-id": site.site_id}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global adapter on this hospital's validation split."""
    cfg, site, index, worker, cold, setup_s = _prepare(msg, context)
    global_state = msg.content["arrays"].to_torch_state_dict()
    metrics = local_evaluate(worker, site, cfg, global_state)  # type: ignore[arg-type]
    metrics.update({"setup-s": setup_s, "cold-start": int(cold), "site-index": index})
    content = RecordDict({
        "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
        "site": ConfigRecord({"site-id": site.site_id}),
    })
    return Message(content=content, reply_to=msg)
