"""The hospital's ClientApp: parse the message, call ``common.site``, reply with adapter + metrics.

Where the site's reports are:

- deployment: the SuperNode's node config ``data-path`` (a folder with ``train.jsonl`` and
  ``val.jsonl``) and ``site-id``; hospital paths come only from there.
- simulation: the launcher wrote one folder per simulated hospital under ``RUN_DIR/sites`` and
  ``sites.json`` maps Flower's ``partition-id`` to a site id.

The client does what each message says, never what a strategy's name implies: with the
``own-rank`` flag (hetero_svd) a hospital trains at its own LoRA rank, node config ``lora-rank``
(deployment), else ``strategy.site_ranks`` cycled over the simulated sites (``common.site``);
with ``freeze-lora-a`` (ffa_lora) it trains and sends the B factors only.

With ``privacy.enabled`` each round is DP-SGD; the site's privacy ledger (accountant) is kept in
the node's Flower state and in a file under node config ``state-dir`` (default: the site's data
folder), so epsilon keeps counting across rounds and across a SuperNode restart.

With ``strategy.secure_aggregation=secaggplus`` the train message carries a ``secagg``
ConfigRecord and the reply holds the adapter only masked (SecAgg+, ``common/secagg.py``); the
key-exchange and unmask stages come as ``train.secagg`` messages (:func:`secagg_stage`). The
site's protocol secrets stay in the node's Flower state and are dropped after each round.

Only LoRA tensors and numeric metrics go back; never report text, never base weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmira.common.config import ExperimentConfig
from fedmira.common.engine import OPTIMIZER_KEY
from fedmira.common.privacy import LEDGER_KEY, AccountantState, ledger_file, load_state, save_state
from fedmira.common.secagg import RECORD, WEIGHT_KEY, SecAggError, site_stage
from fedmira.common.site import (
    ModelCache,
    SiteData,
    load_site,
    local_evaluate,
    local_train,
    plan_ledger,
    site_lora,
    site_rank,
)
from fedmira.common.transport import encode_state

app = ClientApp()

# Process-wide caches: a Ray actor (simulation) or a long-lived SuperNode process serves many
# rounds; loading the base model and reading the reports once saves seconds per round.
_MODELS = ModelCache()
_SITES: dict[str, SiteData] = {}


def _identity(context: Context, cfg: ExperimentConfig) -> tuple[str, int, Path]:
    """Return this node's site id, index and data folder, from its node config (no data read)."""
    node = context.node_config
    if "data-path" in node:
        folder = Path(str(node["data-path"]))
        return str(node.get("site-id", folder.name)), int(node.get("site-index", 0)), folder
    sites_dir = Path(cfg.run.dir) / "sites"
    site_ids = json.loads((sites_dir / "sites.json").read_text())["train_sites"]
    index = int(node["partition-id"])
    return site_ids[index], index, sites_dir / site_ids[index]


def _site(context: Context, cfg: ExperimentConfig) -> tuple[SiteData, int, Path]:
    site_id, index, folder = _identity(context, cfg)
    key = str(folder)
    if key not in _SITES:
        _SITES[key] = load_site(folder, site_id)
    return _SITES[key], index, folder


def _ledger_path(context: Context, cfg: ExperimentConfig, folder: Path) -> Path:
    """Return the site's privacy ledger file: node config ``state-dir``, else the site's data folder."""
    state_dir = Path(str(context.node_config.get("state-dir", folder)))
    return ledger_file(state_dir, cfg)


def _load_ledger(context: Context, cfg: ExperimentConfig, site: SiteData, folder: Path) -> AccountantState:
    """Load the ledger from this node's Flower state or its file (the longer), planned if new."""
    record = context.state.config_records.get(LEDGER_KEY)
    in_memory = str(record["json"]) if record is not None else None
    return plan_ledger(load_state(_ledger_path(context, cfg, folder), in_memory), site, cfg)


def _save_ledger(context: Context, cfg: ExperimentConfig, folder: Path, ledger: AccountantState) -> None:
    """Save both copies, after every round: the file survives a SuperNode restart."""
    context.state[LEDGER_KEY] = ConfigRecord({"json": ledger.to_json()})
    save_state(ledger, _ledger_path(context, cfg, folder))


def _optimizer_store(context: Context) -> dict[str, torch.Tensor]:
    """AdamW moments this node kept from its last round (empty at its first)."""
    record = context.state.array_records.get(OPTIMIZER_KEY)
    return dict(record.to_torch_state_dict()) if record is not None else {}


def _prepare(
    msg: Message, context: Context,
) -> tuple[ExperimentConfig, SiteData, int, Path, object, bool, float]:
    start = time.perf_counter()
    cfg = ExperimentConfig.from_run_config(context.run_config)
    site, index, folder = _site(context, cfg)
    own_rank = bool(msg.content["config"].get("own-rank", False)) if "config" in msg.content else False
    lora = site_lora(cfg, site_rank(cfg, context.node_config, index, own_rank=own_rank))
    worker, cold = _MODELS.get(cfg.model, lora, seed=cfg.train.seed)
    return cfg, site, index, folder, worker, cold, time.perf_counter() - start


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local LoRA training on this hospital's reports."""
    cfg, site, index, folder, worker, cold, setup_s = _prepare(msg, context)
    conf = msg.content["config"]
    g = int(conf["global-round"])
    global_state = msg.content["arrays"].to_torch_state_dict()
    ledger = _load_ledger(context, cfg, site, folder) if cfg.privacy.enabled else None
    store = _optimizer_store(context) if cfg.train.keep_optimizer_state else None
    state, metrics = local_train(
        worker, site, cfg, global_state,  # type: ignore[arg-type]
        lr=float(conf["lr"]), steps=int(conf["local-steps"]),
        seed=cfg.train.seed * 1000003 + g * 1009 + index,
        proximal_mu=float(conf.get("proximal-mu", 0.0)),  # type: ignore[arg-type]  (sent by fedprox)
        ledger=ledger, global_round=g, optimizer_store=store, freeze_a=bool(conf.get("freeze-lora-a", False)),
    )
    if ledger is not None:
        _save_ledger(context, cfg, folder, ledger)
    if store:  # the site's own AdamW moments: node state only, never in the reply
        context.state[OPTIMIZER_KEY] = ArrayRecord(dict(store))
    metrics.update({"setup-s": setup_s, "cold-start": int(cold), "site-index": index})
    arrays = adapter_reply(msg, context, state, int(metrics["num-examples"]), cfg.strategy.transport_dtype)
    metrics["bytes-sent"] = sum(a.numpy().nbytes for a in arrays.values())
    content = RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
        "site": ConfigRecord({"site-id": site.site_id}),
    })
    return Message(content=content, reply_to=msg)


def adapter_reply(msg: Message, context: Context, state: dict[str, torch.Tensor], num_examples: int,
                  transport_dtype: str) -> ArrayRecord:
    """Return the trained adapter as it leaves the site: masked (SecAgg+) or at the transport dtype.

    With a ``secagg`` record in the train message (``strategy.secure_aggregation=secaggplus``)
    the adapter leaves only masked; otherwise it is encoded at ``transport_dtype`` (bfloat16
    travels as its uint16 bits).
    """
    secagg = msg.content.config_records.get(RECORD)
    if secagg is not None:
        return _masked(context, secagg, state, num_examples)
    payload = encode_state(state, transport_dtype)
    return ArrayRecord({k: Array(v) for k, v in payload.items()})


@app.train("secagg")
def secagg_stage(msg: Message, context: Context) -> Message:
    """Answer a SecAgg+ key-exchange or unmask stage (``common.secagg.site_stage``).

    The site's keys, mask seed and the shares it holds stay in this node's ``context.state``;
    only public keys, ciphertexts addressed to other sites and, at unmask, the shares the
    protocol asks for are sent. The state is dropped once the round is unmasked.
    """
    record = msg.content.config_records[RECORD]
    stage, g = str(record["stage"]), int(record["global-round"])
    content = dict(record)
    if stage == "advertise_keys":
        cfg = ExperimentConfig.from_run_config(context.run_config)
        site, _, _ = _site(context, cfg)
        kept, extra = None, {"num-examples": len(site.reports("train"))}  # an upper bound of the weight
    else:
        kept, extra = _kept_secagg(context, g, stage), {}
    state, reply = site_stage(stage, int(context.node_id), kept, content)
    if stage == "unmask":
        del context.state[RECORD]  # the round is over: forget its secrets
    else:
        context.state[RECORD] = ConfigRecord({**state, "global-round": g})  # type: ignore[dict-item]
    out = ConfigRecord({"stage": stage, **_stage_reply(stage, reply), **extra})  # type: ignore[arg-type]
    return Message(content=RecordDict({RECORD: out}), reply_to=msg)


def _stage_reply(stage: str, reply: Any) -> dict[str, Any]:
    """Return a stage's reply as ConfigRecord values (public keys, or ids and blobs)."""
    if stage == "advertise_keys":
        return {"pk1": reply[0], "pk2": reply[1]}
    ids = sorted(reply)
    names = ("dst_ids", "ciphertexts") if stage == "share_keys" else ("owner_ids", "shares")
    return {names[0]: ids, names[1]: [reply[i] for i in ids]}


def _kept_secagg(context: Context, g: int, stage: str) -> dict[str, Any] | None:
    """Return this site's SecAgg+ state of round ``g`` (None when it has none: site_stage refuses)."""
    kept = context.state.config_records.get(RECORD)
    if kept is None:
        return None
    if int(kept["global-round"]) != g:  # type: ignore[call-overload]
        raise SecAggError(f"SecAgg+ {stage} of round {g} came, but this site's SecAgg+ state is of "
                          f"round {kept['global-round']}; the coordinator must restart the round.")
    return dict(kept)


def _masked(context: Context, record: ConfigRecord, state: dict[str, torch.Tensor], n: int) -> ArrayRecord:
    """Return the trained adapter masked for SecAgg+ (uint32 under the adapter's keys + the weight).

    A site that trained no step (privacy budget spent, ``n`` 0) masks zeros at weight 0: nothing
    computed from its reports leaves it, and it stays in the protocol (its shares are needed to
    unmask its neighbours), rather than becoming a dropout.
    """
    g = int(record["global-round"])  # type: ignore[call-overload]
    names = sorted(state)
    arrays = [state[k].detach().to("cpu", torch.float32).numpy() for k in names]
    if n == 0:
        arrays = [np.zeros_like(a) for a in arrays]
    kept = _kept_secagg(context, g, "masked_vector")
    new_state, vec = site_stage("masked_vector", int(context.node_id), kept, dict(record), arrays, n)
    context.state[RECORD] = ConfigRecord({**new_state, "global-round": g})  # type: ignore[dict-item]
    return ArrayRecord({WEIGHT_KEY: Array(vec[0]), **{k: Array(v) for k, v in zip(names, vec[1:])}})  # type: ignore[index]


@app.query("site")
def site_identity(msg: Message, context: Context) -> Message:
    """Say which site this node is: its site id only, as every reply carries it.

    The coordinator samples by site rather than by this run's random node id. Reads no reports.
    """
    cfg = ExperimentConfig.from_run_config(context.run_config)
    site_id, _, _ = _identity(context, cfg)
    return Message(RecordDict({"site": ConfigRecord({"site-id": site_id})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global adapter on this hospital's validation split."""
    cfg, site, index, _, worker, cold, setup_s = _prepare(msg, context)
    global_state = msg.content["arrays"].to_torch_state_dict()
    metrics = local_evaluate(worker, site, cfg, global_state)  # type: ignore[arg-type]
    metrics.update({"setup-s": setup_s, "cold-start": int(cold), "site-index": index})
    content = RecordDict({
        "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
        "site": ConfigRecord({"site-id": site.site_id}),
    })
    return Message(content=content, reply_to=msg)
