"""The design of a reader study: which cases, which arms, which reader reads what, in which order.

Pure functions of their inputs and a seed (no files, no database): ``fedmira reader-study
create`` calls :func:`design_study` and stores its result (``common.reader_store``).

Two tasks, as in the multicenter study fedmira follows:

* **pairwise**: the findings and two impressions with the sides hidden; the reader says which
  is better (or equal), rates each for clinical acceptability (1-5) and flags errors. An *arm*
  is a pair of systems, e.g. ``fedavg`` vs ``reference`` (the radiologist's own impression,
  never labelled as such) or ``fedavg`` vs ``central``. Each (case, arm) item is read by
  ``readers_per_item`` different readers (for agreement), A/B sides drawn per task.
* **draft** (crossover): the reader writes the impression from scratch or by editing the draft
  of ``draft_system``; each draft case is written by ``readers_per_item`` readers in each
  condition, and every reader gets as many of one condition as of the other. Draft cases are
  disjoint from pairwise cases: a reader who has seen the model's impression of a case cannot
  draft it "from scratch".

Assignment is balanced (the reader with the fewest tasks so far goes first; among equals, one
who has not seen the case yet, then a seeded random order).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from fedmira.common.errors import FedmiraError

#: The pseudo-system of the radiologist's own impression.
REFERENCE = "reference"
PAIRWISE, DRAFT = "pairwise", "draft"
SCRATCH, ASSISTED = "scratch", "assisted"
#: Error flags a reader can set on an impression.
ERROR_FLAGS = ("missed_finding", "invented_finding", "wrong_location", "wrong_severity")


class DesignError(FedmiraError, ValueError):
    """A study that cannot be designed as asked; the message says what to change."""


@dataclass(frozen=True)
class Case:
    """One report in the study: its findings, the reference impression and each system's."""

    case_id: str
    report_id: str
    site_id: str
    modality: str
    findings: str
    reference: str
    candidates: Mapping[str, str]


@dataclass(frozen=True)
class Reader:
    """A reader: a display name and a centre (the token is made when the study is stored)."""

    name: str
    centre: str = ""


@dataclass(frozen=True)
class Task:
    """One task of one reader; ``left``/``right`` are the systems shown as A and B."""

    task_id: str
    reader: int
    kind: str
    case_id: str
    position: int
    left: str = ""
    right: str = ""
    condition: str = ""
    draft_system: str = ""


@dataclass(frozen=True)
class StudySettings:
    """What ``fedmira reader-study create`` asks for (validated)."""

    arms: tuple[tuple[str, str], ...]
    pairwise_cases: int = 40
    draft_cases: int = 0
    draft_system: str = ""
    readers_per_item: int = 2
    strata: tuple[str, ...] = ("site_id", "modality")
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.arms:
            raise DesignError("no arms: give at least one --arm SYSTEM:reference (or SYSTEM:OTHER)")
        for a, b in self.arms:
            if a == b:
                raise DesignError(f"arm {a}:{b} compares a system with itself; name two different systems")
        if len(set(self.arms)) != len(self.arms):
            raise DesignError("the same arm is listed twice in --arm")
        if self.readers_per_item < 1:
            raise DesignError(f"--readers-per-item must be >= 1, got {self.readers_per_item}")
        if self.pairwise_cases < 0 or self.draft_cases < 0:
            raise DesignError("--n-cases and --draft-cases must be >= 0")
        if self.pairwise_cases == 0 and self.draft_cases == 0:
            raise DesignError("nothing to read: --n-cases and --draft-cases are both 0")
        if self.draft_cases and not self.draft_system:
            raise DesignError("--draft-cases needs --draft-system (the system whose impression is the draft)")
        bad = [s for s in self.strata if s not in ("site_id", "modality")]
        if bad:
            raise DesignError(f"unknown stratum {bad[0]!r}; use site_id and/or modality")

    @property
    def systems(self) -> tuple[str, ...]:
        """Every system the study shows (the reference excluded), in first-mention order."""
        names = [s for arm in self.arms for s in arm if s != REFERENCE]
        if self.draft_system:
            names.append(self.draft_system)
        return tuple(dict.fromkeys(names))


@dataclass
class StudyDesign:
    """The designed study: the sampled cases and every reader's tasks, in reading order."""

    settings: StudySettings
    cases: list[Case]
    readers: list[Reader]
    tasks: list[Task] = field(default_factory=list)


def stratified_sample(cases: Sequence[Case], n: int, strata: Sequence[str], rng: random.Random) -> list[Case]:
    """Draw ``n`` cases, each stratum in proportion to its size (largest remainder), seeded.

    Every stratum gets at least one case while ``n`` allows, so a small site is never left out.
    """
    if n > len(cases):
        raise DesignError(f"{n} cases asked for, but the input has only {len(cases)}; lower --n-cases")
    groups: dict[tuple[str, ...], list[Case]] = defaultdict(list)
    for c in cases:
        groups[tuple(getattr(c, s) for s in strata)].append(c)
    keys = sorted(groups)
    quota = {k: 0 for k in keys}
    if n >= len(keys):  # one each first, then the rest in proportion
        quota = {k: 1 for k in keys}
    left = n - sum(quota.values())
    room = {k: len(groups[k]) - quota[k] for k in keys}
    total_room = sum(room.values())
    if left and total_room:
        exact = {k: left * room[k] / total_room for k in keys}
        for k in keys:
            quota[k] += int(exact[k])
        by_remainder = sorted(keys, key=lambda k: (-(exact[k] - int(exact[k])), k))
        for k in by_remainder[: n - sum(quota.values())]:
            quota[k] += 1
    elif n < len(keys):  # fewer cases than strata: a seeded choice of strata
        for k in rng.sample(keys, n):
            quota[k] = 1
    out: list[Case] = []
    for k in keys:
        out += rng.sample(sorted(groups[k], key=lambda c: c.case_id), quota[k])
    return sorted(out, key=lambda c: c.case_id)


def design_study(cases: Sequence[Case], readers: Sequence[Reader], settings: StudySettings) -> StudyDesign:
    """Sample the cases and assign every task (see the module docstring).

    Raises
    ------
    DesignError
        A system of an arm missing from the cases, too few readers for ``readers_per_item``, or
        too few cases.
    """
    _check_inputs(cases, readers, settings)
    rng = random.Random(settings.seed)
    k = settings.readers_per_item
    need = 2 * k if settings.draft_cases else k
    if len(readers) < need:
        what = f"{k} per item" + (" in each drafting condition" if settings.draft_cases else "")
        raise DesignError(f"{len(readers)} readers for {what}: add readers or lower --readers-per-item")
    chosen = stratified_sample(cases, settings.pairwise_cases + settings.draft_cases, settings.strata, rng)
    rng.shuffle(chosen)
    drafts = sorted(chosen[: settings.draft_cases], key=lambda c: c.case_id)
    pairwise = sorted(chosen[settings.draft_cases :], key=lambda c: c.case_id)
    per_reader: dict[int, list[Task]] = {i: [] for i in range(len(readers))}
    seen: dict[int, set[str]] = {i: set() for i in range(len(readers))}
    for case in pairwise:
        for arm in settings.arms:
            for r in _pick(per_reader, seen, case.case_id, k, rng):
                left, right = arm if rng.random() < 0.5 else arm[::-1]
                per_reader[r].append(Task("", r, PAIRWISE, case.case_id, 0, left=left, right=right))
                seen[r].add(case.case_id)
    _assign_drafts(drafts, settings, per_reader, seen, rng)
    tasks = _order(per_reader, rng)
    return StudyDesign(settings, sorted(pairwise + drafts, key=lambda c: c.case_id), list(readers), tasks)


def _check_inputs(cases: Sequence[Case], readers: Sequence[Reader], settings: StudySettings) -> None:
    if not readers:
        raise DesignError("no readers: give --reader NAME[@CENTRE] once per reader (or --readers FILE)")
    if len({r.name for r in readers}) != len(readers):
        raise DesignError("two readers share a name; give each reader a distinct name")
    for system in settings.systems:
        missing = sum(1 for c in cases if system not in c.candidates)
        if missing:
            have = sorted({s for c in cases for s in c.candidates})
            raise DesignError(
                f"system {system!r} has no impression for {missing} of {len(cases)} cases; "
                f"the input's systems are: {', '.join(have) or 'none'}"
            )


def _pick(
    per_reader: dict[int, list[Task]],
    seen: dict[int, set[str]],
    case_id: str,
    k: int,
    rng: random.Random,
    exclude: set[int] | None = None,
) -> list[int]:
    """Return the ``k`` readers with the fewest tasks, preferring those who have not seen the case."""
    order = {r: rng.random() for r in per_reader}
    pool = [r for r in per_reader if not exclude or r not in exclude]
    pool.sort(key=lambda r: (len(per_reader[r]), case_id in seen[r], order[r]))
    return pool[:k]


def _assign_drafts(
    drafts: Sequence[Case],
    settings: StudySettings,
    per_reader: dict[int, list[Task]],
    seen: dict[int, set[str]],
    rng: random.Random,
) -> None:
    """Each draft case: k readers from scratch and k others with the draft, conditions balanced."""
    count = {r: {SCRATCH: 0, ASSISTED: 0} for r in per_reader}
    for case in drafts:
        taken: set[int] = set()
        for condition in rng.sample([SCRATCH, ASSISTED], 2):
            # fewest drafts of this condition first, so each reader's two conditions stay even
            order = {r: rng.random() for r in per_reader}
            pool = sorted(
                (r for r in per_reader if r not in taken),
                key=lambda r: (
                    count[r][condition] - count[r][_other(condition)],
                    sum(count[r].values()),
                    order[r],
                ),
            )
            for r in pool[: settings.readers_per_item]:
                per_reader[r].append(
                    Task(
                        "",
                        r,
                        DRAFT,
                        case.case_id,
                        0,
                        condition=condition,
                        draft_system=settings.draft_system if condition == ASSISTED else "",
                    )
                )
                count[r][condition] += 1
                taken.add(r)
                seen[r].add(case.case_id)


def _other(condition: str) -> str:
    return ASSISTED if condition == SCRATCH else SCRATCH


def _order(per_reader: dict[int, list[Task]], rng: random.Random) -> list[Task]:
    """Each reader's pairwise tasks in a random order, then the drafting tasks; ids and positions."""
    out: list[Task] = []
    n = 0
    for r in sorted(per_reader):
        mine = per_reader[r]
        pairwise = [t for t in mine if t.kind == PAIRWISE]
        drafts = [t for t in mine if t.kind == DRAFT]
        rng.shuffle(pairwise)
        rng.shuffle(drafts)
        for pos, t in enumerate(pairwise + drafts):
            n += 1
            out.append(
                Task(f"t{n:05d}", r, t.kind, t.case_id, pos, t.left, t.right, t.condition, t.draft_system)
            )
    return out
