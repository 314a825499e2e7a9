"""fedmira compare: systems, the prediction cache, the Holm family, the table, the verdict, end to end."""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from fedmira.common.adapters import save_adapter
from fedmira.common.compare import (
    ADAPTER,
    COMPARISON_COLUMNS,
    MOST_FREQUENT,
    RETRIEVAL,
    RETRIEVAL_CONSENSUS,
    RETRIEVAL_SITE,
    ZERO_SHOT,
    SystemSpec,
    compare_systems,
    comparison_table,
    default_reference,
    default_systems,
    held_out_and_pool,
    parse_system,
    predict_system,
    retrieval_verdict,
    verdict_against_retrieval,
)
from fedmira.common.compose import compose_config
from fedmira.common.config import LoraConfig
from fedmira.common.errors import FedmiraError
from fedmira.common.model import LoadedModel, apply_lora
from fedmira.common.reports import Report
from fedmira.common.stats import holm_bonferroni

SMALL = ["data.synthetic_sites=3", "data.synthetic_reports=60", "partition.min_site_reports=1"]
TINY = ["model=tiny", *SMALL, "data.max_length=224", "data.max_target_tokens=48",
        "generate.max_new_tokens=6"]


def _adapter(tiny: LoadedModel, folder: Path, *, template: str = "site_aware",
             base: str = "tiny-random", seed: int = 0, extra: tuple[str, ...] = ()) -> Path:
    """A tiny LoRA adapter saved as ``folder/final_adapter`` with its run's config.json beside it
    (the TINY config, as `fedmira simulate` records it, with ``template``, ``base`` and ``extra``)."""
    model = apply_lora(copy.deepcopy(tiny.model), LoraConfig(r=2, alpha=4), seed=seed)
    save_adapter(model, folder / "final_adapter")
    recorded = compose_config([*TINY, f"data.template={template}", *extra]).to_dict()
    recorded["model"]["name_or_path"] = base
    (folder / "config.json").write_text(json.dumps({"config": recorded}))
    return folder / "final_adapter"


# ----------------------------------------------------------------------------- systems
def test_parse_system_forms(tiny: LoadedModel, tmp_path: Path) -> None:
    final = _adapter(tiny, tmp_path / "run")
    assert parse_system(f"fed={tmp_path / 'run'}") == SystemSpec("fed", ADAPTER, str(final))
    assert parse_system(f"fed={final}").adapter == str(final)
    assert parse_system(f"fed={tmp_path / 'run'}:plain").template == "plain"
    assert parse_system("zs=base:plain") == SystemSpec("zs", ZERO_SHOT, None, "plain")


@pytest.mark.parametrize("text, fragment", [
    ("nopath", "expected NAME=PATH"),
    ("retrieval=base", "built-in"),
    ("bad name=base", "may use letters"),
    ("x=base:fancy", "unknown prompt template"),
])
def test_parse_system_errors(text: str, fragment: str) -> None:
    with pytest.raises(FedmiraError, match=fragment):
        parse_system(text)


def test_missing_adapter_names_path_and_expectation(tmp_path: Path) -> None:
    with pytest.raises(FedmiraError) as missing:
        parse_system(f"fed={tmp_path / 'nope'}")
    assert str(tmp_path / "nope") in str(missing.value) and "adapter_config.json" in str(missing.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedmiraError) as empty:
        parse_system(f"fed={tmp_path / 'empty'}")
    assert "final_adapter" in str(empty.value) and str(tmp_path / "empty") in str(empty.value)


def test_default_systems_and_reference() -> None:
    fed = SystemSpec("fed", ADAPTER, "x")
    names = [s.name for s in default_systems([fed])]
    assert names == ["fed", ZERO_SHOT, RETRIEVAL, RETRIEVAL_SITE, RETRIEVAL_CONSENSUS, MOST_FREQUENT]
    assert default_reference(default_systems([fed])) == "fed"
    assert default_reference(default_systems([])) == ZERO_SHOT
    with pytest.raises(FedmiraError, match="given twice"):
        default_systems([fed, fed])


# ----------------------------------------------------------------------------- held-out set
def test_training_pool_never_holds_a_held_out_report(tmp_path: Path) -> None:
    from fedmira.common.evaluation import select_reports
    from fedmira.common.partition import load_pooled_reports, split_sites

    cfg = compose_config([*SMALL, "data.synthetic_reports=90", "partition.external_sites=1",
                          f"run.out_dir={tmp_path}"])
    reports, external, pool = held_out_and_pool(cfg, 0, io.StringIO())
    assert len(external) == 1 and reports and pool
    assert not {r.report_id for r in reports} & {r.report_id for r in pool}
    assert not {r.site_id for r in pool} & external  # external sites teach nothing
    splits = split_sites(cfg, load_pooled_reports(cfg, io.StringIO()))
    assert reports == select_reports(splits, limit=0, seed=cfg.partition.seed)[0]  # same as evaluate


# ----------------------------------------------------------------------------- cache
def test_predictions_are_cached_by_adapter_template_and_reports(
        tiny: LoadedModel, tmp_path: Path, reports: list[Report]) -> None:
    cfg = compose_config([*TINY, f"run.out_dir={tmp_path}"])
    calls: list[tuple[str | None, str, int]] = []

    def fake(run_cfg: Any, reps: list[Report], adapter: str | None, progress: bool = True,
             prior: Any = ()) -> list[str]:
        calls.append((adapter, run_cfg.data.template, len(reps)))
        return [f"gen {r.report_id}" for r in reps]

    _adapter(tiny, tmp_path / "run", template="plain")
    spec = parse_system(f"fed={tmp_path / 'run'}")
    cache, few = tmp_path / "cache", reports[:5]
    hyps, info = predict_system(spec, cfg, few, [], cache_dir=cache, generate_fn=fake)
    assert info["source"] == "generated" and info["template"] == "plain"  # recorded with the run
    again, info2 = predict_system(spec, cfg, few, [], cache_dir=cache, generate_fn=fake)
    assert again == hyps and info2["source"] == "cache" and len(calls) == 1
    predict_system(SystemSpec("fed", ADAPTER, spec.adapter, "site_aware"), cfg, few, [],
                   cache_dir=cache, generate_fn=fake)  # another prompt
    predict_system(spec, cfg, reports[:6], [], cache_dir=cache, generate_fn=fake)  # other reports
    _adapter(tiny, tmp_path / "run", template="plain", seed=5)  # other adapter bytes
    predict_system(spec, cfg, few, [], cache_dir=cache, generate_fn=fake)
    assert len(calls) == 4
    cfg2 = compose_config([*TINY, "generate.max_new_tokens=7", f"run.out_dir={tmp_path}"])
    predict_system(spec, cfg2, few, [], cache_dir=cache, generate_fn=fake)  # other decoding
    assert len(calls) == 5


def test_base_model_mismatch_is_refused(tiny: LoadedModel, tmp_path: Path) -> None:
    from fedmira.common.compare import check_base_model

    _adapter(tiny, tmp_path / "run", base="embedded:smollm2-135m")
    cfg = compose_config([*TINY, f"run.out_dir={tmp_path}"])
    with pytest.raises(FedmiraError, match="model.name_or_path=embedded:smollm2-135m"):
        check_base_model(parse_system(f"fed={tmp_path / 'run'}"), cfg)


def test_an_adapter_trained_on_held_out_reports_is_refused(tiny: LoadedModel, tmp_path: Path) -> None:
    from fedmira.common.compare import run_compare

    _adapter(tiny, tmp_path / "run", extra=("partition.seed=7",))  # another split of the same data
    cfg = compose_config([*TINY, f"run.out_dir={tmp_path}"])
    spec = parse_system(f"fed={tmp_path / 'run'}")
    with pytest.raises(FedmiraError, match="held-out reports .* split the data differently"):
        run_compare(cfg, [spec, SystemSpec(RETRIEVAL, RETRIEVAL)], limit=0, out_dir=tmp_path / "o",
                    use_encoder=False, out=io.StringIO())


# ----------------------------------------------------------------------------- statistics
def _four_systems(reports: list[Report]) -> dict[str, list[str]]:
    refs = [r.impression for r in reports]
    return {
        "fed": [t if i % 3 else "Normal study." for i, t in enumerate(refs)],
        "central": list(refs),
        "retrieval": [t if i % 2 else "No acute disease." for i, t in enumerate(refs)],
        "most_frequent": ["No acute disease."] * len(refs),
    }


KINDS = {"fed": ADAPTER, "central": ADAPTER, "retrieval": RETRIEVAL, "most_frequent": MOST_FREQUENT}


def test_holm_family_spans_all_systems_and_metrics(reports: list[Report]) -> None:
    res = compare_systems(reports, _four_systems(reports), kinds=KINDS, reference="fed",
                          use_encoder=False, n_resamples=50, n_permutations=200)
    assert res["metrics"] == ["rouge1", "rouge2", "rougeL", "bleu4", "clinical_f1"]
    assert res["family"]["size"] == 3 * 5 == len(res["comparisons"])
    for test in ("wilcoxon", "randomization"):
        raw = [row[test]["p_value"] for row in res["comparisons"]]
        expected = holm_bonferroni(raw)["adjusted"]
        assert [row[test]["p_holm"] for row in res["comparisons"]] == pytest.approx(expected)
    # Adjusted within the whole family, not per system: at least one p grows by more than 5x.
    assert any(row["wilcoxon"]["p_holm"] > 5 * row["wilcoxon"]["p_value"] > 0 for row in res["comparisons"])
    central = next(r for r in res["comparisons"] if r["system"] == "central" and r["metric"] == "rougeL")
    assert central["mean_diff"]["mean_diff"] < 0 and central["rank_biserial"] == -1.0  # fed is worse
    assert central["wilcoxon"]["reject"]
    assert res["systems"]["central"]["summary"]["rougeL"]["mean"] == pytest.approx(1.0)


def test_comparison_table_columns_and_rows(reports: list[Report]) -> None:
    res = compare_systems(reports, _four_systems(reports), kinds=KINDS, reference="fed",
                          use_encoder=False, n_resamples=20, n_permutations=100)
    lines = comparison_table(res)
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(COMPARISON_COLUMNS)
    assert len(lines) == 2 + res["family"]["size"]
    assert all(line.count("|") == len(COMPARISON_COLUMNS) + 1 for line in lines)


def test_verdict_sentence_both_ways() -> None:
    lose = retrieval_verdict("fed", 0.50, 0.63, -0.2, -0.1)
    assert lose["beats_retrieval"] is False
    assert lose["sentence"] == ("The fine-tuned model `fed` does NOT beat retrieval on ROUGE-L "
                                "(0.500 vs 0.630): not worth deploying as is.")
    win = retrieval_verdict("fed", 0.70, 0.63, 0.02, 0.11)
    assert win["beats_retrieval"] is True and "beats retrieval" in win["sentence"]
    assert "NOT" not in win["sentence"] and "deploying" not in win["sentence"]
    tie = retrieval_verdict("fed", 0.64, 0.63, -0.01, 0.03)
    assert tie["beats_retrieval"] is False and "does NOT clearly beat" in tie["sentence"]


def test_verdict_names_the_retrieval_baseline_it_is_measured_against() -> None:
    kinds = {"fed": ADAPTER, RETRIEVAL: RETRIEVAL, RETRIEVAL_CONSENSUS: RETRIEVAL_CONSENSUS}
    rows = {"fed": [{"rougeL": 0.6}, {"rougeL": 0.7}], RETRIEVAL: [{"rougeL": 0.5}, {"rougeL": 0.6}],
            RETRIEVAL_CONSENSUS: [{"rougeL": 0.7}, {"rougeL": 0.8}]}
    verdict = verdict_against_retrieval(rows, kinds, n_resamples=50)
    assert verdict["retrieval"] == RETRIEVAL_CONSENSUS  # the strongest of the retrieval baselines
    assert verdict["sentence"] == ("The fine-tuned model `fed` does NOT beat retrieval on ROUGE-L "
                                   "(0.650 vs 0.750 for `retrieval_consensus`): not worth deploying as is.")
    no_adapter = verdict_against_retrieval({k: v for k, v in rows.items() if k != "fed"}, kinds)
    assert no_adapter["retrieval"] == RETRIEVAL_CONSENSUS
    assert no_adapter["sentence"].endswith("`retrieval_consensus` scores ROUGE-L 0.750, the bar to beat.")


def test_verdict_picks_the_best_adapter(reports: list[Report]) -> None:
    res = compare_systems(reports, _four_systems(reports), kinds=KINDS, reference="fed",
                          use_encoder=False, n_resamples=50, n_permutations=100)
    verdict = res["verdict"]
    assert verdict["best"] == "central" and verdict["beats_retrieval"] is True
    only_fed = {k: v for k, v in _four_systems(reports).items() if k != "central"}
    worse = compare_systems(reports, {**only_fed, "fed": ["Normal study."] * len(reports)}, kinds=KINDS,
                            reference="fed", use_encoder=False, n_resamples=50, n_permutations=100)
    assert worse["verdict"]["beats_retrieval"] is False and "NOT" in worse["verdict"]["sentence"]


# ----------------------------------------------------------------------------- end to end
def test_compare_end_to_end_on_the_tiny_model(tiny: LoadedModel, tmp_path: Path) -> None:
    from fedmira.cli import main
    from fedmira.simulations.compare_cli import compare_command

    _adapter(tiny, tmp_path / "run")
    overrides = [*TINY, f"run.out_dir={tmp_path}"]
    args = dict(limit=6, no_encoder=True, resamples=50, permutations=200)
    out = io.StringIO()
    code = compare_command(overrides, [f"fed={tmp_path / 'run'}", f"fed_plain={tmp_path / 'run'}:plain"],
                           out=str(tmp_path / "cmp"), stream=out, **args)  # type: ignore[arg-type]
    assert code == 0
    printed = out.getvalue()
    assert "fed: generated" in printed and "zero_shot: generated" in printed
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert list(doc["systems"]) == ["fed", "fed_plain", ZERO_SHOT, RETRIEVAL, RETRIEVAL_SITE,
                                    RETRIEVAL_CONSENSUS, MOST_FREQUENT]
    assert doc["reference"] == "fed" and doc["family"]["size"] == 6 * 5 and doc["n"] == 6
    assert doc["predictions_info"]["fed_plain"]["template"] == "plain"
    assert doc["predictions_info"]["fed"]["template"] == "site_aware"
    assert "retrieval" in doc["verdict"]["sentence"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    table_rows = [[c.strip() for c in line.strip("|").split("|")]
                  for line in md.splitlines() if line.startswith("|")]
    assert list(COMPARISON_COLUMNS) in table_rows and doc["verdict"]["sentence"] in md
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    rows = list(csv.DictReader((tmp_path / "cmp" / "per_sample.csv").open()))
    assert len(rows) == 7 * 6  # 7 systems x 6 reports
    # The folder is a reader study's input: cases.jsonl + one prediction file per system.
    from fedmira.simulations.reader_study_cli import cases_from_compare

    cases = cases_from_compare(tmp_path / "cmp")
    assert len(cases) == 6 and set(cases[0].candidates) == set(doc["systems"])
    # No report text on the console or in the report files (predictions/ holds the model output).
    reports, _, pool = held_out_and_pool(compose_config(overrides), 6, io.StringIO())
    texts = {t for r in [*reports, *pool] for t in (r.findings, r.impression) if len(t) > 12}
    for content in (printed, md, (tmp_path / "cmp" / "compare.json").read_text()):
        assert not [t for t in texts if t in content]
    # A rerun takes every generated system from the cache.
    out2 = io.StringIO()
    compare_command(overrides, [f"fed={tmp_path / 'run'}"], out=str(tmp_path / "cmp2"), stream=out2,
                    **args)  # type: ignore[arg-type]
    assert "fed: cache" in out2.getvalue() and "zero_shot: cache" in out2.getvalue()
    # The CLI turns a missing adapter into one message and exit code 2.
    assert main(["compare", "--system", f"x={tmp_path / 'missing'}", *overrides]) == 2


# ----------------------------------------------------------------------------- a new hospital's file
def test_compare_on_a_new_hospitals_file_with_its_archive(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import fedmira.common.inference
    from fedmira.common.compare import run_compare
    from tests.unit.test_evaluation import MARKER, _hospital_files

    path, prior_path, scored = _hospital_files(tmp_path)
    priors_seen: list[set[str]] = []

    def fake(run_cfg: Any, reps: list[Report], adapter: str | None, progress: bool = True,
             prior: Any = ()) -> list[str]:
        priors_seen.append({r.report_id for r in prior})
        return ["No acute findings."] * len(reps)

    monkeypatch.setattr(fedmira.common.inference, "generate_impressions", fake)
    cfg = compose_config([*SMALL, f"run.out_dir={tmp_path}"])
    out = io.StringIO()
    res = run_compare(cfg, default_systems([]), out_dir=tmp_path / "cmp", cache_dir=tmp_path / "cache",
                      use_encoder=False, n_resamples=50, n_permutations=100, progress=False, out=out,
                      input_path=str(path), prior_path=str(prior_path))
    assert res["n"] == len(scored)
    assert list(res["systems"]) == [ZERO_SHOT, RETRIEVAL, RETRIEVAL_SITE, RETRIEVAL_CONSENSUS, MOST_FREQUENT]
    assert {row["report_id"] for row in res["per_sample"][RETRIEVAL]} == {r.report_id for r in scored}
    assert priors_seen and scored[0].report_id not in priors_seen[0] and len(priors_seen[0]) == 12
    meta = res["meta"]
    assert meta["input"] == str(path) and meta["prior"] == str(prior_path) and meta["training_pool"] == 12
    assert meta["external_sites"] == 2 and meta["retrieval_index"] == {"site_01": 12, "site_02": 0}
    prior_reports = fedmira.common.inference.load_reports(str(prior_path)).reports
    archive = {r.impression for r in prior_reports} - {MARKER}
    # the baselines learn from the archive only
    for name in (RETRIEVAL, RETRIEVAL_SITE, RETRIEVAL_CONSENSUS, MOST_FREQUENT):
        written = (tmp_path / "cmp" / "predictions" / f"{name}.jsonl").read_text()
        lines = [json.loads(x) for x in written.splitlines()]
        assert len(lines) == len(scored) and {x["impression"] for x in lines} <= archive
    printed = out.getvalue()
    assert f"every report of {path}" in printed and "12 prior reports" in printed
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert str(prior_path) in md and "train splits of the internal sites" not in md
    texts = {t for r in scored for t in (r.findings, r.impression) if len(t) > 12} | {MARKER}
    for content in (printed, md, (tmp_path / "cmp" / "compare.json").read_text()):
        assert not [t for t in texts if t in content]


def test_compare_on_a_file_without_prior_refuses_the_baselines(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import fedmira.common.inference
    from fedmira.common.compare import run_compare
    from fedmira.simulations.compare_cli import compare_command
    from tests.unit.test_evaluation import _hospital_files

    path, _, scored = _hospital_files(tmp_path, prior=False)
    monkeypatch.setattr(fedmira.common.inference, "generate_impressions",
                        lambda cfg, reps, adapter, progress=True, prior=(): ["Normal."] * len(reps))
    cfg = compose_config([*SMALL, f"run.out_dir={tmp_path}"])
    kw: dict[str, Any] = dict(out_dir=tmp_path / "cmp", cache_dir=tmp_path / "cache", use_encoder=False,
                              n_resamples=20, n_permutations=50, progress=False, out=io.StringIO(),
                              input_path=str(path), prior_path=None)
    with pytest.raises(FedmiraError) as err:
        run_compare(cfg, default_systems([]), **kw)
    assert "--prior FILE" in str(err.value) and "--no-baselines" in str(err.value)
    systems = default_systems([parse_system("plain=base:plain")], baselines=False)
    res = run_compare(cfg, systems, **kw)
    assert res["n"] == len(scored) and res["meta"]["prior"] is None
    with pytest.raises(FedmiraError, match="--limit"):
        compare_command([], [], input=str(path), limit=5)
    with pytest.raises(FedmiraError, match="--input"):
        compare_command([], [], prior=str(path))


def test_compare_help_explains_input_and_prior(capsys: pytest.CaptureFixture[str]) -> None:
    from fedmira.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "--input FILE" in text and "--prior FILE" in text and "--no-baselines" in text


def test_compare_on_a_file_refuses_an_adapter_trained_on_it(tiny: LoadedModel, tmp_path: Path) -> None:
    from fedmira.common.partition import load_pooled_reports, split_sites
    from fedmira.common.reports import write_jsonl
    from fedmira.simulations.compare_cli import compare_command

    _adapter(tiny, tmp_path / "run")
    cfg = compose_config([*TINY, f"run.out_dir={tmp_path}"])
    splits = split_sites(cfg, load_pooled_reports(cfg, io.StringIO()))
    trained = [r for s in splits if not s.external for r in s.train][:4]
    write_jsonl(trained, tmp_path / "seen.jsonl")
    with pytest.raises(FedmiraError, match="trained on 4 of the 4 reports"):
        compare_command([*TINY, f"run.out_dir={tmp_path}"], [f"fed={tmp_path / 'run'}"],
                        input=str(tmp_path / "seen.jsonl"), baselines=False, no_encoder=True,
                        out=str(tmp_path / "cmp"), stream=io.StringIO())
