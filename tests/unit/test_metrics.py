"""Text metrics on hand-computed cases; the encoder metrics only in the slow test."""

from __future__ import annotations

import math

import pytest

from fedmira.common.metrics import (
    SAMPLE_METRICS,
    bleu4,
    corpus_bleu4,
    mean_rouge_l,
    rouge_l,
    rouge_scores,
    score_pairs,
    summarize_scores,
)


def test_rouge_hand_computed() -> None:
    ref, hyp = "the cat sat on the mat", "the cat lay on the mat"
    scores = rouge_scores(ref, hyp)
    assert scores["rougeL"] == pytest.approx(5 / 6)  # LCS 5 of 6 tokens each way
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)  # the cat, on the, the mat of 5 bigrams
    # precision 2/2, recall 2/3 -> F 0.8; the negation flip keeps a high ROUGE-L
    assert rouge_l("No pleural effusion.", "Pleural effusion.") == pytest.approx(0.8)


def test_mean_rouge_l() -> None:
    assert mean_rouge_l(["a b", "c d"], ["a b", "x y"]) == pytest.approx(0.5)
    assert math.isnan(mean_rouge_l([], []))


def test_bleu_scale_is_zero_to_one() -> None:
    assert bleu4("No acute disease.", "No acute disease.") == pytest.approx(1.0)
    assert bleu4("Clear lungs.", "Clear lungs.") == pytest.approx(1.0)  # shorter than 4 tokens
    assert bleu4("the cat sat", "dogs run fast") == 0.0
    assert bleu4("", "") == 1.0 and bleu4("a b", "") == 0.0


def test_bleu_brevity_penalty_hand_computed() -> None:
    # all n-gram precisions 1; hypothesis 6 tokens, reference 7: BP = exp(1 - 7/6)
    score = bleu4("the cat sat on the mat today", "the cat sat on the mat")
    assert score == pytest.approx(math.exp(1 - 7 / 6), abs=1e-6)


def test_corpus_bleu() -> None:
    refs = ["the cat sat on the mat", "no acute cardiopulmonary abnormality"]
    assert corpus_bleu4(refs, refs) == pytest.approx(1.0)
    assert 0.0 < corpus_bleu4(refs, ["the cat sat on a mat", "no acute abnormality"]) < 1.0
    with pytest.raises(ValueError):
        corpus_bleu4(refs, refs[:1])


def test_score_pairs_without_encoder() -> None:
    rows = score_pairs(["No pleural effusion.", "Cardiomegaly."], ["Pleural effusion.", "Cardiomegaly."],
                       use_encoder=False)
    assert set(SAMPLE_METRICS) <= set(rows[0])
    assert rows[0]["bertscore_f1"] is None and rows[0]["sim"] is None
    assert rows[0]["rougeL"] == pytest.approx(0.8) and rows[0]["clinical_agreement"] == 0.0
    assert rows[1]["rougeL"] == 1.0 and rows[1]["bleu4"] == pytest.approx(1.0)
    assert rows[1]["clinical_f1"] == 1.0


def test_summarize_scores_records_missing_and_pools_clinical_counts() -> None:
    rows = score_pairs(["Pleural effusion.", "Cardiomegaly.", "No acute disease."],
                       ["Pleural effusion.", "No acute disease.", "No acute disease."], use_encoder=False)
    summary = summarize_scores(rows, n_resamples=200, seed=1)
    assert summary["bertscore_f1"] == {"mean": None, "lo": None, "hi": None, "n": 0}
    assert summary["rougeL"]["n"] == 3
    assert summary["rougeL"]["lo"] <= summary["rougeL"]["mean"] <= summary["rougeL"]["hi"]
    # TP 2 (effusion, No Finding), FP 1 (No Finding), FN 1 (cardiomegaly) -> 4 / 6
    assert summary["clinical_micro_f1"]["mean"] == pytest.approx(4 / 6)
    assert summarize_scores(rows, n_resamples=200, seed=1) == summary


@pytest.mark.slow
def test_encoder_metrics_with_minilm() -> None:
    """The real all-MiniLM-L6-v2: identical texts ~1; a negation flip still scores high."""
    from fedmira.common.metrics import bertscore_f1, sentence_similarity

    refs = ["No pleural effusion.", "Small left pleural effusion.", "Cardiomegaly.", "x"]
    hyps = ["Pleural effusion.", "Small left pleural effusion.", "Fracture of the left humerus.", ""]
    bert = bertscore_f1(refs, hyps)
    sim = sentence_similarity(refs, hyps)
    assert bert[1] == pytest.approx(1.0, abs=1e-4) and sim[1] == pytest.approx(1.0, abs=1e-4)
    # Blind to negation: the flipped pair scores far above an unrelated pair ...
    assert bert[0] > 0.8 and sim[0] > 0.7
    assert bert[0] > bert[2] and sim[0] > sim[2]
    assert bert[3] == 0.0 and sim[3] == 0.0  # an empty side is 0, the encoder is not asked
    # ... while the clinical agreement catches it.
    rows = score_pairs(refs[:2], hyps[:2])
    assert rows[0]["bertscore_f1"] == pytest.approx(bert[0], abs=1e-5)
    assert rows[0]["clinical_agreement"] == 0.0 and rows[1]["clinical_agreement"] == 1.0
