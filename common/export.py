"""``fedmira export RUN_DIR``: the artifacts people use after a run.

Writes the final adapter (PEFT format), a model card (``README.md``: config hash, locked-part
hash, data profile per site, rounds, strategy, privacy settings, evaluation results) and, on
request, the base model with the adapter merged into a plain Hugging Face folder for serving.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

from fedmira.common.config import ExperimentConfig
from fedmira.common.errors import FedmiraError
from fedmira.common.rundir import RunDir, excluded_count
from fedmira.common.tables import markdown_table


def _final_adapter(run: RunDir) -> Path:
    final = run.path / "final_adapter"
    if (final / "adapter_model.safetensors").is_file():
        return final
    last = run.last_round
    if last and (run.round_dir(last) / "adapter_model.safetensors").is_file():
        return run.round_dir(last)
    raise FedmiraError(f"{run.path} has no committed adapter yet; resume the run first.")


def _site_table(run: RunDir) -> list[dict[str, str]]:
    path = run.path / "sites" / "summary.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def training_line(cfg: ExperimentConfig) -> str:
    """Describe the local training recipe in one line: budget per round, schedule, kept state, batching."""
    t = cfg.train
    budget = f"{t.epochs:g} local epochs" if t.epochs > 0 else f"{t.steps} steps"
    schedule = "constant" if t.schedule == "constant" else f"{t.schedule} over the run"
    warmup = f", {t.warmup_steps} warm-up steps" if t.warmup_steps else ""
    extras = [x for x, on in (("AdamW state kept at each site", t.keep_optimizer_state),
                              ("length-grouped batches", t.group_by_length)) if on]
    return ", ".join([f"{budget} per round x batch {t.batch_size} x accum {t.grad_accum}, lr {t.lr:g} "
                      f"({schedule}{warmup})", *extras])


def privacy_line(cfg: ExperimentConfig) -> str:
    """Describe the run's privacy settings in one table cell."""
    p = cfg.privacy
    parts = []
    if p.enabled:
        plan = (f"target epsilon {p.target_epsilon:g}" if p.target_epsilon
                else f"noise multiplier {p.noise_multiplier:g}")
        parts.append(f"DP-SGD per {p.unit} ({plan}, delta {p.delta:g}, clip {p.max_grad_norm:g}, "
                     f"budget {p.budget:g}, {p.accountant} accountant)")
    if p.site_level:
        parts.append(f"site-level DP (clip {p.site_clip:g}, noise multiplier {p.site_noise_multiplier:g}, "
                     f"delta {p.site_delta:g})")
    return "; ".join(parts) or "no differential privacy (adapters and metrics only leave sites)"


def _privacy_section(privacy: dict[str, Any]) -> list[str]:
    """Epsilon spent per site (record level) and over sites (site level), as of the last round."""
    if not privacy:
        return []
    lines = ["", "## Privacy spent (as of the last round)", ""]
    record = privacy.get("record_level")
    if record:
        lines += markdown_table(["site", "epsilon"],
                                [[site, f"{eps:.3f}"] for site, eps in record["sites"].items()]).splitlines()
    site = privacy.get("site_level")
    if site:
        lines += ["", f"Site-level: epsilon {site['epsilon']:.3f} at delta {site['delta']:g} after "
                      f"{site['rounds']} rounds."]
    return lines


def model_card(run: RunDir, cfg: ExperimentConfig, doc: dict[str, Any]) -> str:
    """Markdown model card from the run folder (numbers and ids only, no report text)."""
    rows = run.metrics()
    last = rows[-1] if rows else {}
    facts = [
        ["base model", f"`{cfg.model.name_or_path}`"],
        ["LoRA", f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, modules={', '.join(cfg.lora.target_modules)}"],
        ["prompt template", f"`{cfg.data.template}`"],
        ["strategy", f"{cfg.strategy.name}, {run.last_round}/{cfg.strategy.rounds} rounds, "
                     f"fraction_train={cfg.strategy.fraction_train}"],
        ["local training", training_line(cfg)],
        ["privacy", privacy_line(cfg)],
        ["config hash", f"`{doc.get('config_hash', cfg.config_hash())}`"],
        ["locked-part hash", f"`{doc.get('lock_hash', cfg.lock_hash())}`"],
    ]
    lines = [
        f"# fedmira adapter: {cfg.experiment_name()}",
        "",
        "LoRA adapter for writing radiology impressions from findings, trained federated with fedmira.",
        "",
        *markdown_table(["", ""], facts).splitlines(),
        "",
        "## Evaluation (last evaluated round, weighted over sites)",
        "",
    ]
    evaluated = [r for r in rows if r.get("evaluate")]
    if evaluated:
        ev = evaluated[-1]["evaluate"]
        lines += markdown_table(["round", "val loss", "ROUGE-L", "sites"], [[
            evaluated[-1]["round"], f"{ev.get('val-loss', float('nan')):.4f}",
            f"{ev.get('rouge-l', float('nan')):.3f}", ev.get("num-sites", ""),
        ]]).splitlines()
    else:
        lines.append("No federated evaluation was recorded.")
    losses = []
    for r in rows:
        t = r.get("train", {})
        losses.append([r["round"], f"{t.get('train-loss', float('nan')):.4f}", t.get("num-sites", ""),
                       t.get("bytes-sent", "")])
    lines += ["", "## Training loss per round", ""]
    lines += markdown_table(["round", "train loss", "sites", "bytes up"], losses).splitlines()
    sites = _site_table(run)
    if sites:
        cols = list(sites[0])
        lines += ["", "## Data per site", ""]
        lines += markdown_table(cols, [[s[c] for c in cols] for s in sites]).splitlines()
    lines += _privacy_section(last.get("privacy", {}))
    if last.get("rejected"):
        lines += ["", f"Sites excluded in the last round: {excluded_count(last['rejected'])}."]
    return "\n".join(lines) + "\n"


def hub_card(cfg: ExperimentConfig, body: str) -> Any:
    """Wrap ``body`` as a Hugging Face model card (``huggingface_hub.ModelCard``).

    The card has the YAML metadata the Hub and PEFT read (library, base model when it is a Hub
    id, tags), then the Markdown.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = cfg.model.name_or_path
    hub_id = "/" in base and not base.startswith(("/", ".", "~")) and not Path(base).exists()
    data = ModelCardData(library_name="peft", base_model=base if hub_id else None,
                         pipeline_tag="text-generation",
                         tags=["fedmira", "federated-learning", "lora", "radiology", "summarization"])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def export_run(run_dir: str | Path, out: str | Path | None = None, merge: bool = False) -> Path:
    """Export a run's final adapter + model card (and the merged model when ``merge``)."""
    run = RunDir(run_dir)
    doc = run.read_config()
    cfg = ExperimentConfig.from_dict(doc["config"])
    target = Path(out) if out else run.path / "export"
    adapter_src = _final_adapter(run)
    shutil.rmtree(target / "adapter", ignore_errors=True)
    shutil.copytree(adapter_src, target / "adapter")
    card = hub_card(cfg, model_card(run, cfg, doc))
    card.save(target / "README.md")
    card.save(target / "adapter" / "README.md")
    (target / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    if merge:
        _merge(cfg, target / "adapter", target / "merged")
    return target


def _merge(cfg: ExperimentConfig, adapter: Path, out: Path) -> None:
    """Merge the base model and adapter into one plain Hugging Face folder (no PEFT to serve)."""
    import dataclasses

    from peft import PeftModel

    from fedmira.common.model import _make_plain, load_base_model

    # Merge into the full-precision base even when the run trained on a 4/8-bit one: the LoRA
    # update is exact, and folding it into quantized weights would re-quantize it away.
    loaded = load_base_model(dataclasses.replace(cfg.model, device="cpu", quantization="none"))
    merged = PeftModel.from_pretrained(loaded.model, str(adapter)).merge_and_unload()
    _make_plain(merged)
    merged.save_pretrained(str(out), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(out))
