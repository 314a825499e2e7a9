"""evaluate_predictions / write_report / run_evaluate on synthetic reports (no model, no encoder)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest

from fedmira.common.config import DataConfig, ExperimentConfig, PartitionConfig
from fedmira.common.evaluation import (
    PREDICTIONS,
    evaluate_predictions,
    report_markdown,
    run_evaluate,
    select_reports,
    write_report,
)
from fedmira.common.reports import Report


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
    from fedmira.common.partition import load_pooled_reports, split_sites

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
    import fedmira.common.inference

    seen: dict[str, Any] = {}

    def fake_generate(cfg: Any, reports: list[Report], adapter: str | None,
                      progress: bool = True, prior: Any = ()) -> list[str]:
        seen["adapter"], seen["n"] = adapter, len(reports)
        return [r.impression for r in reports]

    monkeypatch.setattr(fedmira.common.inference, "generate_impressions", fake_generate)
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
    import fedmira.common.inference
    from fedmira.simulations.evaluate_cli import evaluate_command

    monkeypatch.setattr(fedmira.common.inference, "generate_impressions",
                        lambda cfg, reports, adapter, progress=True, prior=():
                        ["Normal study."] * len(reports))
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


# ----------------------------------------------------------------------------- a new hospital's file
MARKER = "Marker impression of the scored report itself."


def _hospital_files(tmp_path: Path, *, prior: bool = True,
                    foreign: bool = False) -> tuple[Path, Path | None, list[Report]]:
    """A new hospital's file (site_01 and site_02 reports plus one row without findings) and its
    archive of prior reports: more site_01 reports, plus a copy of the first scored report
    (same id and findings, a marker impression) that must never be retrieved for it."""
    from fedmira.common.reports import write_jsonl
    from fedmira.common.synthetic import make_synthetic_corpus

    corpus = make_synthetic_corpus(num_sites=3, num_reports=120, seed=5)
    a = [r for r in corpus if r.site_id == "site_01"]
    b = [r for r in corpus if r.site_id == "site_02"]
    c = [r for r in corpus if r.site_id == "site_03"]
    assert len(a) >= 21 and len(b) >= 5 and c
    scored = a[:8] + b[:5]
    path = tmp_path / "new_hospital.jsonl"
    write_jsonl(scored, path)
    with path.open("a", encoding="utf-8") as handle:  # a bad row: skipped, counted, never shown
        handle.write(json.dumps({"report_id": "bad-1", "site_id": "site_01", "modality": "CT",
                                 "body_part": "chest", "exam": "CT CHEST", "findings": "",
                                 "impression": "Secret impression of a bad row."}) + "\n")
    if not prior:
        return path, None, scored
    archive = a[8:20] + [dataclasses.replace(a[0], impression=MARKER)] + (c[:2] if foreign else [])
    prior_path = tmp_path / "archive.jsonl"
    write_jsonl(archive, prior_path)
    return path, prior_path, scored


def _rag_cfg(tmp_path: Path, template: str = "site_aware_rag") -> ExperimentConfig:
    cfg = _cfg(tmp_path)
    return cfg.replace(data=dataclasses.replace(cfg.data, template=template, neighbors=3))


def _texts(reports: list[Report]) -> set[str]:
    return {t for r in reports for t in (r.findings, r.impression) if len(t) > 12}


def test_evaluate_file_scores_every_report_as_external(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedmira.common.inference
    from fedmira.common.evaluation import run_evaluate_file

    path, prior_path, scored = _hospital_files(tmp_path)
    seen: dict[str, Any] = {}

    def fake_generate(cfg: Any, reports: list[Report], adapter: str | None,
                      progress: bool = True, prior: Any = ()) -> list[str]:
        seen["ids"], seen["prior"] = [r.report_id for r in reports], list(prior)
        return [r.impression for r in reports]

    monkeypatch.setattr(fedmira.common.inference, "generate_impressions", fake_generate)
    out = io.StringIO()
    res = run_evaluate_file(_rag_cfg(tmp_path), input_path=str(path), prior_path=str(prior_path),
                            adapter=None, out_dir=tmp_path / "ev", use_encoder=False, n_resamples=50,
                            out=out)
    assert sorted(seen["ids"]) == sorted(r.report_id for r in scored) and res["n"] == len(scored)
    assert set(res["by_group"]) == {"external"} and res["by_group"]["external"]["n_reports"] == len(scored)
    assert {row["group"] for row in res["per_sample"]} == {"external"}
    # The scored report's own copy in the archive is not a prior; priors are the archive's site_01 reports.
    assert scored[0].report_id not in {r.report_id for r in seen["prior"]}
    assert MARKER not in {r.impression for r in seen["prior"]} and len(seen["prior"]) == 12
    meta = res["meta"]
    assert meta["input"] == str(path) and meta["prior"] == str(prior_path)
    assert meta["retrieval_index"] == {"site_01": 12, "site_02": 0}
    assert meta["rows_skipped"] == 1 and meta["priors_excluded"] == 1 and meta["reports"] == len(scored)
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["meta"]["input"] == str(path)
    printed = out.getvalue()
    assert f"{path}: 1 of {len(scored) + 1} rows skipped" in printed
    assert f"{path}:{len(scored) + 1}" in printed
    assert "site_01 12 (prior file)" in printed and "site_02 none (no prior reports)" in printed
    assert "1 prior report" in printed and "excluded" in printed
    everything = _texts(scored) | {MARKER, "Secret impression of a bad row."}
    for content in (printed, (tmp_path / "ev" / "report.md").read_text()):
        assert not [t for t in everything if t in content]


def test_evaluate_file_retrieves_within_the_site_and_never_the_report_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through generate_impressions and the SiteIndex (only the model is stubbed)."""
    import torch

    import fedmira.common.inference
    from fedmira.common.evaluation import run_evaluate_file

    path, prior_path, scored = _hospital_files(tmp_path)
    archive = fedmira.common.inference.load_reports(str(prior_path)).reports
    captured: dict[str, Any] = {}

    def fake_engine_generate(model: Any, tok: Any, reports: list[Report], data: Any, gen: Any,
                             device: Any, progress: bool = False, neighbors: Any = None,
                             autocast: Any = None) -> list[str]:
        captured.update(ids=[r.report_id for r in reports], neighbors=neighbors)
        return ["Normal study."] * len(reports)

    monkeypatch.setattr(fedmira.common.inference, "load_model_with_adapter",
                        lambda cfg, adapter: (torch.nn.Linear(1, 1), None, torch.device("cpu")))
    monkeypatch.setattr(fedmira.common.inference, "generate", fake_engine_generate)
    run_evaluate_file(_rag_cfg(tmp_path), input_path=str(path), prior_path=str(prior_path), adapter=None,
                      out_dir=tmp_path / "ev", use_encoder=False, n_resamples=20, out=io.StringIO())
    near = dict(zip(captured["ids"], captured["neighbors"]))
    site_01_prior = {r.impression for r in archive if r.report_id != scored[0].report_id}
    for r in scored:
        if r.site_id == "site_01":
            assert len(near[r.report_id]) == 3
            assert {n.impression for n in near[r.report_id]} <= site_01_prior
        else:
            assert near[r.report_id] == ()  # no prior reports of site_02: the prompt says none
    assert MARKER not in {n.impression for ns in near.values() for n in ns}
    # The same holds when the prior list is handed over unfiltered: the index leaves the report out.
    fedmira.common.inference.generate_impressions(_rag_cfg(tmp_path), [scored[0]], None, progress=False,
                                                  prior=archive)
    assert MARKER not in {n.impression for n in captured["neighbors"][0]}


def test_evaluate_file_without_prior_says_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedmira.common.inference
    from fedmira.common.evaluation import run_evaluate_file

    path, _, scored = _hospital_files(tmp_path, prior=False)
    monkeypatch.setattr(fedmira.common.inference, "generate_impressions",
                        lambda cfg, reports, adapter, progress=True, prior=(): ["Normal."] * len(reports))
    out = io.StringIO()
    res = run_evaluate_file(_rag_cfg(tmp_path), input_path=str(path), prior_path=None, adapter=None,
                            out_dir=tmp_path / "ev", use_encoder=False, n_resamples=20, out=out)
    assert res["n"] == len(scored) and res["meta"]["prior"] is None
    assert res["meta"]["retrieval_index"] == {"site_01": 0, "site_02": 0}
    assert "site_01 none (no prior reports)" in out.getvalue()


def test_evaluate_file_refuses_priors_of_other_sites(tmp_path: Path) -> None:
    from fedmira.common.errors import DataError
    from fedmira.common.evaluation import run_evaluate_file

    path, prior_path, _ = _hospital_files(tmp_path, foreign=True)
    with pytest.raises(DataError) as err:
        run_evaluate_file(_rag_cfg(tmp_path), input_path=str(path), prior_path=str(prior_path), adapter=None,
                          out_dir=tmp_path / "ev", use_encoder=False, out=io.StringIO())
    msg = str(err.value)
    assert "site_03" in msg and "site_01, site_02" in msg and "site_id" in msg and str(prior_path) in msg


def test_evaluate_file_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    from fedmira.common.errors import DataError
    from fedmira.common.evaluation import run_evaluate_file

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"report_id": "x1", "site_id": "s", "findings": "Secret findings text."}\nnot json\n')
    for target, fragment in ((bad, f"{bad}:1"), (tmp_path / "missing.jsonl", "missing.jsonl")):
        with pytest.raises(DataError) as err:
            run_evaluate_file(_cfg(tmp_path), input_path=str(target), prior_path=None, adapter=None,
                              out_dir=tmp_path / "ev", use_encoder=False, out=io.StringIO())
        assert fragment in str(err.value) and "Secret" not in str(err.value)


def test_evaluate_command_input_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import fedmira.common.inference
    from fedmira.cli import main
    from fedmira.common.errors import FedmiraError
    from fedmira.simulations.evaluate_cli import evaluate_command

    path, prior_path, scored = _hospital_files(tmp_path)
    monkeypatch.setattr(fedmira.common.inference, "generate_impressions",
                        lambda cfg, reports, adapter, progress=True, prior=(): ["Normal."] * len(reports))
    out = io.StringIO()
    assert evaluate_command([f"run.out_dir={tmp_path}"], adapter=None, out=str(tmp_path / "ev"), limit=None,
                            no_encoder=True, input=str(path), prior=str(prior_path), stream=out) == 0
    assert f"{len(scored)} reports:" in out.getvalue() and "external:" in out.getvalue()
    with pytest.raises(FedmiraError, match="--limit"):
        evaluate_command([], adapter=None, out=None, limit=5, no_encoder=True, input=str(path))
    with pytest.raises(FedmiraError, match="--input"):
        evaluate_command([], adapter=None, out=None, limit=None, no_encoder=True, prior=str(prior_path))
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    help_text = capsys.readouterr().out
    assert "--input FILE" in help_text and "--prior FILE" in help_text and "site_id" in help_text


def test_cli_evaluate_input_end_to_end_on_the_tiny_model(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`fedmira evaluate --input --prior` with real site_aware_rag prompts on the tiny random model."""
    from fedmira.cli import main

    path, prior_path, scored = _hospital_files(tmp_path)
    out = tmp_path / "ev"
    code = main(["evaluate", "--input", str(path), "--prior", str(prior_path), "--out", str(out),
                 "--no-encoder", "+debug=tiny", "generate.max_new_tokens=4", "data.template=site_aware_rag",
                 "data.neighbors=2"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == len(scored) and list(report["by_group"]) == ["external"]
    assert report["meta"]["retrieval_index"] == {"site_01": 12, "site_02": 0}
    everything = _texts(scored) | {MARKER}
    assert not [t for t in everything if t in printed.out + printed.err]
    # A prior file of another hospital: one message naming both sets of site ids, exit code 2.
    _, foreign, _ = _hospital_files(tmp_path / "f", foreign=True)
    assert main(["evaluate", "--input", str(path), "--prior", str(foreign), "+debug=tiny"]) == 2
    err = capsys.readouterr().err
    assert "site_03" in err and "site_01, site_02" in err
