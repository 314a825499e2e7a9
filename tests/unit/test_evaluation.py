"""evaluate_predictions / write_report / run_evaluate on synthetic reports (no model, no encoder)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest

from common.config import DataConfig, ExperimentConfig, PartitionConfig
from common.evaluation import (
    PREDICTIONS,
    evaluate_predictions,
    report_markdown,
    run_evaluate,
    select_reports,
    write_report,
)
from common.reports import Report


def _hyps(reports: list[Report]) -> list[str]:
    """Half exact copies, a quarter negation flips, a quarter an unrelated normal phrase."""
    out = []
    for i, r in enumerate(reports):
        if i % 4 == 0:
            out.append("No " + r.impression[0].lower() + r.impression[1:])
        elif i % 4 == 1:
            out.append("Normal study.")
        else:
            out.append(r.impression)
    return out


@pytest.fixture
def result(reports: list[Report]) -> dict[str, Any]:
    external = {reports[-1].site_id}
    return evaluate_predictions(reports, _hyps(reports), external_sites=external, use_encoder=False,
                                n_resamples=200)


def test_structure_and_groups(result: dict[str, Any], reports: list[Report]) -> None:
    assert result["n"] == len(reports) == len(result["per_sample"])
    assert result["missing"] == ["bertscore_f1", "sim"]
    assert result["overall"]["bertscore_f1"]["mean"] is None
    assert set(result["per_site"]) == {r.site_id for r in reports}
    assert set(result["per_modality"]) == {r.modality for r in reports}
    assert set(result["by_group"]) == {"internal", "external"}
    n_ext = sum(r.site_id == reports[-1].site_id for r in reports)
    assert result["by_group"]["external"]["n_reports"] == n_ext
    assert sum(s["n_reports"] for s in result["per_site"].values()) == len(reports)
    rl = result["overall"]["rougeL"]
    assert 0 < rl["lo"] <= rl["mean"] <= rl["hi"] <= 1
    assert 0 < result["overall"]["clinical_micro_f1"]["mean"] < 1
    assert result["clinical"]["n"] == len(reports)


def test_exact_copies_score_one(reports: list[Report]) -> None:
    res = evaluate_predictions(reports, [r.impression for r in reports], use_encoder=False, n_resamples=50)
    for metric in ("rougeL", "bleu4", "clinical_agreement", "clinical_micro_f1"):
        assert res["overall"][metric]["mean"] == pytest.approx(1.0)
    assert set(res["by_group"]) == {"internal"}


def test_length_mismatch(reports: list[Report]) -> None:
    with pytest.raises(ValueError):
        evaluate_predictions(reports, ["x"], use_encoder=False)


def test_write_report_files_hold_no_report_text(result: dict[str, Any], reports: list[Report],
                                                tmp_path: Path) -> None:
    paths = write_report(result, tmp_path)
    for key in ("report_md", "report_json", "per_sample_csv", "sites_png", "modalities_png"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    rows = list(csv.DictReader(paths["per_sample_csv"].open(encoding="utf-8")))
    assert [r["report_id"] for r in rows] == [r.report_id for r in reports]
    assert rows[0]["bertscore_f1"] == ""  # missing, not 0
    doc = json.loads(paths["report_json"].read_text())
    assert "per_sample" not in doc and doc["missing"] == ["bertscore_f1", "sim"]
    texts = {t for r in reports for t in (r.impression, r.findings)} | set(_hyps(reports))
    for key in ("report_md", "report_json", "per_sample_csv"):
        content = paths[key].read_text(encoding="utf-8")
        assert not [t for t in texts if t in content]
    md = paths["report_md"].read_text()
    assert "## Per site" in md and "n/a" in md and "Internal vs external" in md


def _cfg(tmp_path: Path, **partition: Any) -> ExperimentConfig:
    return ExperimentConfig(
        data=DataConfig(synthetic_sites=4, synthetic_reports=120, synthetic_seed=3),
        partition=PartitionConfig(min_site_reports=1, **partition),
    ).replace(run=dataclasses.replace(ExperimentConfig().run, out_dir=str(tmp_path)))


def test_select_reports_is_deterministic_and_capped(tmp_path: Path) -> None:
    from simulations.launch import load_pooled_reports, split_sites

    cfg = _cfg(tmp_path, external_sites=1)
    splits = split_sites(cfg, load_pooled_reports(cfg, io.StringIO()))
    every, external = select_reports(splits, limit=0)
    assert len(external) == 1
    ext = next(s for s in splits if s.external)
    assert {r.report_id for r in ext.test} <= {r.report_id for r in every}
    internal_test = {r.report_id for s in splits if not s.external for r in s.test}
    assert {r.report_id for r in every} == internal_test | {r.report_id for r in ext.test}
    capped, _ = select_reports(splits, limit=10)
    assert len(capped) == 10 and capped == select_reports(splits, limit=10)[0]
    assert {r.report_id for r in capped} <= {r.report_id for r in every}


def test_run_evaluate_with_a_stub_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import common.inference

    seen: dict[str, Any] = {}

    def fake_generate(cfg: Any, reports: list[Report], adapter: str | None,
                      progress: bool = True) -> list[str]:
        seen["adapter"], seen["n"] = adapter, len(reports)
        return [r.impression for r in reports]

    monkeypatch.setattr(common.inference, "generate_impressions", fake_generate)
    out = io.StringIO()
    res = run_evaluate(_cfg(tmp_path, external_sites=1), adapter=None, limit=12,
                       out_dir=tmp_path / "ev", use_encoder=False, n_resamples=50, out=out)
    assert seen == {"adapter": None, "n": 12} and res["n"] == 12
    assert res["overall"]["rougeL"]["mean"] == pytest.approx(1.0)
    assert res["meta"]["reports"] == 12 and "zero-shot" in res["meta"]["adapter"]
    lines = (tmp_path / "ev" / PREDICTIONS).read_text().splitlines()
    assert len(lines) == 12 and set(json.loads(lines[0])) >= {"report_id", "impression"}
    assert (tmp_path / "ev" / "report.md").is_file()
    assert "evaluating 12 reports" in out.getvalue()


def test_evaluate_command_default_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import common.inference
    from simulations.evaluate_cli import evaluate_command

    monkeypatch.setattr(common.inference, "generate_impressions",
                        lambda cfg, reports, adapter, progress=True: ["Normal study."] * len(reports))
    out = io.StringIO()
    code = evaluate_command(["data.synthetic_sites=3", "data.synthetic_reports=60",
                             "partition.min_site_reports=1", f"run.out_dir={tmp_path}"],
                            adapter=None, out=None, limit=8, no_encoder=True, stream=out)
    assert code == 0
    reports_md = list((tmp_path / "eval").glob("*/report.md"))
    assert len(reports_md) == 1
    printed = out.getvalue()
    assert " reports: ROUGE-L" in printed and "BERTScore-F1 n/a" in printed


def test_markdown_without_meta(result: dict[str, Any]) -> None:
    md = report_markdown(result)
    assert md.startswith("# Evaluation") and "Clinical observations" in md
