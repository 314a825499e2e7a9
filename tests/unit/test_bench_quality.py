"""The quality benchmark's bookkeeping: budget, site choice, ratios, targets, resume, results files.

The federated part runs Flower (integration-sized); here the bench runs without strategies on the
tiny random model and a synthetic IU-format file, so it takes seconds.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from fedmira.common.errors import FedmiraError
from fedmira.common.synthetic import make_synthetic_corpus
from fedmira.simulations.bench.quality import (
    Budget,
    checkpoint_steps,
    choose_local_sites,
    federated_warmup_ratio,
    ratios,
    run_bench,
    steps_for,
    targets,
)

EXAMS = ["XR CHEST PA AND LATERAL", "CHEST 2V FRONTAL/LATERAL", "PA and lateral chest x-XXXX"]


def _iu_csv(path: Path, n: int = 90) -> Path:
    """A synthetic (PHI-free) file in the IU/Open-i layout, with three exam templates."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings",
                         "impression"])
        for i, r in enumerate(make_synthetic_corpus(num_sites=3, num_reports=n, seed=2)):
            writer.writerow([i + 1, "normal", "normal", EXAMS[i % 3], "", "", r.findings, r.impression])
    return path


def _summary(**means: float) -> dict[str, Any]:
    return {"summary": {m: {"mean": v, "lo": v, "hi": v} for m, v in means.items()}}


def test_ratios_and_targets() -> None:
    result = {"systems": {
        "fed_fedavg": _summary(rougeL=0.66, bertscore_f1=0.9, sim=0.8, clinical_f1=0.7,
                               clinical_micro_f1=0.6),
        "centralized": _summary(rougeL=0.69, bertscore_f1=0.9, sim=0.8, clinical_f1=0.7,
                                clinical_micro_f1=0.6),
        "retrieval": _summary(rougeL=0.63, bertscore_f1=0.8, sim=0.7, clinical_f1=0.6, clinical_micro_f1=0.5),
        "retrieval_site": _summary(rougeL=0.61, bertscore_f1=0.85, sim=0.7, clinical_f1=0.6,
                                   clinical_micro_f1=0.5),
    }, "comparisons": [
        {"reference": "fed_fedavg", "system": "retrieval", "metric": "rougeL", "wilcoxon": {"p_holm": 0.01}},
    ]}
    kinds = {"fed_fedavg": "adapter", "centralized": "adapter", "retrieval": "retrieval",
             "retrieval_site": "retrieval_site"}
    for name, kind in kinds.items():
        result["systems"][name]["kind"] = kind
    r = ratios(result, ["fed_fedavg"], "centralized")
    assert r["fed_fedavg"]["rougeL"] == pytest.approx(0.66 / 0.69)
    assert r["fed_fedavg"]["sim"] == pytest.approx(1.0)
    t = targets(result, r)["fed_fedavg"]
    assert t["ratio_ge_0.95_every_metric"] is True
    # the bar is the strongest retrieval by ROUGE-L (pooled, 0.63), beaten on all three metrics
    assert t["retrieval_bar"] == "retrieval" and t["above_retrieval"] is True
    assert t["rougeL_holm_p"] == 0.01 and t["significant"] is True
    result["systems"]["fed_fedavg"]["summary"]["rougeL"]["mean"] = 0.6
    t = targets(result, ratios(result, ["fed_fedavg"], "centralized"))["fed_fedavg"]
    assert t["ratio_ge_0.95_every_metric"] is False and t["above_retrieval"] is False
    assert t["significant"] is False


def test_choose_local_sites() -> None:
    sites = [("template_other", 900), ("tpl_01", 600), ("tpl_02", 90)]
    assert choose_local_sites(sites, []) == ["template_other", "tpl_02"]
    assert choose_local_sites(sites, ["tpl_01"]) == ["tpl_01"]
    assert choose_local_sites(sites, ["none"]) == []
    with pytest.raises(FedmiraError, match="no such training site"):
        choose_local_sites(sites, ["tpl_09"])


def test_budget_is_in_epochs_and_checkpoints_split_it_evenly() -> None:
    assert steps_for(0.5, 2005, 8) == 126 and steps_for(0.01, 10, 8) == 1
    assert checkpoint_steps(126, 4) == [32, 63, 94, 126]
    assert checkpoint_steps(3, 4) == [1, 2, 3]


def test_budget_key_changes_with_settings(tmp_path: Path) -> None:
    data = str(_iu_csv(tmp_path / "iu.csv"))
    assert Budget(data=data).key() == Budget(data=data).key()
    assert Budget(data=data).key() != Budget(data=data, rounds=5).key()
    assert Budget(data=data).key() != Budget(data=data, prompt="site_aware").key()
    # choosing more systems or more reports to score reuses the adapters already trained
    assert Budget(data=data).key() == Budget(data=data, strategies=("fedavg",), ablation=(),
                                             reports=266, local_sites=("none",)).key()


def test_federated_sites_warm_up_over_the_pooled_runs_share() -> None:
    assert federated_warmup_ratio(Budget(warmup_steps=10), 126) == pytest.approx(10 / 126)
    assert federated_warmup_ratio(Budget(warmup_steps=0), 126) == 0.0
    assert federated_warmup_ratio(Budget(warmup_steps=10), 4) == 1.0


def test_bench_without_federation_on_the_tiny_model_resumes(tmp_path: Path) -> None:
    data = _iu_csv(tmp_path / "iu.csv")
    budget = Budget(data=str(data), template_sites=2, rounds=2, epochs=0.1, batch_size=2, warmup_steps=0,
                    strategies=(), ablation=("plain",), reports=6, curve_reports=4, max_new_tokens=4,
                    model="tiny-random", encoder=False)
    out = io.StringIO()
    doc = run_bench(budget, work_root=tmp_path / "work", results_dir=tmp_path / "results", out=out)
    assert set(doc["systems"]) >= {"centralized", "centralized_plain", "zero_shot", "retrieval",
                                   "retrieval_site", "most_frequent"}
    assert sum(n.startswith("local_") for n in doc["systems"]) == 2
    assert doc["n"] == 6 and doc["trained"]["centralized"]["tokens"] > 0
    assert doc["trained"]["centralized"]["prompt"] == "site_aware_rag"
    assert [r["system"] for r in doc["ablation"]["rows"]] == ["centralized", "centralized_plain"]
    assert len(doc["curve"]["centralized"]) == 2  # a point after each half of the budget
    # the plot's baselines are scored on the curve's 4 reports, not on all 6 held-out ones
    expected = {"retrieval", "retrieval_site", "retrieval_consensus", "most_frequent"}
    assert set(doc["curve_baselines"]) == expected
    assert all(0.0 <= v <= 1.0 for v in doc["curve_baselines"].values())
    saved = json.loads(next((tmp_path / "results").glob("quality-*.json")).read_text())
    assert "machine" in saved and saved["machine"]["cpus"]
    md = next((tmp_path / "results").glob("quality-*.md")).read_text()
    assert "| system               | tokens   | ROUGE-L              |" in md
    assert "Verdict:" in md and "Prompting ablation" in md
    assert "| retrieval (no training, same reports)           |" in md
    assert next((tmp_path / "results").glob("quality-*-budget.png")).stat().st_size > 0
    texts = {r.impression for r in make_synthetic_corpus(num_sites=3, num_reports=90, seed=2)}
    assert not [t for t in texts if len(t) > 12 and (t in md or t in out.getvalue())]
    again = io.StringIO()
    run_bench(budget, work_root=tmp_path / "work", results_dir=tmp_path / "results", out=again)
    assert again.getvalue().count("[skip]") == 4 and "[train]" not in again.getvalue()
    assert "centralized: cache" in again.getvalue()
