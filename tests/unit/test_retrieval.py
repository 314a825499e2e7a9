"""Retrieval of prior cases at a site, and retrieval-augmented prompts (tiny tokenizer)."""

from __future__ import annotations

import dataclasses

import pytest

from fedmira.common.config import DataConfig
from fedmira.common.engine import encode_reports
from fedmira.common.model import LoadedModel
from fedmira.common.prompts import IGNORE_INDEX, prompt_ids, render_prompt
from fedmira.common.reports import Report
from fedmira.common.retrieval import Neighbor, SiteIndex, index_sizes, neighbors_for, site_neighbors


def _r(rid: str, findings: str, impression: str, site: str = "s1", patient: str | None = None) -> Report:
    return Report(rid, site, "DR", "chest", "Chest 2 views", findings, impression, patient_id=patient)


PRIOR = [
    _r("a", "Heart size normal. Lungs clear.", "No acute disease.", patient="p1"),
    _r("b", "Heart size normal. Lungs clear. No effusion.", "Normal chest.", patient="p1"),
    _r("c", "Large right pleural effusion.", "Right effusion.", patient="p2"),
    _r("d", "Cardiomegaly with pulmonary edema.", "Congestive heart failure.", patient="p3"),
    _r("e", "Left lower lobe opacity, pneumonia.", "Left pneumonia.", patient="p4"),
]


def test_nearest_prior_case_comes_first_with_its_score() -> None:
    index = SiteIndex(PRIOR)
    query = _r("q", "Large right pleural effusion seen.", "?")
    (found,) = index.search([query], 2, leave_one_out=False)
    assert [n.impression for n in found][0] == "Right effusion."
    assert found[0].score > found[1].score > 0


def test_training_never_retrieves_itself_nor_its_patient() -> None:
    index = SiteIndex(PRIOR)
    found = index.search(PRIOR, 4, leave_one_out=True)
    for query, near in zip(PRIOR, found):
        mates = {r.findings for r in PRIOR if r.patient_id == query.patient_id}
        assert not {n.findings for n in near} & mates
    # "a" and "b" share patient p1: "a"'s best match would be "b", which is banned
    assert found[0][0].findings != PRIOR[1].findings
    assert len(found[0]) == 3  # 5 reports minus itself and its patient's other report


def test_scoring_time_excludes_only_the_report_itself() -> None:
    index = SiteIndex(PRIOR)
    near = index.search([PRIOR[0]], 2, leave_one_out=False)[0]
    assert PRIOR[0].findings not in {n.findings for n in near}
    assert near[0].findings == PRIOR[1].findings  # same patient's prior study is allowed


def test_retrieval_stays_within_the_site() -> None:
    other = [_r("x1", "Large right pleural effusion.", "OTHER SITE", site="s2")]
    queries = [_r("q1", "Large right pleural effusion.", "?", site="s1"),
               _r("q2", "Large right pleural effusion.", "?", site="s2"),
               _r("q3", "Large right pleural effusion.", "?", site="s3")]
    found = site_neighbors(queries, [*PRIOR, *other], 3, "tfidf", leave_one_out=False)
    assert "OTHER SITE" not in {n.impression for n in found[0]}
    assert [n.impression for n in found[1]] == ["OTHER SITE"]
    assert found[2] == ()  # a site with no prior reports gets none
    assert index_sizes(queries, [*PRIOR, *other]) == {"s1": 5, "s2": 1, "s3": 0}


def test_ties_go_to_the_earlier_report_deterministically() -> None:
    twins = [_r(f"t{i}", "Lungs clear.", f"imp {i}") for i in range(4)]
    query = _r("q", "Lungs clear.", "?")
    first = SiteIndex(twins).search([query], 2, leave_one_out=False)
    again = SiteIndex(list(twins)).search([query], 2, leave_one_out=False)
    assert [n.impression for n in first[0]] == ["imp 0", "imp 1"] == [n.impression for n in again[0]]


def test_no_retrieval_without_k_or_index() -> None:
    assert neighbors_for(PRIOR, None, 2, leave_one_out=True) == [()] * len(PRIOR)
    assert SiteIndex([]).search(PRIOR[:2], 2, leave_one_out=False) == [[], []]
    with pytest.raises(ValueError, match="retriever"):
        SiteIndex(PRIOR, "bm25")


def test_large_archive_search_matches_a_full_sort() -> None:
    import numpy as np

    from fedmira.common.retrieval import _ranked

    rng = np.random.default_rng(0)
    row = rng.integers(0, 5, size=300).astype(np.float32)  # many ties
    full = np.argsort(-row, kind="stable")[:7]
    assert list(_ranked(row, 7)[:7]) == list(full)


# ----------------------------------------------------------------------------- prompts
def test_rag_prompt_holds_neighbours_and_never_the_target(tiny: LoadedModel) -> None:
    data = DataConfig(template="site_aware_rag", neighbors=2, max_length=320, max_target_tokens=32)
    near = neighbors_for(PRIOR, SiteIndex(PRIOR), 2, leave_one_out=True)
    examples = encode_reports(PRIOR, tiny.tokenizer, data, near)
    for report, ex, n in zip(PRIOR, examples, near):
        prompt = tiny.tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE_INDEX])
        assert "Similar prior reports from this hospital" in prompt
        assert all(x.impression in prompt for x in n)
        assert report.findings in prompt
    # report "c" (alone under its patient) must not see its own impression in its prompt
    prompt_c = render_prompt(PRIOR[2], tiny.tokenizer, "site_aware_rag", neighbors=near[2])
    assert "Right effusion." not in prompt_c


def test_rag_prompt_fits_by_cutting_neighbours_then_dropping_them(tiny: LoadedModel) -> None:
    long = "word " * 200
    near = [Neighbor(long, long, 1.0), Neighbor(long, long, 0.5), Neighbor(long, long, 0.1)]
    report = _r("q", "Small left effusion. " * 5, "?")
    tok = tiny.tokenizer
    full = prompt_ids(report, tok, "site_aware_rag", 4096, neighbors=near, neighbor_tokens=16)
    alone = prompt_ids(report, tok, "site_aware_rag", 4096, neighbors=near[:1], neighbor_tokens=16)
    limit = len(alone) + 4  # room for one shortened neighbour, not for three
    tight = prompt_ids(report, tok, "site_aware_rag", limit, neighbors=near, neighbor_tokens=16)
    assert len(tight) <= limit < len(full)
    text = tok.decode(tight)
    assert "Small left effusion." in text  # the report's own findings are kept
    assert text.count("Impression:") < 3  # at least one neighbour was dropped


def test_plain_templates_ignore_neighbours(tiny: LoadedModel) -> None:
    near = [Neighbor("Lungs clear.", "UNSEEN", 1.0)]
    ids = prompt_ids(PRIOR[0], tiny.tokenizer, "site_aware", 256, neighbors=near)
    assert "UNSEEN" not in tiny.tokenizer.decode(ids)


def test_rag_prompts_are_deterministic(tiny: LoadedModel) -> None:
    data = DataConfig(template="site_aware_rag", neighbors=3, max_length=256, max_target_tokens=32)
    a = encode_reports(PRIOR, tiny.tokenizer, data,
                       neighbors_for(PRIOR, SiteIndex(PRIOR), 3, leave_one_out=True))
    b = encode_reports(PRIOR, tiny.tokenizer, data,
                       neighbors_for(PRIOR, SiteIndex(list(PRIOR)), 3, leave_one_out=True))
    assert [e.input_ids for e in a] == [e.input_ids for e in b]


def test_short_preamble_saves_tokens(tiny: LoadedModel) -> None:
    full = prompt_ids(PRIOR[0], tiny.tokenizer, "site_aware", 256)
    short = prompt_ids(PRIOR[0], tiny.tokenizer, "site_aware", 256, preamble="short")
    assert len(short) < len(full)


def test_data_config_checks_retrieval_fields() -> None:
    from fedmira.common.errors import ConfigError

    with pytest.raises(ConfigError, match="data.retriever"):
        DataConfig(retriever="bm25")
    with pytest.raises(ConfigError, match="data.neighbors"):
        DataConfig(neighbors=-1)
    assert dataclasses.replace(DataConfig(), template="site_aware_rag").neighbors == 2
    with pytest.raises(ConfigError, match="data.neighbor_order"):
        DataConfig(neighbor_order="random")
    with pytest.raises(ConfigError, match="data.neighbor_pool"):
        DataConfig(neighbor_pool=-1)


def _n(impression: str, score: float) -> Neighbor:
    return Neighbor("findings", impression, score)


def test_consensus_puts_the_impression_its_neighbours_agree_with_first() -> None:
    from fedmira.common.retrieval import consensus_order

    cases = [_n("Right pleural effusion.", 0.9), _n("No acute disease.", 0.8),
             _n("No acute disease.", 0.7), _n("No acute cardiopulmonary disease.", 0.5)]
    ranked = consensus_order(cases)
    # agreement: "No acute disease." 0.8 + 0.7 + 0.5 x ROUGE-L 0.857 = 1.93 (both copies; the more
    # similar copy first), "No acute cardiopulmonary disease." 0.5 + 1.5 x 0.857 = 1.79,
    # the effusion 0.9 (it agrees with nobody) last
    assert ranked == [cases[1], cases[2], cases[3], cases[0]]
    assert consensus_order([cases[0]]) == [cases[0]]
    assert consensus_order([]) == []


def test_consensus_keeps_k_of_the_pool_and_leave_one_out() -> None:
    prior = [
        *PRIOR[:2],  # "a" No acute disease., "b" Normal chest. (same patient)
        _r("c", "Heart size normal. Lungs are clear.", "No acute disease.", patient="p2"),
        _r("d", "Heart size is normal. The lungs clear.", "No acute disease.", patient="p3"),
        _r("e", "Heart normal. Lungs clear bilaterally.", "No acute disease.", patient="p4"),
    ]
    index = SiteIndex(prior)
    query = _r("q", "Heart size normal. Lungs clear. No effusion.", "?")
    (by_sim,) = neighbors_for([query], index, 1, leave_one_out=False)
    (by_cons,) = neighbors_for([query], index, 1, leave_one_out=False, order="consensus", pool=5)
    # "b" is the nearest (1.0), but the 4 others (similarities 0.26-0.63, 1.56 in all) agree
    assert by_sim[0].impression == "Normal chest."
    assert by_cons[0].impression == "No acute disease."
    # the pool only widens the search: training still never sees itself nor its patient
    found = neighbors_for(prior, index, 2, leave_one_out=True, order="consensus", pool=8)
    for q, near in zip(prior, found):
        mates = {r.findings for r in prior if r.patient_id == q.patient_id}
        assert len(near) == 2 and not {n.findings for n in near} & mates
    with pytest.raises(ValueError, match="order"):
        neighbors_for([query], index, 1, leave_one_out=False, order="best")


def test_consensus_order_changes_the_prompt_cache_key_similarity_keeps_it() -> None:
    from fedmira.common.compare import _rag_key
    from fedmira.common.compose import compose_config

    base = compose_config(["data.template=site_aware_rag"])
    cons = compose_config(["data.template=site_aware_rag", "data.neighbor_order=consensus"])
    assert "neighbor_order" not in _rag_key(base, "site_aware_rag")  # older cache entries stay valid
    assert _rag_key(cons, "site_aware_rag")["neighbor_order"] == "consensus"
    assert _rag_key(cons, "site_aware") == _rag_key(base, "site_aware")
