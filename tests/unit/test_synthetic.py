"""Tests of the embedded synthetic multicenter corpus (common/synthetic.py)."""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections import Counter, defaultdict

import pytest

from fedmira.common.errors import ConfigError
from fedmira.common.reports import MODALITIES, Report
from fedmira.common.synthetic import make_synthetic_corpus

HEDGE_WORDS = ("Possible ", "Questionable ", "Cannot exclude ", "Findings may represent ")


@pytest.fixture(scope="module")
def corpus() -> list[Report]:
    """The default corpus: 42 sites, 4200 reports, seed 7."""
    return make_synthetic_corpus()


def _sizes(reports: list[Report]) -> Counter[str]:
    return Counter(r.site_id for r in reports)


def test_same_seed_gives_identical_corpus(corpus: list[Report]) -> None:
    again = make_synthetic_corpus(seed=7)
    assert [dataclasses.astuple(r) for r in again] == [dataclasses.astuple(r) for r in corpus]


def test_different_seed_gives_different_corpus(corpus: list[Report]) -> None:
    other = make_synthetic_corpus(num_sites=42, num_reports=4200, seed=8)
    assert len(other) == 4200
    assert [r.findings for r in other] != [r.findings for r in corpus]


def test_sites_are_long_tailed_and_sum_exactly(corpus: list[Report]) -> None:
    sizes = _sizes(corpus)
    assert sorted(sizes) == [f"site_{i:02d}" for i in range(1, 43)]
    assert sum(sizes.values()) == 4200 == len(corpus)
    assert min(sizes.values()) >= 10
    assert max(sizes.values()) >= 3 * statistics.median(sizes.values())


def test_small_corpus_keeps_every_site_and_exact_total() -> None:
    reports = make_synthetic_corpus(num_sites=5, num_reports=23, seed=1)
    sizes = _sizes(reports)
    assert sorted(sizes) == [f"site_0{i}" for i in range(1, 6)]
    assert sum(sizes.values()) == 23 and min(sizes.values()) >= 4


def test_bad_arguments_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="num_sites"):
        make_synthetic_corpus(num_sites=0)
    with pytest.raises(ConfigError, match="num_reports"):
        make_synthetic_corpus(num_reports=-1)


def test_fields_are_well_formed(corpus: list[Report]) -> None:
    for r in corpus:
        assert re.fullmatch(rf"{r.site_id}-\d{{6}}", r.report_id)
        assert r.modality in ("CT", "MR", "DR") and r.modality in MODALITIES
        assert r.body_part in ("chest", "head", "abdomen", "spine", "knee")
        assert r.exam and r.findings and r.impression
        assert 18 <= (r.age or 0) <= 95 and r.sex in ("M", "F")
        assert r.study_date is not None and "2020-01-01" <= r.study_date <= "2024-12-31"
        assert isinstance(r.labels, tuple) and r.labels
    assert len({r.report_id for r in corpus}) == len(corpus)


def test_some_patients_have_several_reports(corpus: list[Report]) -> None:
    per_patient = Counter(r.patient_id for r in corpus if r.patient_id)
    assert any(n >= 2 for n in per_patient.values())
    assert any(r.patient_id is None for r in corpus)


def test_sites_differ_in_modality_mix(corpus: list[Report]) -> None:
    by_site: dict[str, Counter[str]] = defaultdict(Counter)
    for r in corpus:
        by_site[r.site_id][r.modality] += 1
    dr_share = [c["DR"] / sum(c.values()) for c in by_site.values()]
    assert max(dr_share) > 0.6 and min(dr_share) < 0.3


def test_exam_spelling_differs_between_sites(corpus: list[Report]) -> None:
    chest_xr = {r.exam for r in corpus if r.modality == "DR" and r.body_part == "chest"}
    assert len(chest_xr) >= 4
    assert "XR CHEST PA AND LATERAL" in chest_xr or "Chest, 2 views, frontal and lateral" in chest_xr


def test_findings_have_negation_and_uncertainty(corpus: list[Report]) -> None:
    text = " ".join(r.findings for r in corpus)
    assert "No pleural effusion." in text or "There is no pleural effusion." in text
    assert re.search(r"(^|\. )(No|There is no) [a-z]", text)
    assert any(word in text for word in HEDGE_WORDS)


def test_labels_follow_positive_findings(corpus: list[Report]) -> None:
    chest_labels = {label for r in corpus if r.body_part == "chest" for label in r.labels}
    assert {"cardiomegaly", "pleural effusion", "pneumothorax", "edema", "normal"} <= chest_labels
    for r in corpus:
        assert r.labels == ("normal",) or "normal" not in r.labels
    assert 0.2 < sum(r.labels == ("normal",) for r in corpus) / len(corpus) < 0.8


def _normal_chest_xr(corpus: list[Report]) -> dict[str, set[str]]:
    """Impressions of clean (no positive, no hedged) chest radiographs, per site."""
    out: dict[str, set[str]] = defaultdict(set)
    for r in corpus:
        if r.modality == "DR" and r.body_part == "chest" and "The lungs are clear." in r.findings:
            out[r.site_id].add(r.impression)
    return out


def test_one_normal_style_per_site_several_across_sites(corpus: list[Report]) -> None:
    styles = _normal_chest_xr(corpus)
    assert len(styles) >= 20
    assert all(len(s) == 1 for s in styles.values())
    assert len(set.union(*styles.values())) >= 3


def test_impression_is_a_function_of_site_exam_findings(corpus: list[Report]) -> None:
    seen: dict[tuple[str, str, str], str] = {}
    for r in corpus:
        key = (r.site_id, r.exam, r.findings)
        assert seen.setdefault(key, r.impression) == r.impression


def test_abnormal_impressions_use_site_formats(corpus: list[Report]) -> None:
    text = [r.impression for r in corpus]
    assert any(re.match(r"1\. .+ 2\. ", t) for t in text)
    assert any(";" in t for t in text)
    assert any(t.endswith("Recommend clinical correlation.") for t in text)


def test_word_counts_are_in_target_ranges(corpus: list[Report]) -> None:
    findings = statistics.mean(len(r.findings.split()) for r in corpus)
    impression = statistics.mean(len(r.impression.split()) for r in corpus)
    assert 30 <= findings <= 45
    assert 5 <= impression <= 20
