"""Tests of common/partition.py: sites, splits, manifests, site folders and summaries."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import Counter
from pathlib import Path

import pytest

from fedmira.common.errors import ConfigError, DataError
from fedmira.common.partition import (
    TEMPLATE_OTHER,
    SiteSplit,
    is_normal,
    label_of,
    manifest_hash,
    manifest_rows,
    normalize_exam,
    partition_reports,
    plot_sites,
    quantity_sizes,
    site_templates,
    summarize,
    write_manifest,
    write_site_folders,
)
from fedmira.common.reports import Report, load_reports, read_jsonl
from fedmira.common.synthetic import make_synthetic_corpus


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


# --------------------------------------------------------------------------------------------
# dirichlet / quantity / template
# --------------------------------------------------------------------------------------------

SKEWED: dict[str, dict] = {
    "dirichlet": {"method": "dirichlet", "num_sites": 12, "alpha": 0.5, "label_key": "modality"},
    "quantity": {"method": "quantity", "num_sites": 12, "alpha": 0.5},
    "template": {"method": "template", "num_sites": 0, "min_site_reports": 20},
}


def _sizes(splits: list[SiteSplit]) -> list[int]:
    return [len(_all(s)) for s in splits]


def _mean_max_share(splits: list[SiteSplit], key: str) -> float:
    """Mean over sites of the largest label's share: 1.0 = every site holds one label."""
    shares = [max(Counter(label_of(r, key) for r in _all(s)).values()) / len(_all(s))
              for s in splits]
    return sum(shares) / len(shares)


@pytest.mark.parametrize("name", sorted(SKEWED))
def test_skewed_methods_cover_relabel_and_sort(corpus: list[Report], name: str) -> None:
    splits = partition_reports(corpus, seed=3, **SKEWED[name])
    _assert_exact_cover(splits, corpus)
    ids = [s.site_id for s in splits]
    assert ids == sorted(ids) and all(_all(s) for s in splits)
    assert all(r.site_id == s.site_id for s in splits for r in _all(s))
    if name != "template":
        assert ids == [f"sim_{i:02d}" for i in range(1, 13)]


@pytest.mark.parametrize("name", sorted(SKEWED))
def test_skewed_methods_are_byte_deterministic(corpus: list[Report], tmp_path: Path,
                                               name: str) -> None:
    hashes = [write_manifest(partition_reports(corpus, seed=3, **SKEWED[name]),
                             tmp_path / f"{i}.json", seed=3) for i in range(2)]
    assert hashes[0] == hashes[1]
    assert (tmp_path / "0.json").read_bytes() == (tmp_path / "1.json").read_bytes()
    # Input order must not matter either (the pool is sorted by id before the shuffle).
    assert manifest_hash(partition_reports(corpus[::-1], seed=3, **SKEWED[name])) == hashes[0]
    if name != "template":  # template sites do not depend on the seed, only the splits do
        other = partition_reports(corpus, seed=4, **SKEWED[name])
        assert [len(_all(s)) for s in other] != _sizes(partition_reports(corpus, seed=3,
                                                                         **SKEWED[name]))


@pytest.mark.parametrize("name", sorted(SKEWED))
def test_skewed_external_sites_never_train(corpus: list[Report], name: str) -> None:
    splits = partition_reports(corpus, seed=3, external_sites=2, **SKEWED[name])
    external = {s.site_id for s in splits if s.external}
    assert len(external) == 2
    rows = manifest_rows(splits)
    external_ids = {r["report_id"] for r in rows if r["site_id"] in external}
    assert all(r["split"] == "external" for r in rows if r["site_id"] in external)
    trained = {r.report_id for s in splits for r in (*s.train, *s.val)}
    assert external_ids and not external_ids & trained


def test_dirichlet_small_alpha_skews_label_mix(corpus: list[Report]) -> None:
    for key in ("normal", "modality"):
        skewed = partition_reports(corpus, method="dirichlet", num_sites=20, alpha=0.1,
                                   label_key=key)
        flat = partition_reports(corpus, method="dirichlet", num_sites=20, alpha=100.0,
                                 label_key=key)
        assert _mean_max_share(skewed, key) > _mean_max_share(flat, key) + 0.2
        _assert_exact_cover(skewed, corpus)
        # The floor (min_site_reports, default 10) holds even when flwr's re-draws give up.
        assert min(_sizes(skewed)) >= 10


def test_dirichlet_floor_is_lowered_for_small_corpora(corpus: list[Report]) -> None:
    few = sorted(corpus, key=lambda r: r.report_id)[:40]
    splits = partition_reports(few, method="dirichlet", num_sites=8, alpha=0.1,
                               label_key="body_part", min_site_reports=10)
    assert len(splits) == 8 and min(_sizes(splits)) >= 5
    _assert_exact_cover(splits, few)


def test_quantity_sizes_are_long_tailed_and_sum_up(corpus: list[Report]) -> None:
    sizes = quantity_sizes(2500, 42, alpha=0.5, seed=1, floor=3)
    assert sum(sizes) == 2500 and min(sizes) >= 3 and sizes == sorted(sizes, reverse=True)
    assert sizes[0] >= 4 * sizes[len(sizes) // 2]
    assert quantity_sizes(2500, 42, alpha=0.5, seed=1, floor=3) == sizes
    flat = quantity_sizes(2500, 42, alpha=100.0, seed=1, floor=3)
    assert sum(flat) == 2500 and flat[0] < 2 * flat[-1]
    splits = partition_reports(corpus, method="quantity", num_sites=42, alpha=0.5,
                               min_site_reports=1)
    assert sorted(_sizes(splits), reverse=True) == quantity_sizes(
        len(corpus), 42, alpha=0.5, seed=42, floor=1)
    assert min(_sizes(splits)) >= 1


def test_normalize_exam_and_is_normal() -> None:
    assert normalize_exam("CHEST 2V FRONTAL/LATERAL XXXX, XXXX XXXX PM") == \
        "chest v frontal lateral pm"
    assert normalize_exam("  Xray  Chest PA and Lateral. ") == "xray chest pa and lateral"
    assert normalize_exam("XXXXXXXX 12/3") == ""
    base = Report("r", "s", "DR", "chest", "", "f", "i")
    assert is_normal(dataclasses.replace(base, labels=("Normal",)))
    assert not is_normal(dataclasses.replace(base, labels=("normal", "Cardiomegaly")))
    assert not is_normal(base)


_IU_EXAMS: dict[str, int] = {
    "Xray Chest PA and Lateral": 6,
    "XRAY  chest pa and lateral.": 3,         # same template as above
    "CHEST 2V FRONTAL/LATERAL XXXX, XXXX": 3,
    "Chest 2V frontal/lateral": 2,            # same template as the line above
    "Chest, 2 views, frontal and lateral": 4,
    "PA and lateral views of the chest": 2,
    "XXXX": 1,                                # nothing left after normalising
}


def _write_iu_csv(path: Path) -> Path:
    """A made-up IU-layout CSV (no real rows) with several spellings of a few templates."""
    lines = ["uid,MeSH,Problems,image,indication,comparison,findings,impression"]
    uid = 0
    for exam, count in _IU_EXAMS.items():
        for _ in range(count):
            uid += 1
            problems = "normal" if uid % 3 else "Cardiomegaly;Opacity"
            lines.append(f'{uid},{problems},{problems},"{exam}",Cough.,None.,'
                         f'"Lungs are clear, case {uid}.","No acute disease {uid}."')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_template_groups_exam_spellings(tmp_path: Path) -> None:
    reports = load_reports(_write_iu_csv(tmp_path / "iu.csv"), fmt="iu").reports
    assert len(reports) == sum(_IU_EXAMS.values())
    splits = partition_reports(reports, method="template", min_site_reports=4)
    texts = site_templates(splits)
    assert texts == {"tpl_01": "xray chest pa and lateral", "tpl_02": "chest v frontal lateral",
                     "tpl_03": "chest views frontal and lateral",
                     TEMPLATE_OTHER: "(2 other templates merged)"}
    assert {s.site_id: len(_all(s)) for s in splits} == {
        "tpl_01": 9, "tpl_02": 5, "tpl_03": 4, TEMPLATE_OTHER: 3}
    _assert_exact_cover(splits, reports)
    top = partition_reports(reports, method="template", num_sites=1)
    assert [(s.site_id, len(_all(s))) for s in top] == [(TEMPLATE_OTHER, 12), ("tpl_01", 9)]
    with pytest.raises(ConfigError, match="only 4 exam templates"):
        partition_reports(reports, method="template", num_sites=5)
    with pytest.raises(ConfigError, match="No exam template"):
        partition_reports(reports, method="template", min_site_reports=50)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "dirichlet", "num_sites": 0}, "dirichlet"),
        ({"method": "quantity", "num_sites": 2000}, "quantity"),
        ({"method": "dirichlet", "num_sites": 4, "alpha": 0}, "alpha"),
        ({"method": "quantity", "num_sites": 4, "alpha": float("nan")}, "alpha"),
        ({"method": "dirichlet", "num_sites": 4, "label_key": "sex"}, "label_key"),
        ({"method": "template", "min_site_reports": 0}, "min_site_reports"),
    ],
)
def test_bad_skew_arguments_raise(corpus: list[Report], kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        partition_reports(corpus, **kwargs)


def test_summarize_label_mix_and_p90(natural: list[SiteSplit]) -> None:
    for row, split in zip(summarize(natural), natural):
        assert row["n_normal"] + row["n_abnormal"] == len(_all(split))
        assert row["n_normal"] == sum(is_normal(r) for r in _all(split))
        for name in ("findings", "impression"):
            assert isinstance(row[f"p90_{name}_words"], int)
            assert row[f"p90_{name}_words"] >= min(len(getattr(r, name).split())
                                                    for r in _all(split))


def test_plot_sites_writes_png(corpus: list[Report], tmp_path: Path) -> None:
    splits = partition_reports(corpus, method="quantity", num_sites=6, external_sites=1)
    for mix in ("auto", "normal"):
        path = plot_sites(splits, tmp_path / "plots" / f"{mix}.png", mix=mix)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="mix"):
        plot_sites(splits, tmp_path / "x.png", mix="colour")


def test_run_partition_writes_everything(tmp_path: Path) -> None:
    from fedmira.common.compose import compose_config
    from fedmira.simulations.partition_cli import run_partition

    cfg = compose_config(["+debug=tiny", "partition.method=iid", "partition.num_sites=3"])
    printed = io.StringIO()
    result = run_partition(cfg, str(tmp_path / "out"), out=printed)
    out = tmp_path / "out"
    assert result["sites"] == 3 and result["reports"] == 90 and result["method"] == "iid"
    for name in ("manifest.json", "summary.csv", "summary.md", "sites.png"):
        assert (out / name).is_file() and str(out / name) in printed.getvalue()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["sim_01", "sim_02", "sim_03"]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["hash"] == result["manifest_hash"]
    assert manifest["extra"]["lock_hash"] == cfg.lock_hash()
    assert manifest["extra"]["method"] == "iid"
    assert (out / "summary.md").read_text(encoding="utf-8").count("| sim_0") == 3
    first = (out / "manifest.json").read_bytes()
    assert run_partition(cfg, out, out=io.StringIO())["manifest_hash"] == result["manifest_hash"]
    assert (out / "manifest.json").read_bytes() == first


def test_write_partition_adds_template_column(tmp_path: Path) -> None:
    from fedmira.simulations.partition_cli import write_partition

    reports = load_reports(_write_iu_csv(tmp_path / "iu.csv"), fmt="iu").reports
    splits = partition_reports(reports, method="template", min_site_reports=4)
    templates = site_templates(splits)
    result = write_partition(splits, tmp_path / "out", seed=42, out=io.StringIO(),
                             extra={"method": "template", "templates": templates})
    with open(result["paths"]["summary_csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["site_id"]: r["template"] for r in rows} == templates
    manifest = json.loads(Path(result["paths"]["manifest"]).read_text(encoding="utf-8"))
    assert manifest["extra"]["templates"] == templates
