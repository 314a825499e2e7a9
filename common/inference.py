"""Impression generation for ``fedmira generate``: base model (+ optional adapter) on reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence, TextIO

from fedmira.common.adapters import ADAPTER_CONFIG
from fedmira.common.config import ExperimentConfig
from fedmira.common.engine import generate
from fedmira.common.errors import DataError, ModelError
from fedmira.common.model import load_base_model, model_autocast
from fedmira.common.reports import Report, load_reports, normalize_modality
from fedmira.common.retrieval import rag_neighbors

if TYPE_CHECKING:
    import torch


def load_model_with_adapter(cfg: ExperimentConfig, adapter: str | None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, device): the base model, with the PEFT adapter at ``adapter`` if given."""
    loaded = load_base_model(cfg.model)
    model: torch.nn.Module = loaded.model
    if adapter:
        from peft import PeftModel

        folder = Path(adapter)
        if not (folder / ADAPTER_CONFIG).is_file():
            raise ModelError(f"{folder} is not a PEFT adapter folder ({ADAPTER_CONFIG} missing).")
        model = PeftModel.from_pretrained(model, str(folder)).to(loaded.device)
        model.eval()
    return model, loaded.tokenizer, loaded.device


def reports_from_lines(lines: Iterable[str], *, site: str, modality: str, body_part: str,
                       exam: str) -> list[Report]:
    """Read reports from stdin: one JSON report object or one plain findings text per line."""
    mod = normalize_modality(modality)
    if mod is None:
        raise DataError(f"--modality {modality[:16]!r} is not a known modality code (e.g. CT, MR, DR).")
    reports = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"stdin line {n}: not valid JSON ({exc.msg}).") from None
            obj.setdefault("report_id", f"stdin-{n}")
            obj.setdefault("site_id", site)
            obj.setdefault("modality", mod)
            obj.setdefault("body_part", body_part)
            obj.setdefault("exam", exam)
            obj.setdefault("impression", "")
            if not str(obj.get("findings", "")).strip():
                raise DataError(f"stdin line {n}: field 'findings' is missing or empty.")
            obj["labels"] = tuple(obj.get("labels", ()))
            known = set(Report.__dataclass_fields__)
            reports.append(Report(**{k: v for k, v in obj.items() if k in known}))
        else:
            reports.append(Report(f"stdin-{n}", site, mod, body_part, exam, line, ""))
    return reports


def read_input(path: str, fmt: str, **defaults: str) -> list[Report]:
    """Read reports from a file (any supported format) or from stdin when ``path`` is ``-``."""
    import sys

    if path == "-":
        return reports_from_lines(sys.stdin, **defaults)
    # The readers skip rows lacking findings or impression; `fedmira data check` lists them.
    result = load_reports(path, fmt=fmt, policy="skip")
    if not result.reports:
        raise DataError(f"No usable reports in {path}; run `fedmira data check {path}`.")
    return result.reports


def write_impressions(reports: list[Report], impressions: list[str], out: TextIO) -> None:
    """One JSON line per report: id, site and the generated impression (and the reference)."""
    for r, text in zip(reports, impressions):
        row = {"report_id": r.report_id, "site_id": r.site_id, "impression": text}
        if r.impression:
            row["reference"] = r.impression
        out.write(json.dumps(row) + "\n")


def generate_impressions(cfg: ExperimentConfig, reports: list[Report], adapter: str | None,
                         progress: bool = True, prior: Sequence[Report] = ()) -> list[str]:
    """Impressions for ``reports`` with the configured decoding settings.

    With ``data.template=site_aware_rag`` each report's prompt carries its own site's most
    similar reports from ``prior`` (the sites' training splits, or the prior reports a hospital
    names); a site with no prior reports gets prompts that say so.
    """
    model, tokenizer, device = load_model_with_adapter(cfg, adapter)
    near = rag_neighbors(cfg, reports, prior)
    autocast = model_autocast(cfg.model, device, next(model.parameters()).dtype)
    return generate(model, tokenizer, reports, cfg.data, cfg.generate, device, progress=progress,
                    neighbors=near, autocast=autocast)
