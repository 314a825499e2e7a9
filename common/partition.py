"""Splitting pooled reports into simulated hospitals and their train / val / test splits.

Plain functions, no Flower imports (flwr-datasets partitioners are imported lazily).
``natural`` keeps the real sites (``report.site_id``), ``iid`` deals a seeded shuffle into equal
simulated sites (``sim_01`` ..), ``dirichlet`` skews the label mix per site (Dirichlet over a
label), ``quantity`` skews the site sizes (long tail) and ``template`` makes IU pseudo-sites
from the reporting template (normalised exam description, ``tpl_01`` ..). Inside a site each
report (or, when ``patient_id`` is set, each patient) goes to train / val / test by a hash of
``(seed, key)``, so adding reports elsewhere never moves existing ones and no patient straddles
two splits. Whole sites can be held out as ``external`` (test only). The resulting assignment is
written as a byte-for-byte deterministic JSON manifest whose hash identifies the partition.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence, TextIO

from fedmira.common.errors import ConfigError, DataError, FedmiraError
from fedmira.common.reports import MODALITIES, Report, load_reports, write_jsonl
from fedmira.common.synthetic import make_synthetic_corpus

if TYPE_CHECKING:  # the config schema imports nothing from here; annotations only
    from fedmira.common.config import ExperimentConfig

METHODS: tuple[str, ...] = ("natural", "iid", "dirichlet", "quantity", "template")
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Report attributes ``dirichlet`` can skew; ``normal`` is normal vs abnormal from the labels.
LABEL_KEYS: tuple[str, ...] = ("modality", "body_part", "normal")
#: Methods that deal the pooled reports into ``num_sites`` new sites ``sim_01`` ..
SIMULATED_METHODS: tuple[str, ...] = ("iid", "dirichlet", "quantity")
#: The ``template`` site that collects every template too small to be a site of its own.
TEMPLATE_OTHER = "template_other"


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
    """Hash to a float in [0, 1) from sha256 of ``(seed, key)``, stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}\x1f{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _group_key(report: Report) -> str:
    """Return the unit kept together in one split: the patient when known, else the report."""
    return f"patient:{report.patient_id}" if report.patient_id else f"report:{report.report_id}"


def _hash_order(reports: Iterable[Report], seed: int) -> list[Report]:
    """Sort reports by their own hash (ties by id): the deterministic in-split order."""
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
    if method in SIMULATED_METHODS and not 1 <= num_sites <= len(reports):
        raise ConfigError(
            f"method={method!r} needs 1 <= num_sites <= number of reports ({len(reports)}), "
            f"got num_sites={num_sites}."
        )
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0
            and val_fraction + test_fraction < 1.0):
        raise ConfigError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in "
            "[0, 1) and sum to less than 1 so that train keeps a share."
        )


def _check_skew_args(alpha: float, label_key: str, min_site_reports: int) -> None:
    """Raise a clear error for bad ``dirichlet`` / ``quantity`` / ``template`` parameters."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"alpha must be a finite number > 0 (e.g. 0.1 skewed, 100 near iid), "
                          f"got {alpha!r}.")
    if label_key not in LABEL_KEYS:
        raise ConfigError(f"Unknown label_key {label_key!r}: use one of {list(LABEL_KEYS)}.")
    if isinstance(min_site_reports, bool) or not isinstance(min_site_reports, int) \
            or min_site_reports < 1:
        raise ConfigError(f"min_site_reports must be an integer >= 1, got {min_site_reports!r}.")


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
    pool = _seeded_pool(reports, seed)
    base, extra = divmod(len(pool), num_sites)
    groups: list[list[Report]] = []
    start = 0
    for i in range(num_sites):
        end = start + base + (1 if i < extra else 0)
        groups.append(pool[start:end])
        start = end
    return _relabel_groups(groups, "sim")


def _seeded_pool(reports: list[Report], seed: int) -> list[Report]:
    """Sort reports by id, then shuffle them by ``seed``.

    The shuffle matters: flwr-datasets partitioners cut contiguous runs of their input, and in
    id order those runs would be the original hospitals (ids often start with the site).
    """
    pool = sorted(reports, key=lambda r: r.report_id)
    random.Random(seed).shuffle(pool)
    return pool


def _relabel_groups(groups: list[list[Report]], prefix: str) -> dict[str, list[Report]]:
    """Name groups ``<prefix>_01`` .. in the given order and relabel their reports' site_id."""
    width = max(2, len(str(len(groups))))
    sites: dict[str, list[Report]] = {}
    for i, group in enumerate(groups):
        site_id = f"{prefix}_{i + 1:0{width}d}"
        sites[site_id] = [dataclasses.replace(r, site_id=site_id) for r in group]
    return sites


def _size_floor(n_reports: int, num_sites: int, min_site_reports: int) -> int:
    """Smallest simulated site: ``min_site_reports``, lowered so that every site can reach it.

    A floor keeps sites usable (a site of 1 report has no val / test); it is lowered rather
    than raised as an error so that small debug corpora still partition.
    """
    return max(1, min(min_site_reports, n_reports // num_sites))


def is_normal(report: Report) -> bool:
    """Tell whether a report is labelled only ``normal`` (IU Problems "normal", synthetic corpus).

    Parameters
    ----------
    report : Report
        Any report; unlabelled reports count as abnormal (nothing says they are normal).

    Returns
    -------
    bool
        Whether the labels are exactly ``("normal",)``, ignoring case and spaces.
    """
    return tuple(label.strip().lower() for label in report.labels) == ("normal",)


def label_of(report: Report, label_key: str) -> str:
    """Return the value ``dirichlet`` skews: modality, body part or ``normal`` / ``abnormal``."""
    if label_key == "normal":
        return "normal" if is_normal(report) else "abnormal"
    return getattr(report, label_key) or "(none)"


def _top_up(groups: list[list[int]], floor: int) -> list[list[int]]:
    """Give every group at least ``floor`` items, taken from the end of the largest group.

    Always possible when ``floor * len(groups) <= total``: the largest group then holds more
    than ``floor`` whenever some group holds less.
    """
    groups = [list(g) for g in groups]
    for small in groups:
        while len(small) < floor:
            donor = max(groups, key=len)
            small.append(donor.pop())
    return groups


def _flwr_datasets(method: str) -> tuple[Any, Any]:
    """``(datasets.Dataset, flwr_datasets.partitioner)``, imported on first use.

    Lazy: they take seconds to import and only dirichlet / quantity need them.
    """
    try:
        from datasets import Dataset
        from flwr_datasets import partitioner
    except ImportError as err:
        raise ConfigError(f"method={method!r} needs flwr-datasets ({err.name} is missing): "
                          "pip install 'flwr-datasets>=0.6,<0.7'.") from err
    return Dataset, partitioner


def _dirichlet_indices(labels: list[str], num_sites: int, alpha: float, seed: int,
                       floor: int) -> list[list[int]]:
    """Partition indices into sites with flwr-datasets' ``DirichletPartitioner`` over ``labels``.

    ``self_balancing=True`` stops a site from receiving more labels once it holds more than the
    average, so this method mostly skews the label mix and ``quantity`` skews the sizes. Its
    ``min_partition_size`` re-draws until every site holds that many, but gives up with a
    ValueError after 10 re-draws, which is the common case with small alpha, many sites and
    only two labels (``normal``). So: flwr's own re-draws with the floor first (an honest
    rejection sample), else one draw with no minimum whose small sites are topped up from the
    largest ones (:func:`_top_up`). Both are seeded, so the result is deterministic.
    """
    Dataset, partitioners = _flwr_datasets("dirichlet")
    data = Dataset.from_dict({"idx": list(range(len(labels))), "label": labels})
    for min_size in (floor, 0):
        partitioner = partitioners.DirichletPartitioner(
            num_partitions=num_sites, partition_by="label", alpha=float(alpha),
            min_partition_size=min_size, self_balancing=True, shuffle=False, seed=seed,
        )
        partitioner.dataset = data
        try:
            with warnings.catch_warnings():  # one warning per re-draw; the fallback covers it
                warnings.simplefilter("ignore")
                groups = [list(partitioner.load_partition(i)["idx"]) for i in range(num_sites)]
        except ValueError:
            continue
        return _top_up(groups, floor)
    raise AssertionError("unreachable: min_partition_size=0 always succeeds")


def _dirichlet_sites(reports: list[Report], num_sites: int, *, alpha: float, label_key: str,
                     seed: int, floor: int) -> dict[str, list[Report]]:
    """Label-skewed simulated sites ``sim_01`` .. (see :func:`_dirichlet_indices`)."""
    pool = _seeded_pool(reports, seed)
    labels = [label_of(r, label_key) for r in pool]
    groups = _dirichlet_indices(labels, num_sites, alpha, seed, floor)
    return _relabel_groups([[pool[i] for i in sorted(g)] for g in groups], "sim")


def quantity_sizes(n_reports: int, num_sites: int, *, alpha: float, seed: int,
                   floor: int = 1) -> list[int]:
    """Long-tailed site sizes: shares ~ Dirichlet(alpha) on top of a floor, largest first.

    This is NIID-Bench's quantity skew (Li et al. 2021). flwr-datasets' size partitioners
    (Exponential, Linear, Square) fix sizes as a function of the site number, which for 42
    sites is either far too steep (exp: e^41 between the largest and smallest) or not
    long-tailed (linear), and not seeded; so the sizes are drawn here and the assignment is
    left to ``SizePartitioner``.

    Parameters
    ----------
    n_reports : int
        Total to share out; the sizes sum to it exactly.
    num_sites : int
        Number of sites, ``1 <= num_sites`` and ``floor * num_sites <= n_reports``.
    alpha : float
        Dirichlet concentration: 0.1 very skewed, 100 near equal.
    seed : int
        Seed of the draw.
    floor : int
        Smallest size (>= 1).

    Returns
    -------
    list[int]
        ``num_sites`` sizes >= ``floor``, in descending order, summing to ``n_reports``.
    """
    import numpy as np

    spare = n_reports - floor * num_sites
    shares = np.random.default_rng(seed).dirichlet(np.full(num_sites, float(alpha)))
    raw = shares * spare
    sizes = np.floor(raw).astype(int)
    # Largest remainders get the reports that flooring lost (ties by position: deterministic).
    order = np.argsort(-(raw - sizes), kind="stable")
    sizes[order[: spare - int(sizes.sum())]] += 1
    return sorted((floor + int(s) for s in sizes), reverse=True)


def _quantity_sites(reports: list[Report], num_sites: int, *, alpha: float, seed: int,
                    floor: int) -> dict[str, list[Report]]:
    """Size-skewed simulated sites ``sim_01`` (largest) .. over a seeded shuffle."""
    Dataset, partitioners = _flwr_datasets("quantity")
    pool = _seeded_pool(reports, seed)
    sizes = quantity_sizes(len(pool), num_sites, alpha=alpha, seed=seed, floor=floor)
    partitioner = partitioners.SizePartitioner(sizes)
    partitioner.dataset = Dataset.from_dict({"idx": list(range(len(pool)))})
    groups = [partitioner.partition_id_to_indices[i] for i in range(num_sites)]
    return _relabel_groups([[pool[i] for i in g] for g in groups], "sim")


# De-identification placeholders: IU writes XXXX, sometimes run together (XXXXXXXX).
_DEID = re.compile(r"x{4,}")
_NON_LETTERS = re.compile(r"[^a-z]+")


def normalize_exam(exam: str) -> str:
    """Normalise an exam description to its reporting template.

    Lower-case, drop de-identification tokens (``xxxx``), turn punctuation and digits into
    spaces and collapse whitespace: "CHEST 2V FRONTAL/LATERAL XXXX" -> "chest v frontal lateral".

    Parameters
    ----------
    exam : str
        ``Report.exam`` (the IU ``image`` column).

    Returns
    -------
    str
        The normalised template; ``""`` when nothing is left.
    """
    return _NON_LETTERS.sub(" ", _DEID.sub(" ", exam.lower())).strip()


def _template_sites(reports: list[Report], num_sites: int,
                    min_site_reports: int) -> dict[str, list[Report]]:
    """One site per large template (``tpl_01`` = largest), the rest merged into ``other``.

    Small templates are merged into :data:`TEMPLATE_OTHER` rather than dropped so that the
    partition still covers every report (as every other method does); reports with no
    template left after normalisation go there too.
    """
    groups: dict[str, list[Report]] = defaultdict(list)
    for report in sorted(reports, key=lambda r: r.report_id):
        groups[normalize_exam(report.exam)].append(report)
    ranked = sorted((t for t in groups if t), key=lambda t: (-len(groups[t]), t))
    if num_sites > len(ranked):
        raise ConfigError(f"num_sites={num_sites} but the reports have only {len(ranked)} "
                          "exam templates: lower num_sites (0 keeps templates with at least "
                          "min_site_reports reports).")
    kept = ranked[:num_sites] if num_sites else \
        [t for t in ranked if len(groups[t]) >= min_site_reports]
    if not kept:
        raise ConfigError(f"No exam template has min_site_reports={min_site_reports} reports "
                          f"(largest: {len(groups[ranked[0]]) if ranked else 0}): lower it.")
    sites = _relabel_groups([groups[t] for t in kept], "tpl")
    rest = [r for t in sorted(set(groups) - set(kept)) for r in groups[t]]
    if rest:
        sites[TEMPLATE_OTHER] = [dataclasses.replace(r, site_id=TEMPLATE_OTHER) for r in rest]
    return {s: sites[s] for s in sorted(sites)}


def site_templates(splits: list[SiteSplit]) -> dict[str, str]:
    """Return the normalised template of every ``template`` site (for the manifest and summaries).

    Parameters
    ----------
    splits : list[SiteSplit]
        A ``template`` partition.

    Returns
    -------
    dict[str, str]
        Site id -> template text; :data:`TEMPLATE_OTHER` -> "(N small templates merged)".
        Exam descriptions only, never report text.
    """
    out: dict[str, str] = {}
    for split in splits:
        templates = sorted({normalize_exam(r.exam) for r in (*split.train, *split.val,
                                                            *split.test)})
        if split.site_id == TEMPLATE_OTHER or len(templates) != 1:
            out[split.site_id] = f"({len(templates)} other templates merged)"
        else:
            out[split.site_id] = templates[0]
    return out


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
    """Return the unit keys assigned to split ``name``, by ascending hash."""
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
    train, val, test = (_hash_order(parts[name], seed) for name in SPLITS)
    return SiteSplit(site_id, train, val, test, False)


def _cap_site(split: SiteSplit, max_reports: int) -> SiteSplit:
    """Cap train at ``max_reports`` and shrink val / test by the same ratio (>= 1 if non-empty)."""
    if max_reports <= 0 or len(split.train) <= max_reports:
        return split
    ratio = max_reports / len(split.train)

    def shrink(part: list[Report]) -> list[Report]:
        return part[: max(1, round(len(part) * ratio))] if part else []

    return dataclasses.replace(split, train=split.train[:max_reports], val=shrink(split.val),
                               test=shrink(split.test))


def _group_sites(reports: list[Report], method: str, num_sites: int, *, seed: int, alpha: float,
                 label_key: str, min_site_reports: int) -> dict[str, list[Report]]:
    """Group reports into sites by ``method`` (before splitting)."""
    if method == "natural":
        return _natural_sites(reports, num_sites)
    if method == "iid":
        return _iid_sites(reports, num_sites, seed)
    if method == "template":
        return _template_sites(reports, num_sites, min_site_reports)
    floor = _size_floor(len(reports), num_sites, min_site_reports)
    if method == "dirichlet":
        return _dirichlet_sites(reports, num_sites, alpha=alpha, label_key=label_key, seed=seed,
                                floor=floor)
    return _quantity_sites(reports, num_sites, alpha=alpha, seed=seed, floor=floor)


def partition_reports(reports: list[Report], *, method: str = "natural", num_sites: int = 0,
                      external_sites: int = 0, val_fraction: float = 0.1,
                      test_fraction: float = 0.1, seed: int = 42,
                      max_reports_per_site: int = 0, alpha: float = 0.5,
                      label_key: str = "modality", min_site_reports: int = 10) -> list[SiteSplit]:
    """Partition pooled reports into sites and per-site train / val / test splits.

    Parameters
    ----------
    reports : list[Report]
        Pooled reports with unique ``report_id``.
    method : str
        ``"natural"``: one site per ``report.site_id``; ``"iid"``: a seeded shuffle dealt into
        ``num_sites`` equal shares; ``"dirichlet"``: label skew, each value of ``label_key``
        shared out over ``num_sites`` sites by Dirichlet(``alpha``) proportions (flwr-datasets
        ``DirichletPartitioner``, self-balancing); ``"quantity"``: size skew, ``num_sites``
        sites with Dirichlet(``alpha``) shares of the reports, largest first; ``"template"``:
        IU pseudo-sites, one per reporting template (:func:`normalize_exam` of ``exam``),
        largest first as ``tpl_01`` .., smaller templates merged into ``template_other``.
        iid / dirichlet / quantity name their sites ``sim_01`` ..; every method but natural
        replaces ``Report.site_id`` with the new site id.
    num_sites : int
        ``natural``: keep the ``num_sites`` largest sites (0 keeps all); ``iid``,
        ``dirichlet``, ``quantity``: required (>= 1); ``template``: the ``num_sites`` largest
        templates become sites (0: every template with >= ``min_site_reports`` reports), plus
        ``template_other`` when any report is left.
    external_sites : int
        Number of whole sites, chosen from the seed, held out as test-only external sites.
    val_fraction, test_fraction : float
        Shares of each non-external site that go to val and test (by hash of the report id, or
        of the patient id when set, so one patient stays in one split). Train gets at least one
        report; val gets at least one when the site has >= 3 reports, ``val_fraction`` > 0 and
        the site has a unit to spare.
    seed : int
        Seed of the hashes, the shuffles, the Dirichlet draws and the external-site choice.
    max_reports_per_site : int
        If > 0, cap train at this many reports (first by hash order) and shrink val / test in
        proportion, keeping at least one report in each non-empty split.
    alpha : float
        Dirichlet concentration of ``dirichlet`` and ``quantity`` (> 0): 0.1 very skewed, 100
        close to iid.
    label_key : str
        What ``dirichlet`` skews: ``"modality"``, ``"body_part"`` or ``"normal"`` (labels
        exactly ``("normal",)`` vs anything else).
    min_site_reports : int
        ``template``: smallest template kept as its own site when ``num_sites`` is 0;
        ``dirichlet`` / ``quantity``: smallest site size (lowered to ``len(reports) //
        num_sites`` when the corpus is too small to give every site that many).

    Returns
    -------
    list[SiteSplit]
        Sites sorted by id; reports inside a split in hash order.

    Raises
    ------
    ConfigError
        For an unknown method or label key, out-of-range fractions, counts or alpha,
        ``num_sites`` above the number of sites (natural) or templates (template) present, or
        ``external_sites`` leaving no training site.
    DataError
        For an empty input or duplicated report ids.
    """
    _check_args(reports, method, num_sites, external_sites, val_fraction, test_fraction,
                max_reports_per_site)
    _check_skew_args(alpha, label_key, min_site_reports)
    sites = _group_sites(reports, method, num_sites, seed=seed, alpha=alpha, label_key=label_key,
                         min_site_reports=min_site_reports)
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


def _p90_words(texts: list[str]) -> int:
    """Nearest-rank 90th percentile of whitespace word counts (0 for no texts)."""
    if not texts:
        return 0
    counts = sorted(len(t.split()) for t in texts)
    return counts[max(0, math.ceil(0.9 * len(counts)) - 1)]


def _all_reports(split: SiteSplit) -> list[Report]:
    """Every report of a site, train then val then test."""
    return [*split.train, *split.val, *split.test]


def _modality_columns(splits: list[SiteSplit]) -> list[str]:
    """Modalities present anywhere: ``MODALITIES`` order, unknown codes last."""
    present = {r.modality for s in splits for r in _all_reports(s)}
    return [m for m in MODALITIES if m in present] + sorted(present - set(MODALITIES))


def summarize(splits: list[SiteSplit]) -> list[dict[str, Any]]:
    """One row per site: sizes, modality and label mix, findings / impression lengths.

    Parameters
    ----------
    splits : list[SiteSplit]
        The partition.

    Returns
    -------
    list[dict]
        Keys ``site_id, external, n_train, n_val, n_test``, then ``n_<MODALITY>`` for every
        modality present anywhere (same columns in every row, in ``MODALITIES`` order, unknown
        codes last), then ``n_normal, n_abnormal`` (:func:`is_normal`), then
        ``mean_findings_words, p90_findings_words, mean_impression_words,
        p90_impression_words`` (whitespace words; p90 by nearest rank).
    """
    modalities = _modality_columns(splits)
    rows: list[dict[str, Any]] = []
    for split in splits:
        site_reports = _all_reports(split)
        counts = Counter(r.modality for r in site_reports)
        normal = sum(is_normal(r) for r in site_reports)
        row: dict[str, Any] = {"site_id": split.site_id, "external": split.external,
                               "n_train": len(split.train), "n_val": len(split.val),
                               "n_test": len(split.test)}
        row.update({f"n_{m}": counts.get(m, 0) for m in modalities})
        row.update({"n_normal": normal, "n_abnormal": len(site_reports) - normal})
        for name in ("findings", "impression"):
            texts = [getattr(r, name) for r in site_reports]
            row[f"mean_{name}_words"] = _mean_words(texts)
            row[f"p90_{name}_words"] = _p90_words(texts)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def _mix_counts(splits: list[SiteSplit], mix: str) -> tuple[str, dict[str, list[int]]]:
    """Count the second panel's categories: ``(title, {category: count per site})``.

    ``auto`` shows modalities when there are several, else normal vs abnormal (the IU corpus
    is all chest radiographs, so its modality panel would be one colour).
    """
    if mix == "auto":
        mix = "modality" if len(_modality_columns(splits)) > 1 else "normal"
    if mix not in LABEL_KEYS:
        raise ConfigError(f"Unknown mix {mix!r}: use auto or one of {list(LABEL_KEYS)}.")
    per_site = [Counter(label_of(r, mix) for r in _all_reports(s)) for s in splits]
    categories = sorted(set().union(*per_site))
    return mix, {c: [counts.get(c, 0) for counts in per_site] for c in categories}


def _stack(ax: Any, x: Sequence[int], series: dict[str, list[float]], colors: Sequence[Any]) -> None:
    """Draw ``series`` as stacked bars at ``x`` (legend outside on the right)."""
    bottom = [0.0] * len(x)
    for (name, values), color in zip(series.items(), colors):
        ax.bar(x, values, bottom=bottom, label=name, color=color, width=0.8)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)


def plot_sites(splits: list[SiteSplit], path: str | Path, *, mix: str = "auto") -> Path:
    """Stacked bars per site: split sizes, and the modality or label mix as shares.

    Parameters
    ----------
    splits : list[SiteSplit]
        The partition (external sites' reports are drawn as ``external``).
    path : str or Path
        Output image (PNG by extension); parent folders are created.
    mix : str
        Second panel: ``auto`` (modality when several are present, else ``normal``),
        ``modality``, ``body_part`` or ``normal``.

    Returns
    -------
    Path
        The written image.
    """
    # matplotlib writes a font cache under MPLCONFIGDIR; a read-only HOME (containers, CI)
    # would make it warn and rebuild on every call.
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="fedmira-mpl-"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(splits)))
    sizes: dict[str, list[float]] = {
        "train": [len(s.train) for s in splits], "val": [len(s.val) for s in splits],
        "test": [0 if s.external else len(s.test) for s in splits],
        "external": [len(s.test) if s.external else 0 for s in splits],
    }
    title, counts = _mix_counts(splits, mix)
    totals = [max(1, len(_all_reports(s))) for s in splits]
    shares = {c: [v / t for v, t in zip(values, totals)] for c, values in counts.items()}
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True,
                                      figsize=(max(6.0, 0.22 * len(splits) + 2.5), 6.0))
    _stack(top, x, sizes, ["#4c72b0", "#dd8452", "#55a868", "#8c8c8c"])
    top.set_ylabel("reports")
    # Explicit limit: zero-height stacked bars pin autoscaling at the tallest bar's top.
    top.set_ylim(0, max(totals) * 1.05)
    top.set_title(f"{len(splits)} sites, {sum(totals)} reports")
    palette = plt.get_cmap("tab20")  # qualitative: its 20 colours, in order
    _stack(bottom, x, shares, [palette(i) for i in range(palette.N)])
    bottom.set_ylabel(f"{title} mix (share)")
    bottom.set_ylim(0, 1)
    bottom.set_xticks(x, [s.site_id for s in splits], rotation=90, fontsize=7)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------ from a config
#: A single-site file under ``partition=natural`` is dealt into this many IID sites.
DEFAULT_SINGLE_SITE_SPLIT = 8


def load_pooled_reports(cfg: ExperimentConfig, out: TextIO = sys.stdout) -> list[Report]:
    """Load the reports to split: the file at ``data.path`` or the embedded synthetic corpus."""
    d = cfg.data
    if not d.path:
        return make_synthetic_corpus(d.synthetic_sites, d.synthetic_reports, d.synthetic_seed)
    result = load_reports(d.path, fmt=d.format, policy=d.policy, max_chars=d.max_chars)
    if result.problems:
        codes: dict[str, int] = {}
        for p in result.problems:
            codes[p.code] = codes.get(p.code, 0) + 1
        summary = ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))
        print(f"data: {result.rows_skipped} of {result.rows_total} rows skipped ({summary}); "
              f"`fedmira data check {d.path}` lists them.", file=out)
    if not result.reports:
        raise FedmiraError(f"No usable reports in {d.path}; run `fedmira data check {d.path}`.")
    return result.reports


def split_sites(cfg: ExperimentConfig, reports: list[Report]) -> list[SiteSplit]:
    """Partition per config; a single-site file under ``natural`` falls back to an IID split."""
    p = cfg.partition
    method, num_sites = p.method, p.num_sites
    if method == "natural" and len({r.site_id for r in reports}) < 2:
        method, num_sites = "iid", num_sites or DEFAULT_SINGLE_SITE_SPLIT
    return partition_reports(
        reports, method=method, num_sites=num_sites, external_sites=p.external_sites,
        val_fraction=p.val_fraction, test_fraction=p.test_fraction, seed=p.seed,
        max_reports_per_site=p.max_reports_per_site, alpha=p.alpha, label_key=p.label_key,
        min_site_reports=p.min_site_reports,
    )


def write_sites(run_dir: Path, cfg: ExperimentConfig, splits: list[SiteSplit]) -> dict[str, Any]:
    """One folder per hospital + manifest + summary; returns the site index the apps read."""
    sites_dir = run_dir / "sites"
    write_site_folders(splits, sites_dir)
    manifest_hash = write_manifest(splits, sites_dir / "manifest.json", seed=cfg.partition.seed,
                                   extra={"lock_hash": cfg.lock_hash()})
    rows = summarize(splits)
    if rows:
        with open(sites_dir / "summary.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    index = {
        "train_sites": [s.site_id for s in splits if not s.external and s.train],
        "external_sites": [s.site_id for s in splits if s.external],
        "manifest_hash": manifest_hash,
    }
    (sites_dir / "sites.json").write_text(json.dumps(index, indent=2))
    return index
