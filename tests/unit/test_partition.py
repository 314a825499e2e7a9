"""Tests of simulations/partition.py: sites, splits, manifests, site folders and summaries."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from common.errors import ConfigError, DataError
from common.reports import Report, read_jsonl
from common.synthetic import make_synthetic_corpus
from simulations.partition import (
    SiteSplit,
    manifest_hash,
    manifest_rows,
    partition_reports,
    summarize,
    write_manifest,
    write_site_folders,
)


@pytest.fixture(scope="module")
def corpus() -> list[Report]:
    """A smaller synthetic corpus: 42 sites, 1260 reports."""
    return make_synthetic_corpus(num_sites=42, num_reports=1260, seed=7)


@pytest.fixture(scope="module")
def natural(corpus: list[Report]) -> list[SiteSplit]:
    """The default natural partition of the corpus."""
    return partition_reports(corpus)


def _all(split: SiteSplit) -> list[Report]:
    return [*split.train, *split.val, *split.test]


def _ids(splits: list[SiteSplit]) -> list[str]:
    return [r.report_id for s in splits for r in _all(s)]


def _assert_exact_cover(splits: list[SiteSplit], reports: list[Report]) -> None:
    ids = _ids(splits)
    assert len(ids) == len(set(ids)), "a report is in two places"
    assert set(ids) == {r.report_id for r in reports}


def test_natural_keeps_sites_and_covers_input(corpus: list[Report], natural: list[SiteSplit]) -> None:
    sizes = Counter(r.site_id for r in corpus)
    assert [s.site_id for s in natural] == sorted(sizes)
    assert {s.site_id: len(_all(s)) for s in natural} == dict(sizes)
    _assert_exact_cover(natural, corpus)
    assert all(r.site_id == s.site_id for s in natural for r in _all(s))


def test_split_fractions_and_minimums(natural: list[SiteSplit]) -> None:
    total = sum(len(_all(s)) for s in natural)
    assert 0.06 < sum(len(s.val) for s in natural) / total < 0.14
    assert 0.06 < sum(len(s.test) for s in natural) / total < 0.14
    for split in natural:
        assert split.train and not split.external
        assert split.val or len(_all(split)) < 3


def test_patients_stay_in_one_split(natural: list[SiteSplit]) -> None:
    where: dict[tuple[str, str], list[str]] = {}
    for split in natural:
        for name in ("train", "val", "test"):
            for r in getattr(split, name):
                if r.patient_id:
                    where.setdefault((split.site_id, r.patient_id), []).append(name)
    assert sum(len(names) >= 2 for names in where.values()) >= 20
    assert all(len(set(names)) == 1 for names in where.values())


def test_adding_reports_elsewhere_moves_nothing(corpus: list[Report], natural: list[SiteSplit]) -> None:
    fewer = partition_reports([r for r in corpus if r.site_id != "site_01"])
    before = {(row["report_id"], row["split"]) for row in manifest_rows(natural)
              if row["site_id"] != "site_01"}
    assert {(row["report_id"], row["split"]) for row in manifest_rows(fewer)} == before


def test_natural_num_sites_keeps_largest(corpus: list[Report]) -> None:
    sizes = Counter(r.site_id for r in corpus)
    largest = sorted(sizes, key=lambda s: (-sizes[s], s))[:5]
    splits = partition_reports(corpus, num_sites=5)
    assert [s.site_id for s in splits] == sorted(largest)


def test_natural_num_sites_too_large_raises(corpus: list[Report]) -> None:
    with pytest.raises(ConfigError, match="only 42 sites"):
        partition_reports(corpus, num_sites=43)


def test_iid_deals_equal_relabelled_shares(corpus: list[Report]) -> None:
    splits = partition_reports(corpus, method="iid", num_sites=11, seed=3)
    assert [s.site_id for s in splits] == [f"sim_{i:02d}" for i in range(1, 12)]
    assert sorted(len(_all(s)) for s in splits) == [114] * 5 + [115] * 6
    assert all(r.site_id == s.site_id for s in splits for r in _all(s))
    _assert_exact_cover(splits, corpus)


def test_external_sites_are_test_only(corpus: list[Report]) -> None:
    splits = partition_reports(corpus, external_sites=3, seed=5)
    external = [s for s in splits if s.external]
    assert len(external) == 3
    assert all(not s.train and not s.val and s.test for s in external)
    assert [s.site_id for s in external] == [
        s.site_id for s in partition_reports(corpus, external_sites=3, seed=5) if s.external
    ]
    rows = manifest_rows(splits)
    assert {r["site_id"] for r in rows if r["split"] == "external"} == {s.site_id for s in external}
    _assert_exact_cover(splits, corpus)


def test_max_reports_per_site_caps_by_hash_order(corpus: list[Report], natural: list[SiteSplit]) -> None:
    capped = partition_reports(corpus, max_reports_per_site=8)
    for full, cut in zip(natural, capped):
        assert cut.train == full.train[:8]
        assert cut.val == full.val[: len(cut.val)] and cut.test == full.test[: len(cut.test)]
        assert bool(cut.val) == bool(full.val) and bool(cut.test) == bool(full.test)


def test_tiny_site_gets_train_and_val() -> None:
    reports = [Report(f"r{i}", "a", "DR", "chest", "XR", "f", "i") for i in range(3)]
    (split,) = partition_reports(reports, val_fraction=0.1, test_fraction=0.1)
    assert len(split.train) >= 1 and len(split.val) == 1


def test_manifest_is_byte_deterministic(natural: list[SiteSplit], corpus: list[Report],
                                        tmp_path: Path) -> None:
    first = write_manifest(natural, tmp_path / "a.json", seed=42, extra={"method": "natural"})
    again = partition_reports(corpus)
    second = write_manifest(again, tmp_path / "b" / "a.json", seed=42, extra={"method": "natural"})
    assert first == second == manifest_hash(natural) and len(first) == 16
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b" / "a.json").read_bytes()
    payload = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))
    assert payload["hash"] == first and payload["seed"] == 42
    assert payload["extra"] == {"method": "natural"}
    assert payload["rows"] == manifest_rows(natural)


def test_different_seed_gives_different_hash(corpus: list[Report], natural: list[SiteSplit]) -> None:
    assert manifest_hash(partition_reports(corpus, seed=43)) != manifest_hash(natural)


def test_write_site_folders_round_trips(corpus: list[Report], tmp_path: Path) -> None:
    splits = partition_reports(corpus, num_sites=2, external_sites=1)
    folders = write_site_folders(splits, tmp_path / "sites")
    assert folders == [tmp_path / "sites" / s.site_id for s in splits]
    for split, folder in zip(splits, folders):
        for name in ("train", "val", "test"):
            assert read_jsonl(folder / f"{name}.jsonl").reports == getattr(split, name)


def test_summarize_counts(natural: list[SiteSplit]) -> None:
    rows = summarize(natural)
    assert [r["site_id"] for r in rows] == [s.site_id for s in natural]
    for row, split in zip(rows, natural):
        assert row["n_train"] + row["n_val"] + row["n_test"] == len(_all(split))
        assert row["n_CT"] + row["n_MR"] + row["n_DR"] == len(_all(split))
        assert row["mean_findings_words"] > 10 and row["mean_impression_words"] > 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "kmeans"}, ConfigError, "Unknown partition method"),
        ({"method": "iid", "num_sites": 0}, ConfigError, "iid"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, ConfigError, "sum to less than 1"),
        ({"external_sites": 42}, ConfigError, "no training site"),
    ],
)
def test_bad_arguments_raise(corpus: list[Report], kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        partition_reports(corpus, **kwargs)


def test_bad_reports_raise_data_error(corpus: list[Report]) -> None:
    with pytest.raises(DataError, match="empty"):
        partition_reports([])
    with pytest.raises(DataError, match="unique"):
        partition_reports([corpus[0], dataclasses.replace(corpus[1], report_id=corpus[0].report_id)])
