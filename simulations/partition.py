"""Splitting pooled reports into simulated hospitals and their train / val / test splits.

Plain functions, no Flower imports. ``natural`` keeps the real sites (``report.site_id``),
``iid`` deals a seeded shuffle into equal simulated sites (``sim_01`` ..). Inside a site each
report (or, when ``patient_id`` is set, each patient) goes to train / val / test by a hash of
``(seed, key)``, so adding reports elsewhere never moves existing ones and no patient straddles
two splits. Whole sites can be held out as ``external`` (test only). The resulting assignment is
written as a byte-for-byte deterministic JSON manifest whose hash identifies the partition.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from common.errors import ConfigError, DataError
from common.reports import MODALITIES, Report, write_jsonl

METHODS: tuple[str, ...] = ("natural", "iid")
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class SiteSplit:
    """One (real or simulated) site's reports, split into train / val / test.

    External sites hold all their reports in ``test`` and none in ``train`` / ``val``.
    """

    site_id: str
    train: list[Report]
    val: list[Report]
    test: list[Report]
    external: bool


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------


def _unit_hash(seed: int, key: str) -> float:
    """A float in [0, 1) from sha256 of ``(seed, key)``, stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}\x1f{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _group_key(report: Report) -> str:
    """The unit kept together in one split: the patient when known, else the report."""
    return f"patient:{report.patient_id}" if report.patient_id else f"report:{report.report_id}"


def _hash_order(reports: Iterable[Report], seed: int) -> list[Report]:
    """Reports sorted by their own hash (ties by id): the deterministic in-split order."""
    return sorted(reports, key=lambda r: (_unit_hash(seed, f"report:{r.report_id}"), r.report_id))


# --------------------------------------------------------------------------------------------
# Validation and grouping into sites
# --------------------------------------------------------------------------------------------


def _check_args(reports: list[Report], method: str, num_sites: int, external_sites: int,
                val_fraction: float, test_fraction: float, max_reports_per_site: int) -> None:
    """Raise a clear error for arguments that cannot give a valid partition."""
    if not reports:
        raise DataError("No reports to partition: the input list is empty.")
    ids = Counter(r.report_id for r in reports)
    duplicated = [rid for rid, n in ids.items() if n > 1]
    if duplicated:
        raise DataError(f"Report ids must be unique to partition; duplicated: {duplicated[:5]}.")
    if method not in METHODS:
        raise ConfigError(f"Unknown partition method {method!r}: use one of {list(METHODS)}.")
    if num_sites < 0 or external_sites < 0 or max_reports_per_site < 0:
        raise ConfigError("num_sites, external_sites and max_reports_per_site must be >= 0.")
    if method == "iid" and not 1 <= num_sites <= len(reports):
        raise ConfigError(
            f"method='iid' needs 1 <= num_sites <= number of reports ({len(reports)}), "
            f"got num_sites={num_sites}."
        )
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0
            and val_fraction + test_fraction < 1.0):
        raise ConfigError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in "
            "[0, 1) and sum to less than 1 so that train keeps a share."
        )


def _natural_sites(reports: list[Report], num_sites: int) -> dict[str, list[Report]]:
    """Group by ``site_id``; with ``num_sites`` > 0 keep the largest sites (ties by id)."""
    groups: dict[str, list[Report]] = defaultdict(list)
    for report in reports:
        groups[report.site_id].append(report)
    if num_sites > len(groups):
        raise ConfigError(
            f"num_sites={num_sites} but the reports come from only {len(groups)} sites: "
            f"lower num_sites (0 keeps all sites) or use method='iid'."
        )
    if num_sites > 0:
        largest = sorted(groups, key=lambda s: (-len(groups[s]), s))[:num_sites]
        groups = {s: groups[s] for s in largest}
    return {s: groups[s] for s in sorted(groups)}


def _iid_sites(reports: list[Report], num_sites: int, seed: int) -> dict[str, list[Report]]:
    """Deal a seeded shuffle into ``num_sites`` shares (sizes differ by at most one)."""
    pool = sorted(reports, key=lambda r: r.report_id)
    random.Random(seed).shuffle(pool)
    width = max(2, len(str(num_sites)))
    base, extra = divmod(len(pool), num_sites)
    sites: dict[str, list[Report]] = {}
    start = 0
    for i in range(num_sites):
        site_id = f"sim_{i + 1:0{width}d}"
        end = start + base + (1 if i < extra else 0)
        sites[site_id] = [dataclasses.replace(r, site_id=site_id) for r in pool[start:end]]
        start = end
    return sites


def _pick_external(site_ids: list[str], external_sites: int, seed: int) -> set[str]:
    """Choose the external (test-only) sites deterministically from the seed."""
    if external_sites >= len(site_ids) and external_sites > 0:
        raise ConfigError(
            f"external_sites={external_sites} leaves no training site among {len(site_ids)} "
            "sites: use fewer external sites."
        )
    return set(random.Random(f"external:{seed}").sample(sorted(site_ids), external_sites))


# --------------------------------------------------------------------------------------------
# Splitting inside a site
# --------------------------------------------------------------------------------------------


def _members(assign: dict[str, str], units: dict[str, float], name: str) -> list[str]:
    """Unit keys assigned to split ``name``, by ascending hash."""
    return sorted((k for k in units if assign[k] == name), key=lambda k: (units[k], k))


def _split_units(units: dict[str, float], val_fraction: float, test_fraction: float,
                 n_reports: int) -> dict[str, str]:
    """Assign each unit (key -> hash) to a split by threshold, then fix empty train / val.

    An empty train takes the val (else test) unit with the highest hash; an empty val (site of
    >= 3 reports, ``val_fraction`` > 0) takes the lowest-hash train unit if train keeps one,
    else the highest-hash test unit.
    """
    assign = {
        key: "test" if h < test_fraction else "val" if h < test_fraction + val_fraction
        else "train"
        for key, h in units.items()
    }
    if units and not _members(assign, units, "train"):
        donor = _members(assign, units, "val") or _members(assign, units, "test")
        assign[donor[-1]] = "train"
    if val_fraction > 0 and n_reports >= 3 and not _members(assign, units, "val"):
        train = _members(assign, units, "train")
        test = _members(assign, units, "test")
        if len(train) > 1:
            assign[train[0]] = "val"
        elif test:
            assign[test[-1]] = "val"
    return assign


def _split_site(site_id: str, reports: list[Report], *, external: bool, val_fraction: float,
                test_fraction: float, seed: int) -> SiteSplit:
    """Split one site's reports (all to ``test`` when external)."""
    if external:
        return SiteSplit(site_id, [], [], _hash_order(reports, seed), True)
    units = {_group_key(r): _unit_hash(seed, _group_key(r)) for r in reports}
    assign = _split_units(units, val_fraction, test_fraction, len(reports))
    parts: dict[str, list[Report]] = {name: [] for name in SPLITS}
    for report in reports:
        parts[assign[_group_key(report)]].append(report)
    return SiteSplit(site_id, *(_hash_order(parts[name], seed) for name in SPLITS), False)


def _cap_site(split: SiteSplit, max_reports: int) -> SiteSplit:
    """Cap train at ``max_reports`` and shrink val / test by the same ratio (>= 1 if non-empty)."""
    if max_reports <= 0 or len(split.train) <= max_reports:
        return split
    ratio = max_reports / len(split.train)

    def shrink(part: list[Report]) -> list[Report]:
        return part[: max(1, round(len(part) * ratio))] if part else []

    return dataclasses.replace(split, train=split.train[:max_reports], val=shrink(split.val),
                               test=shrink(split.test))


def partition_reports(reports: list[Report], *, method: str = "natural", num_sites: int = 0,
                      external_sites: int = 0, val_fraction: float = 0.1,
                      test_fraction: float = 0.1, seed: int = 42,
                      max_reports_per_site: int = 0) -> list[SiteSplit]:
    """Partition pooled reports into sites and per-site train / val / test splits.

    Parameters
    ----------
    reports : list[Report]
        Pooled reports with unique ``report_id``.
    method : str
        ``"natural"``: one site per ``report.site_id``; ``"iid"``: a seeded shuffle dealt into
        ``num_sites`` equal shares, re-labelled ``sim_01`` .. (``Report.site_id`` replaced).
    num_sites : int
        ``natural``: keep the ``num_sites`` largest sites (0 keeps all); ``iid``: required.
    external_sites : int
        Number of whole sites, chosen from the seed, held out as test-only external sites.
    val_fraction, test_fraction : float
        Shares of each non-external site that go to val and test (by hash of the report id, or
        of the patient id when set, so one patient stays in one split). Train gets at least one
        report; val gets at least one when the site has >= 3 reports, ``val_fraction`` > 0 and
        the site has a unit to spare.
    seed : int
        Seed of the hashes, the iid shuffle and the external-site choice.
    max_reports_per_site : int
        If > 0, cap train at this many reports (first by hash order) and shrink val / test in
        proportion, keeping at least one report in each non-empty split.

    Returns
    -------
    list[SiteSplit]
        Sites sorted by id; reports inside a split in hash order.

    Raises
    ------
    ConfigError
        For an unknown method, out-of-range fractions or counts, ``num_sites`` above the
        number of sites present (natural) or ``external_sites`` leaving no training site.
    DataError
        For an empty input or duplicated report ids.
    """
    _check_args(reports, method, num_sites, external_sites, val_fraction, test_fraction,
                max_reports_per_site)
    sites = _natural_sites(reports, num_sites) if method == "natural" \
        else _iid_sites(reports, num_sites, seed)
    external = _pick_external(list(sites), external_sites, seed)
    splits = [
        _split_site(site_id, site_reports, external=site_id in external,
                    val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        for site_id, site_reports in sites.items()
    ]
    return [_cap_site(s, max_reports_per_site) if not s.external else s for s in splits]


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def _canonical(obj: Any) -> str:
    """Canonical JSON text: sorted keys, fixed separators, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def manifest_rows(splits: list[SiteSplit]) -> list[dict[str, str]]:
    """One row ``{report_id, site_id, split}`` per report; split is train/val/test/external.

    Parameters
    ----------
    splits : list[SiteSplit]
        The partition.

    Returns
    -------
    list[dict[str, str]]
        Rows in site order, then split order, then in-split order.
    """
    rows: list[dict[str, str]] = []
    for split in splits:
        for name in SPLITS:
            label = "external" if split.external else name
            rows.extend({"report_id": r.report_id, "site_id": split.site_id, "split": label}
                        for r in getattr(split, name))
    return rows


def manifest_hash(splits: list[SiteSplit]) -> str:
    """First 16 hex digits of sha256 over the canonical JSON of :func:`manifest_rows`."""
    return hashlib.sha256(_canonical(manifest_rows(splits)).encode("ascii")).hexdigest()[:16]


def write_manifest(splits: list[SiteSplit], path: str | Path, *, seed: int,
                   extra: dict[str, Any] | None = None) -> str:
    """Write the partition as a byte-for-byte deterministic JSON manifest.

    Parameters
    ----------
    splits : list[SiteSplit]
        The partition.
    path : str or Path
        Output file; parent folders are created.
    seed : int
        The partition seed, recorded in the manifest.
    extra : dict, optional
        JSON-serialisable metadata recorded under ``"extra"`` (``{}`` when omitted).

    Returns
    -------
    str
        The manifest hash (:func:`manifest_hash`), also recorded under ``"hash"``.
    """
    digest = manifest_hash(splits)
    payload = {"seed": seed, "hash": digest, "extra": extra or {}, "rows": manifest_rows(splits)}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_canonical(payload) + "\n", encoding="utf-8")
    return digest


# --------------------------------------------------------------------------------------------
# Site folders and summary
# --------------------------------------------------------------------------------------------


def write_site_folders(splits: list[SiteSplit], out_dir: str | Path) -> list[Path]:
    """Write ``out_dir/<site_id>/{train,val,test}.jsonl`` for every site.

    Parameters
    ----------
    splits : list[SiteSplit]
        The partition (external sites get empty train/val files).
    out_dir : str or Path
        Root folder; created if missing.

    Returns
    -------
    list[Path]
        The site folders, in site order.
    """
    folders: list[Path] = []
    for split in splits:
        folder = Path(out_dir) / split.site_id
        folder.mkdir(parents=True, exist_ok=True)
        for name in SPLITS:
            write_jsonl(getattr(split, name), folder / f"{name}.jsonl")
        folders.append(folder)
    return folders


def _mean_words(texts: list[str]) -> float:
    """Mean whitespace word count (0.0 for no texts), rounded to 2 decimals."""
    return round(sum(len(t.split()) for t in texts) / len(texts), 2) if texts else 0.0


def summarize(splits: list[SiteSplit]) -> list[dict[str, Any]]:
    """One row per site: sizes, modality counts and mean findings / impression lengths.

    Parameters
    ----------
    splits : list[SiteSplit]
        The partition.

    Returns
    -------
    list[dict]
        Keys ``site_id, external, n_train, n_val, n_test``, then ``n_<MODALITY>`` for every
        modality present anywhere (same columns in every row, in ``MODALITIES`` order, unknown
        codes last), then ``mean_findings_words, mean_impression_words``.
    """
    everything = [r for s in splits for r in (*s.train, *s.val, *s.test)]
    present = {r.modality for r in everything}
    modalities = [m for m in MODALITIES if m in present] + sorted(present - set(MODALITIES))
    rows: list[dict[str, Any]] = []
    for split in splits:
        site_reports = [*split.train, *split.val, *split.test]
        counts = Counter(r.modality for r in site_reports)
        row: dict[str, Any] = {"site_id": split.site_id, "external": split.external,
                               "n_train": len(split.train), "n_val": len(split.val),
                               "n_test": len(split.test)}
        row.update({f"n_{m}": counts.get(m, 0) for m in modalities})
        row["mean_findings_words"] = _mean_words([r.findings for r in site_reports])
        row["mean_impression_words"] = _mean_words([r.impression for r in site_reports])
        rows.append(row)
    return rows
