"""Text similarity metrics as pure functions on strings.

ROUGE comes from Google's ``rouge-score`` package (the reference implementation used in
summarisation papers), with Porter stemming as in the study's evaluations.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence


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
