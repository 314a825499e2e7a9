"""``fedmira audit``: plant canaries in one hospital, train with and without DP, measure memorization.

The arms run fedmira's own site code (``common.site.local_train``, DP-SGD with the site's ledger
when DP is on) and FedAvg (``common.aggregation.combine``) in one process, every chosen site in
every round: the same training math as ``fedmira simulate``, without starting Flower, so an audit
fits on one machine. The canaries' exposure and verbatim extraction are then measured on the
base model (the untrained adapter), the global adapter trained without DP and the one trained
with DP. Writes ``audit.json``, ``audit.md`` and ``exposure.png``; prints ranks and exposures
only (never the secrets or report text).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np
import torch
from tqdm.auto import tqdm

from fedmira.common.adapters import get_adapter_state, save_adapter_state, set_adapter_state
from fedmira.common.aggregation import combine
from fedmira.common.audit import (
    SECRET_DIGITS,
    Canary,
    canary_exposure,
    extracted,
    make_canaries,
    matched_digits,
    plant,
)
from fedmira.common.config import ExperimentConfig, GenerateConfig
from fedmira.common.engine import generate
from fedmira.common.errors import FedmiraError
from fedmira.common.privacy import AccountantState
from fedmira.common.site import ModelCache, SiteData, Worker, local_train, plan_ledger, round_flags
from fedmira.common.tables import markdown_table

ARMS = ("no_dp", "dp")


@dataclasses.dataclass(frozen=True)
class AuditPlan:
    """How many canaries, how often each is repeated, how many candidates, how many sites."""

    canaries: int = 4
    repeats: int = 8
    candidates: int = 255
    sites: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name, lo in (("canaries", 1), ("repeats", 1), ("candidates", 8), ("sites", 1)):
            if getattr(self, name) < lo:
                raise FedmiraError(f"--{name} must be >= {lo}, got {getattr(self, name)}.")


def audit_sites(
    cfg: ExperimentConfig, plan: AuditPlan, out: TextIO,
) -> tuple[list[SiteData], list[Canary]]:
    """Return the first ``plan.sites`` internal sites of the configured split; canaries in the first."""
    from fedmira.common.partition import load_pooled_reports, split_sites

    splits = [s for s in split_sites(cfg, load_pooled_reports(cfg, out))
              if not s.external and s.train]
    if not splits:
        raise FedmiraError("No site with training reports to audit; check data and partition settings.")
    splits = splits[: plan.sites]
    canaries = make_canaries(splits[0].train[0], plan.canaries, plan.seed)
    sites = [SiteData(s.site_id,
                      plant(s.train, canaries, plan.repeats, plan.seed) if i == 0 else list(s.train), [])
             for i, s in enumerate(splits)]
    return sites, canaries


def train_arm(
    worker: Worker, sites: Sequence[SiteData], cfg: ExperimentConfig, initial: dict[str, torch.Tensor],
    out: TextIO,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train FedAvg over ``sites`` for ``strategy.rounds`` rounds (every site every round).

    With ``privacy.enabled`` each site keeps its own ledger across the rounds, as it would at a
    hospital; the returned info holds each site's final epsilon.
    """
    state = {k: v.clone() for k, v in initial.items()}
    ledgers: dict[str, AccountantState] = {}
    losses = []
    bar = tqdm(total=cfg.strategy.rounds * len(sites), desc="dp" if cfg.privacy.enabled else "no-dp",
               unit="site-round")
    for g in range(1, cfg.strategy.rounds + 1):
        replies, weights = [], []
        for index, site in enumerate(sites):
            ledger = plan_ledger(ledgers.get(site.site_id), site, cfg) if cfg.privacy.enabled else None
            new, metrics = local_train(worker, site, cfg, state, lr=cfg.train.lr, steps=cfg.train.steps,
                                       seed=cfg.train.seed * 1000003 + g * 1009 + index, ledger=ledger,
                                       global_round=g,
                                       freeze_a=round_flags(cfg.strategy.name).get("freeze-lora-a", False))
            if ledger is not None:
                ledgers[site.site_id] = ledger
            if metrics["num-examples"]:
                replies.append({k: v.numpy() for k, v in new.items()})
                weights.append(float(metrics["num-examples"]))
            losses.append(float(metrics["train-loss"]))
            bar.update(1)
        if replies:
            state = {k: torch.from_numpy(v) for k, v in combine(replies, weights).items()}
    bar.close()
    info: dict[str, Any] = {"mean_train_loss": float(np.nanmean(losses))}
    if ledgers:
        info["epsilon"] = {s: ledger.epsilon() for s, ledger in ledgers.items()}
        info["delta"] = cfg.privacy.delta
        info["noise_multiplier"] = {s: ledger.noise_multiplier for s, ledger in ledgers.items()}
    return state, info


def measure(worker: Worker, state: dict[str, torch.Tensor], canaries: Sequence[Canary],
            cfg: ExperimentConfig, plan: AuditPlan) -> list[dict[str, Any]]:
    """Return each canary's rank, exposure and whether greedy decoding writes its secret."""
    set_adapter_state(worker.model, state)
    tok, device = worker.loaded.tokenizer, worker.loaded.device
    gen = GenerateConfig(max_new_tokens=16, num_beams=1, batch_size=len(canaries))
    outputs = generate(worker.model, tok, [c.report for c in canaries], cfg.data, gen, device)
    rows = []
    pairs = tqdm(list(zip(canaries, outputs)), desc="exposure", unit="canary", leave=False)
    for i, (canary, text) in enumerate(pairs):
        scores = canary_exposure(worker.model, tok, canary, plan.candidates, cfg.data, device,
                                 seed=plan.seed + i)
        rows.append({"canary": i, **scores, "extracted": extracted(text, canary.secret),
                     "matched_digits": matched_digits(text, canary.secret)})
    return rows


def run_audit(cfg: ExperimentConfig, plan: AuditPlan, out_dir: Path,
              out: TextIO = sys.stdout) -> dict[str, Any]:
    """Train both arms, measure every canary on base / no-DP / DP, write the report; return the result."""
    start = time.perf_counter()
    sites, canaries = audit_sites(cfg, plan, out)
    worker, _ = ModelCache().get(cfg.model, cfg.lora, seed=cfg.train.seed)
    initial = get_adapter_state(worker.model)
    print(f"audit: {plan.canaries} canaries x {plan.repeats} repeats planted in {sites[0].site_id} "
          f"({len(sites[0].train)} training reports with them); {len(sites)} sites, "
          f"{cfg.strategy.rounds} rounds x {cfg.train.steps} local steps per arm", file=out)
    dp_privacy = dataclasses.replace(cfg.privacy, enabled=True)
    arms_cfg = {"no_dp": cfg.replace(privacy=dataclasses.replace(cfg.privacy, enabled=False)),
                "dp": cfg.replace(privacy=dp_privacy)}
    result: dict[str, Any] = {"plan": dataclasses.asdict(plan), "arms": {}, "model": cfg.model.name_or_path,
                              "rounds": cfg.strategy.rounds, "local_steps": cfg.train.steps,
                              "lr": cfg.train.lr, "canary_site": sites[0].site_id,
                              "privacy": dataclasses.asdict(dp_privacy)}
    result["arms"]["base"] = {"canaries": measure(worker, initial, canaries, cfg, plan), "info": {}}
    for arm in ARMS:
        state, info = train_arm(worker, sites, arms_cfg[arm], initial, out)
        save_adapter_state(state, worker.model.peft_config["default"], out_dir / arm / "adapter")
        result["arms"][arm] = {"canaries": measure(worker, state, canaries, cfg, plan), "info": info}
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["date"] = dt.datetime.now().isoformat(timespec="seconds")
    write_audit(result, out_dir)
    return result


def summary(arm: dict[str, Any]) -> dict[str, float]:
    """Return one arm's canary numbers: mean / max exposure, median rank, extractions, digits written."""
    rows = arm["canaries"]
    bits = [r["exposure_bits"] for r in rows]
    return {"mean_exposure": float(np.mean(bits)), "max_exposure": float(np.max(bits)),
            "median_rank": float(np.median([r["rank"] for r in rows])),
            "extracted": int(sum(r["extracted"] for r in rows)), "canaries": len(rows),
            "matched_digits": float(np.mean([r.get("matched_digits", 0) for r in rows]))}


def audit_markdown(result: dict[str, Any]) -> str:
    """Return ``audit.md``: the setup, one table row per arm, and how to read exposure."""
    plan = result["plan"]
    max_bits = result["arms"]["base"]["canaries"][0]["max_bits"]
    lines = [
        f"# Memorization audit ({result['date']})", "",
        f"{plan['canaries']} canaries, each repeated {plan['repeats']} times in {result['canary_site']}'s "
        f"training data; exposure against {plan['candidates']} random candidate secrets (max "
        f"{max_bits:.2f} bits); model {result['model']}, {result['rounds']} rounds x "
        f"{result['local_steps']} local steps, lr {result['lr']:g}; {result['seconds']:.0f} s.", "",
    ]
    header = ["model", "mean exposure (bits)", "max exposure", "median rank", "verbatim extractions",
              f"secret digits written (of {SECRET_DIGITS})", "epsilon (canary site)"]
    body = []
    for arm, label in (("base", "base (no training)"), ("no_dp", "federated, no DP"),
                       ("dp", "federated, DP-SGD")):
        s = summary(result["arms"][arm])
        eps = result["arms"][arm]["info"].get("epsilon", {}).get(result["canary_site"])
        body.append([label, f"{s['mean_exposure']:.2f}", f"{s['max_exposure']:.2f}",
                     f"{s['median_rank']:.0f}", f"{s['extracted']}/{s['canaries']}",
                     f"{s['matched_digits']:.1f}", "-" if eps is None else f"{eps:.2f}"])
    lines.append(markdown_table(header, body))
    p = result["privacy"]
    lines += ["", f"DP arm: unit={p['unit']}, target_epsilon={p['target_epsilon']:g}, "
              f"delta={p['delta']:g}, clip={p['max_grad_norm']:g}. With record-level DP a canary repeated "
              f"{plan['repeats']} times is {plan['repeats']} records: by group privacy its guarantee is "
              f"about {plan['repeats']} x epsilon; "
              "`privacy.unit=patient` (the repeats share a patient_id) protects it as one unit.", "",
              "Exposure near 0 bits: the model prefers the secret no more than a random one. Exposure near "
              "the maximum: the secret is memorized."]
    return "\n".join(lines) + "\n"


def write_audit(result: dict[str, Any], out_dir: Path) -> None:
    """Write ``audit.json``, ``audit.md`` and ``exposure.png`` to ``out_dir`` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "audit.json").write_text(json.dumps(result, indent=2, sort_keys=True),
                                        encoding="utf-8")
    (out_dir / "audit.md").write_text(audit_markdown(result), encoding="utf-8")
    _plot(result, out_dir / "exposure.png")


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [("base", "base"), ("no_dp", "no DP"), ("dp", "DP-SGD")]
    n = len(result["arms"]["base"]["canaries"])
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * n + 2), 3.5))
    width = 0.8 / len(arms)
    for j, (arm, label) in enumerate(arms):
        bits = [r["exposure_bits"] for r in result["arms"][arm]["canaries"]]
        ax.bar([i + j * width for i in range(n)], bits, width, label=label)
    ax.axhline(result["arms"]["base"]["canaries"][0]["max_bits"], color="grey", linestyle=":",
               label="memorized")
    ax.set_xticks([i + width for i in range(n)], [f"canary {i}" for i in range(n)])
    ax.set_ylabel("exposure (bits)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def audit_command(overrides: Sequence[str], plan: AuditPlan, out: str | None,
                  stream: TextIO | None = None) -> int:
    """Run ``fedmira audit``; returns the exit code."""
    from fedmira.common.compose import compose_config

    printer = sys.stdout if stream is None else stream
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise FedmiraError(f"Unexpected argument(s) {bad}: overrides look like key=value (see --help).")
    cfg = compose_config(list(overrides))
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(out) if out else Path(cfg.run.out_dir) / "audit" / stamp
    result = run_audit(cfg, plan, folder, printer)
    for arm in ("base", "no_dp", "dp"):
        s = summary(result["arms"][arm])
        print(f"{arm:>6}: mean exposure {s['mean_exposure']:.2f} bits (max {s['max_exposure']:.2f}), "
              f"median rank {s['median_rank']:.0f}/{plan.candidates + 1}, "
              f"extracted {s['extracted']}/{s['canaries']}, "
              f"{s['matched_digits']:.1f}/{SECRET_DIGITS} secret digits written",
              file=printer)
    print(f"Report: {folder / 'audit.md'}", file=printer)
    return 0
