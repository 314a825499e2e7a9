"""The two cheap baselines with hand-computed expected answers."""

from __future__ import annotations

import dataclasses

import pytest

from fedmira.common.baselines import (
    most_frequent_impression,
    normalize_impression,
    predict_most_frequent,
    retrieve_impressions,
    retrieve_indices,
    training_pool,
)
from fedmira.common.reports import Report


def _report(i: int, findings: str, impression: str = "x") -> Report:
    return Report(f"r{i}", "s", "DR", "chest", "XR CHEST", findings, impression)


def test_normalize_impression() -> None:
    assert normalize_impression("  No acute   disease. ") == "no acute disease"
    assert normalize_impression("Normal chest x-XXXX.;") == "normal chest x-xxxx"
    assert normalize_impression("1. Cardiomegaly. 2. Effusion.") == "1. cardiomegaly. 2. effusion"


def test_most_frequent_counts_normalized_text_and_returns_the_usual_spelling() -> None:
    # Raw counts: "Normal chest." 3 beats each spelling of "no acute disease" (2 + 2); normalised,
    # "no acute disease" has 4 and wins; its spellings tie 2-2, and "N" sorts before "n".
    texts = ["Normal chest."] * 3 + ["No acute disease."] * 2 + ["no acute disease"] * 2 + ["", "  "]
    assert most_frequent_impression(texts) == "No acute disease."
    assert most_frequent_impression(list(reversed(texts))) == "No acute disease."  # order-free
    assert most_frequent_impression(["b.", "a."]) == "a."  # a tie goes to the alphabetically first
    with pytest.raises(ValueError):
        most_frequent_impression(["", " "])


def test_predict_most_frequent_gives_every_query_the_same_answer() -> None:
    train = [_report(i, "f", imp) for i, imp in enumerate(["A.", "B.", "B."])]
    assert predict_most_frequent(train, [_report(9, "q")] * 3) == ["B.", "B.", "B."]


def test_retrieval_picks_the_most_similar_findings() -> None:
    train = ["The heart is normal in size.", "The lungs are clear.",
             "Small left pleural effusion.", "The lungs are clear."]
    queries = ["Left pleural effusion, small.", "Clear lungs bilaterally.", "Heart size normal.",
               "The heart is normal in size.", "zzz qqq"]
    # "lungs are clear" appears at 1 and 3 (identical): the tie goes to the lower index; a query
    # without a shared term scores 0 everywhere and gets index 0.
    assert retrieve_indices(train, queries) == [2, 1, 0, 0, 0]
    assert retrieve_indices(train, []) == []
    with pytest.raises(ValueError):
        retrieve_indices([], ["x"])


def test_retrieval_returns_the_neighbours_impression() -> None:
    train = [_report(0, "No effusion. Heart normal.", "Normal."),
             _report(1, "Large right pneumothorax.", "Right pneumothorax.")]
    assert retrieve_impressions(train, [_report(5, "Right pneumothorax, large.")]) == ["Right pneumothorax."]


def test_training_pool_is_train_splits_of_internal_sites() -> None:
    @dataclasses.dataclass
    class Split:
        external: bool
        train: list[Report]

    a, b, c = _report(1, "a"), _report(2, "b"), _report(3, "c")
    assert training_pool([Split(False, [a, b]), Split(True, [c])]) == [a, b]


def test_site_retrieval_stays_within_the_site_and_falls_back_for_unknown_sites() -> None:
    from fedmira.common.baselines import retrieve_site_impressions

    def rep(rid: str, site: str, findings: str, impression: str) -> Report:
        return Report(rid, site, "DR", "chest", "x", findings, impression)

    train = [rep("a", "s1", "Right pleural effusion.", "S1 effusion."),
             rep("b", "s2", "Right pleural effusion large.", "S2 effusion."),
             rep("c", "s2", "Clear lungs.", "S2 normal.")]
    queries = [rep("q1", "s1", "Clear lungs.", ""), rep("q2", "s2", "Right pleural effusion.", ""),
               rep("q3", "s9", "Clear lungs.", "")]
    # s1 has one prior report, so q1 gets it even though s2 holds a closer one; s9 has none and
    # falls back to retrieval over the whole pool.
    assert retrieve_site_impressions(train, queries) == ["S1 effusion.", "S2 effusion.", "S2 normal."]


def test_consensus_retrieval_takes_what_the_site_neighbours_agree_on() -> None:
    from fedmira.common.baselines import retrieve_consensus_impressions, retrieve_site_impressions

    def rep(rid: str, findings: str, impression: str, site: str = "s") -> Report:
        return Report(rid, site, "DR", "chest", "XR CHEST", findings, impression)

    train = [rep("a", "Heart size normal. Lungs clear. No effusion.", "Normal chest."),
             rep("b", "Heart size normal. Lungs clear.", "No acute disease."),
             rep("c", "Heart size normal. Lungs are clear.", "No acute disease."),
             rep("d", "Heart size is normal. The lungs clear.", "No acute disease."),
             rep("e", "Heart normal. Lungs clear bilaterally.", "No acute disease."),
             rep("x", "Heart size normal. Lungs clear. No effusion.", "OTHER SITE", site="t")]
    query = [rep("q", "Heart size normal. Lungs clear. No effusion.", "?"),
             rep("z", "Heart size normal.", "?", site="new")]
    # "a" is the nearest of site s, but its 4 other reports agree on "No acute disease."; the
    # report of site t is never a candidate; a site with no archive falls back to pooled retrieval
    assert retrieve_site_impressions(train, query)[0] == "Normal chest."
    assert retrieve_consensus_impressions(train, query) == ["No acute disease.",
                                                           retrieve_impressions(train, query[1:])[0]]
