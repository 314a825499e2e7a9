"""``fedmira train``: LoRA fine-tuning on one site's reports or on pooled reports.

The pooled run is the centralized baseline the study used and federation is compared against;
a single-site run is the "each hospital alone" baseline. It uses the same split as a
simulation (same ``partition`` settings), so held-out losses are comparable.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from fedmira.common.adapters import get_adapter_state, save_adapter, set_adapter_state
from fedmira.common.config import ExperimentConfig
from fedmira.common.engine import encode_reports, evaluate_loss, train_steps
from fedmira.common.errors import ConfigError
from fedmira.common.model import apply_lora, count_trainable, load_base_model
from fedmira.common.parallel import parallel_train_steps, site_devices
from fedmira.common.partition import load_pooled_reports, split_sites
from fedmira.common.retrieval import rag_neighbors


def train_centralized(cfg: ExperimentConfig, site: str | None = None, val_limit: int = 200,
                      out: TextIO = sys.stdout, checkpoints: Sequence[int] = ()) -> dict[str, Any]:
    """Train on the train splits (of ``site``, or all sites) and report held-out loss before/after.

    ``checkpoints``: steps after which the adapter is also saved (``checkpoints/step_N``), for a
    quality-vs-budget curve; their folders are returned under ``checkpoints``.
    """
    splits = [s for s in split_sites(cfg, load_pooled_reports(cfg, out)) if not s.external]
    if site is not None:
        splits = [s for s in splits if s.site_id == site]
        if not splits:
            raise ConfigError(f"--site {site}: no such training site; the sites are listed in "
                              "`fedmira data check` output.")
    train = [r for s in splits for r in s.train]
    val = [r for s in splits for r in s.val][:val_limit]
    loaded = load_base_model(cfg.model)
    model = apply_lora(loaded.model, cfg.lora, seed=cfg.train.seed)
    tok, device, pad = loaded.tokenizer, loaded.device, int(loaded.tokenizer.pad_token_id)
    print(f"model {loaded.source} on {device} ({loaded.dtype}), loaded in {loaded.load_seconds:.1f} s; "
          f"{count_trainable(model):,} trainable LoRA parameters", file=out)
    print(f"{len(train)} training reports from {len(splits)} site(s), {len(val)} held-out", file=out)
    train_near = rag_neighbors(cfg, train, train, leave_one_out=True)
    val_near = rag_neighbors(cfg, val, train)
    train_ex = encode_reports(train, tok, cfg.data, train_near)
    val_ex = encode_reports(val, tok, cfg.data, val_near)
    before, _ = evaluate_loss(model, val_ex, device, pad, cfg.eval.batch_size, progress=True,
                              autocast=loaded.autocast)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(cfg.run.out_dir) / "train" / cfg.experiment_name() / stamp
    saved: list[str] = []

    def keep(step: int, loss: float) -> None:
        if step + 1 in checkpoints:  # on_step counts from 0
            saved.append(str(save_adapter(model, folder / "checkpoints" / f"step_{step + 1}")))

    devices = site_devices(cfg.train.devices, cfg.model.device)
    if len(devices) > 1:
        if checkpoints:
            raise ConfigError("checkpoints during training need one process; drop them or set "
                              "train.devices=1.")
        print(f"training data-parallel over {len(devices)} processes ({devices[0].type}, train.devices)",
              file=out, flush=True)
        result, trained = parallel_train_steps(cfg.model, cfg.lora, get_adapter_state(model), train_ex,
                                               cfg.train, devices, pad, autocast=loaded.autocast)
        set_adapter_state(model, trained)
    else:
        result = train_steps(model, train_ex, cfg.train, device, pad, progress=True, on_step=keep,
                             autocast=loaded.autocast)
    after, _ = evaluate_loss(model, val_ex, device, pad, cfg.eval.batch_size, progress=True,
                             autocast=loaded.autocast)
    summary = {
        "site": site or "pooled", "train_reports": len(train), "val_reports": len(val),
        "steps": result.steps, "train_loss": result.mean_loss, "val_loss_before": before,
        "val_loss_after": after, "tokens": result.tokens, "tokens_per_s": result.tokens_per_s,
        "train_s": result.seconds,
        "autocast": str(loaded.autocast).replace("torch.", "") if loaded.autocast else "off",
        "load_s": loaded.load_seconds, "config_hash": cfg.config_hash(), "lock_hash": cfg.lock_hash(),
        "base_model": cfg.model.name_or_path,
    }
    save_adapter(model, folder / "adapter", metadata=summary)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    print(f"held-out loss {before:.4f} -> {after:.4f}; {result.tokens_per_s:.0f} tokens/s over "
          f"{result.seconds:.0f} s\nadapter: {folder / 'adapter'}", file=out)
    return {**summary, "adapter": str(folder / "adapter"), "checkpoints": saved}
