"""Reader study: design (sampling, balanced assignment), the store's refusals, and the statistics.

Synthetic cases only (3 sites x 2 modalities); the answers of the analysis tests follow fixed
rules, so every share, interval, time and agreement value below is known in advance.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fedmira.common import reader_store as store
from fedmira.common.reader_analysis import analyze, write_report
from fedmira.common.reader_design import (
    ASSISTED,
    DRAFT,
    PAIRWISE,
    REFERENCE,
    SCRATCH,
    Case,
    DesignError,
    Reader,
    StudySettings,
    design_study,
)
from fedmira.common.reader_store import StudyError

SITES, MODALITIES = ("site_a", "site_b", "site_c"), ("CT", "XR")
ARMS = (("fedavg", REFERENCE), ("central", REFERENCE))


def _cases(per_stratum: int = 10) -> list[Case]:
    out = []
    for s in SITES:
        for m in MODALITIES:
            for i in range(per_stratum):
                cid = f"{s}-{m}-{i:02d}"
                out.append(
                    Case(
                        cid,
                        f"r-{cid}",
                        s,
                        m,
                        f"Findings {i} of {m} at {s}.",
                        f"Reference {i}.",
                        {"fedavg": f"Fedavg impression {i}.", "central": f"Central impression {i}."},
                    )
                )
    return out


READERS = [Reader(f"reader{i}", f"centre{i % 2}") for i in range(4)]


def _settings(**kw: Any) -> StudySettings:
    base: dict[str, Any] = {
        "arms": ARMS,
        "pairwise_cases": 20,
        "draft_cases": 8,
        "draft_system": "fedavg",
        "readers_per_item": 2,
        "seed": 7,
    }
    return StudySettings(**{**base, **kw})


# ---------------------------------------------------------------------------------------- design
def test_the_design_is_seeded_stratified_and_balanced() -> None:
    design = design_study(_cases(), READERS, _settings())
    again = design_study(_cases(), READERS, _settings())
    assert design.tasks == again.tasks  # the same seed, the same study
    assert design.tasks != design_study(_cases(), READERS, _settings(seed=8)).tasks
    strata = Counter((c.site_id, c.modality) for c in design.cases)
    assert sorted(strata.values()) in ([4, 5, 5, 5, 5, 4], [4, 4, 5, 5, 5, 5])  # 28 over 6 strata
    pairwise = [t for t in design.tasks if t.kind == PAIRWISE]
    per_item = Counter((t.case_id, frozenset((t.left, t.right))) for t in pairwise)
    assert len(per_item) == 20 * 2 and set(per_item.values()) == {2}  # each item read twice
    for item in per_item:  # by two different readers
        assert len({t.reader for t in pairwise if (t.case_id, frozenset((t.left, t.right))) == item}) == 2
    loads = Counter(t.reader for t in pairwise)
    assert max(loads.values()) - min(loads.values()) <= 1
    assert {t.left for t in pairwise} >= {"fedavg", REFERENCE}  # the reference is shown as A and as B


def test_drafting_is_a_balanced_crossover_on_cases_no_reader_has_seen() -> None:
    design = design_study(_cases(), READERS, _settings())
    drafts = [t for t in design.tasks if t.kind == DRAFT]
    pair_cases = {t.case_id for t in design.tasks if t.kind == PAIRWISE}
    assert {t.case_id for t in drafts}.isdisjoint(pair_cases)
    for case in {t.case_id for t in drafts}:
        mine = [t for t in drafts if t.case_id == case]
        assert Counter(t.condition for t in mine) == {SCRATCH: 2, ASSISTED: 2}
        assert len({t.reader for t in mine}) == 4  # nobody drafts a case twice
    for r in range(len(READERS)):
        c = Counter(t.condition for t in drafts if t.reader == r)
        assert abs(c[SCRATCH] - c[ASSISTED]) <= 1
    assert all(t.draft_system == ("fedavg" if t.condition == ASSISTED else "") for t in drafts)
    for r in range(len(READERS)):  # pairwise first, then drafting, positions 0..n-1
        kinds = [t.kind for t in sorted(design.tasks, key=lambda t: t.position) if t.reader == r]
        assert kinds == sorted(kinds, key=lambda k: k == DRAFT)


@pytest.mark.parametrize(
    "kw, readers, match",
    [
        ({"readers_per_item": 3}, READERS, "4 readers for 3 per item in each drafting condition"),
        ({"arms": (("zero_shot", REFERENCE),)}, READERS, "system 'zero_shot' has no impression"),
        ({"pairwise_cases": 70}, READERS, "78 cases asked for, but the input has only 60"),
        ({}, [], "no readers"),
        ({}, [Reader("x"), Reader("x")] * 2, "share a name"),
    ],
)
def test_impossible_designs_say_what_to_change(kw: dict[str, Any], readers: list[Reader], match: str) -> None:
    with pytest.raises(DesignError, match=match):
        design_study(_cases(), readers, _settings(**kw))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"arms": ()}, "no arms"),
        ({"arms": (("a", "a"),)}, "itself"),
        ({"draft_system": ""}, "--draft-system"),
        ({"strata": ("hospital",)}, "unknown stratum"),
        ({"pairwise_cases": 0, "draft_cases": 0}, "nothing to read"),
    ],
)
def test_settings_are_validated(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(DesignError, match=match):
        _settings(**kw)


# ---------------------------------------------------------------------------------------- store
@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    design = design_study(_cases(), READERS, _settings())
    tokens = store.create_store(tmp_path / "study", design)
    return tmp_path / "study", tokens


def _n_answers(folder: Path) -> int:
    with sqlite3.connect(folder / store.DB_NAME) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0])


def _pairwise_answer(task_id: str, **kw: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "preference": "A",
        "accept_a": 4,
        "accept_b": 3,
        "flags_a": [],
        "flags_b": [],
        **kw,
    }


def test_tokens_are_stored_only_as_hashes_and_checked(study: tuple[Path, dict[str, str]]) -> None:
    folder, tokens = study
    raw = (folder / store.DB_NAME).read_bytes()
    assert all(t.encode() not in raw for t in tokens.values())
    conn = store.connect(folder)
    assert store.authenticate(conn, tokens["reader2"])["name"] == "reader2"
    for bad in (None, "", "x" * 32, tokens["reader2"][:-1]):
        with pytest.raises(StudyError, match="token") as err:
            store.authenticate(conn, bad)
        assert err.value.status == 401
    with pytest.raises(StudyError, match="exists"):  # a study is never overwritten
        store.create_store(folder, design_study(_cases(), READERS, _settings()))


def test_a_reader_resumes_where_they_left_off(study: tuple[Path, dict[str, str]]) -> None:
    folder, tokens = study
    conn = store.connect(folder)
    me = store.authenticate(conn, tokens["reader0"])["reader_id"]
    first = store.task_view(conn, me)
    assert first is not None and first["position"] == 1 and first["answered"] == 0
    assert set(first) >= {"findings", "a", "b"} and "fedavg" not in str(first) and REFERENCE not in str(first)
    store.submit_answer(conn, me, _pairwise_answer(first["task_id"]))
    again = store.connect(folder)  # a new connection (a restarted server) sees the answer at once
    nxt = store.task_view(again, me)
    assert nxt is not None and nxt["position"] == 2 and store.progress(again, me) == (1, first["total"])


@pytest.mark.parametrize(
    "change, status, match",
    [
        ({"preference": "C"}, 422, "field preference"),
        ({"accept_a": 6}, 422, "field accept_a"),
        ({"accept_b": True}, 422, "field accept_b"),
        ({"flags_a": ["made_up"]}, 422, "field flags_a"),
        ({"flags_b": ["missed_finding", "missed_finding"]}, 422, "field flags_b"),
        ({"extra": 1}, 422, "field extra"),
        ({"task_id": 5}, 422, "field task_id"),
        ({"task_id": "t99999"}, 404, "no such task"),
    ],
)
def test_malformed_or_foreign_answers_are_refused_and_nothing_is_written(
    study: tuple[Path, dict[str, str]], change: dict[str, Any], status: int, match: str
) -> None:
    folder, tokens = study
    conn = store.connect(folder)
    me = store.authenticate(conn, tokens["reader0"])["reader_id"]
    task = store.task_view(conn, me)
    assert task is not None
    with pytest.raises(StudyError, match=match) as err:
        store.submit_answer(conn, me, {**_pairwise_answer(task["task_id"]), **change})
    assert err.value.status == status and _n_answers(folder) == 0


def test_another_readers_task_and_a_replay_are_refused(study: tuple[Path, dict[str, str]]) -> None:
    folder, tokens = study
    conn = store.connect(folder)
    me = store.authenticate(conn, tokens["reader0"])["reader_id"]
    other = store.authenticate(conn, tokens["reader1"])["reader_id"]
    theirs = store.task_view(conn, other)
    assert theirs is not None
    for call in (
        lambda: store.submit_answer(conn, me, _pairwise_answer(theirs["task_id"])),
        lambda: store.task_view(conn, me, theirs["task_id"]),
    ):
        with pytest.raises(StudyError, match="no such task for this reader") as err:
            call()
        assert err.value.status == 404
    store.submit_answer(conn, other, _pairwise_answer(theirs["task_id"]))
    with pytest.raises(StudyError, match="already answered") as err:
        store.submit_answer(conn, other, _pairwise_answer(theirs["task_id"], preference="B"))
    assert err.value.status == 409 and _n_answers(folder) == 1


def test_draft_answers_are_validated(study: tuple[Path, dict[str, str]]) -> None:
    folder, tokens = study
    conn = store.connect(folder)
    me = store.authenticate(conn, tokens["reader0"])["reader_id"]
    draft = next(t for t in store.tasks_of(conn, me) if t["kind"] == DRAFT)
    for bad, match in (
        ({"text": " "}, "field text"),
        ({"text": "x" * 5001}, "field text"),
        ({"active_ms": -1}, "field active_ms"),
        ({"preference": "A"}, "field preference"),
    ):
        with pytest.raises(StudyError, match=match):
            store.submit_answer(
                conn, me, {"task_id": draft["task_id"], "text": "Normal.", "active_ms": 1000, **bad}
            )
    store.submit_answer(conn, me, {"task_id": draft["task_id"], "text": "Normal.", "active_ms": 1000})
    assert _n_answers(folder) == 1


def test_readers_answering_at_once_lose_no_answer(tmp_path: Path) -> None:
    readers = [Reader(f"r{i}") for i in range(24)]
    design = design_study(_cases(), readers, _settings(pairwise_cases=48, draft_cases=0, draft_system=""))
    tokens = store.create_store(tmp_path / "s", design)
    errors: list[BaseException] = []

    def read_all(name: str) -> None:
        try:
            conn = store.connect(tmp_path / "s")  # one connection per reader, as per request
            me = store.authenticate(conn, tokens[name])["reader_id"]
            while (task := store.task_view(conn, me)) is not None:
                store.submit_answer(conn, me, _pairwise_answer(task["task_id"]))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=read_all, args=(r.name,)) for r in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and _n_answers(tmp_path / "s") == len(design.tasks) == 48 * 2 * 2


# ---------------------------------------------------------------------------------------- analysis
def _answer_by_rule(conn: sqlite3.Connection, tokens: dict[str, str], index: dict[str, int]) -> None:
    """Fixed rules: every reader agrees, so shares, times and agreement are known exactly.

    Pairwise, by the case's index i among the 20 pairwise cases: fedavg is
    better than the reference for i % 4 == 0, equal for i % 4 == 1, worse otherwise; central
    is better for i % 5 == 0, worse otherwise. Ratings: fedavg 4, central 2, reference 5; a
    worse impression is flagged ``missed_finding``. Drafting: reader r takes 60 + r s from
    scratch and 45 s with the draft; with the draft every reader keeps it word for word, from
    scratch each writes "no acute disease reader<r>".
    """
    rating = {"fedavg": 4, "central": 2, REFERENCE: 5}
    for name, token in tokens.items():
        me = store.authenticate(conn, token)["reader_id"]
        r = int(name.removeprefix("reader"))
        for t in store.tasks_of(conn, me):
            if t["kind"] == DRAFT:
                view = store.task_view(conn, me, t["task_id"])
                assert view is not None
                text = view["draft"] if t["condition"] == ASSISTED else f"No acute disease reader{r}."
                ms = 45_000 if t["condition"] == ASSISTED else (60 + r) * 1000
                store.submit_answer(conn, me, {"task_id": t["task_id"], "text": text, "active_ms": ms})
                continue
            system = t["left_system"] if t["left_system"] != REFERENCE else t["right_system"]
            i = index[t["case_id"]]
            outcome = (
                ("better" if i % 4 == 0 else "equal" if i % 4 == 1 else "worse")
                if system == "fedavg"
                else ("better" if i % 5 == 0 else "worse")
            )
            wins_left = (outcome == "better") == (t["left_system"] == system)
            pref = "equal" if outcome == "equal" else ("A" if wins_left else "B")
            worse_flag = {"left": [], "right": []}
            if outcome != "equal":
                loser = "right" if wins_left else "left"
                worse_flag[loser] = ["missed_finding"] if t[f"{loser}_system"] != REFERENCE else []
            store.submit_answer(
                conn,
                me,
                {
                    "task_id": t["task_id"],
                    "preference": pref,
                    "accept_a": rating[t["left_system"]],
                    "accept_b": rating[t["right_system"]],
                    "flags_a": worse_flag["left"],
                    "flags_b": worse_flag["right"],
                },
            )


def test_analysis_recovers_the_known_shares_times_and_agreement(
    study: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    folder, tokens = study
    conn = store.connect(folder)
    pair_cases = sorted({t["case_id"] for t in conn.execute("SELECT * FROM tasks WHERE kind = 'pairwise'")})
    _answer_by_rule(conn, tokens, {c: i for i, c in enumerate(pair_cases)})  # i = 0..19
    data = store.load_all(conn)
    result = analyze(data, store.settings_of(conn))
    arms = result["pairwise"]["arms"]
    fed, cen = arms["fedavg vs reference"], arms["central vs reference"]
    # fedavg: 5 better, 5 equal, 10 worse cases, each read twice
    assert (fed["n"], fed["better"], fed["equal"], fed["worse"]) == (40, 10, 10, 20)
    assert fed["share"] == 0.5 and fed["ci"] == pytest.approx((0.35199, 0.64801), abs=1e-5)  # Wilson, by hand
    assert (cen["n"], cen["better"], cen["worse"], cen["share"]) == (40, 8, 32, 0.2)
    (test,) = result["pairwise"]["tests"]
    assert test["chi2"] == pytest.approx(6.6484, abs=1e-4)  # Yates-corrected 2x2 [[20, 20], [8, 32]]
    assert test["p_holm"] == pytest.approx(0.009924, abs=1e-5) and test["reject"]
    acc = result["pairwise"]["acceptability"]
    assert (acc["fedavg"]["mean"], acc["central"]["mean"], acc[REFERENCE]["mean"]) == (4.0, 2.0, 5.0)
    assert (
        acc["fedavg"]["flags"]["missed_finding"] == 0.5 and acc["central"]["flags"]["missed_finding"] == 0.8
    )
    assert acc[REFERENCE]["flags"]["missed_finding"] == 0.0
    assert result["pairwise"]["alpha_preference"] == pytest.approx(1.0)  # the readers always agree
    assert sum(s["fedavg vs reference"]["n"] for s in result["pairwise"]["by_site"].values()) == 40
    time = result["drafting"]["time"]
    assert time[ASSISTED] == 45.0 and time["saved_s"] == pytest.approx(16.5)  # 15 + mean(0, 1, 2, 3)
    assert time["readers_paired"] == 4 and time["saved_ci"][0] < 16.5 < time["saved_ci"][1]
    agree = result["drafting"]["agreement"]
    assert agree[ASSISTED] == pytest.approx(1.0) and agree[SCRATCH] == pytest.approx(0.75)  # 3 of 4 words
    assert agree["raised_by"] == pytest.approx(0.25) and agree["cases_paired"] == 8
    paths = write_report(tmp_path / "analysis", result, data, store.settings_of(conn))
    md = re.sub(r" +", " ", paths["report"].read_text())  # tables are padded
    assert "| fedavg vs reference | 40 | 10 | 10 | 20 | 0.500 | [0.352, 0.648] |" in md
    assert "Time saved per report with the draft: 16.5 s" in md
    for p in paths.values():  # no report text in any output
        body = p.read_bytes()
        assert (
            b"Findings " not in body
            and b"Reference " not in body
            and b"impression" not in body.lower()
            or p.suffix == ".png"
        )


def test_disagreeing_readers_lower_alpha(study: tuple[Path, dict[str, str]]) -> None:
    folder, tokens = study
    conn = store.connect(folder)
    for name, token in tokens.items():
        me = store.authenticate(conn, token)["reader_id"]
        for t in store.tasks_of(conn, me):
            if t["kind"] == PAIRWISE:  # reader0 and reader2 always pick A, the others always B
                pick = "A" if name in ("reader0", "reader2") else "B"
                store.submit_answer(conn, me, _pairwise_answer(t["task_id"], preference=pick))
    result = analyze(store.load_all(conn), store.settings_of(conn))
    assert result["pairwise"]["alpha_preference"] < 0.5
    assert result["drafting"]["n"] == 0 and result["answered"] < result["tasks"]
