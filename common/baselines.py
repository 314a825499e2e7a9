"""Two cheap baselines that keep every fine-tuned model honest: pure functions, no model.

* :func:`most_frequent_impression`: the training impression written most often (after
  normalising case, spacing and trailing punctuation), given to every report. On the IU reports
  it already scores ROUGE-L ~0.45, because most studies are normal.
* :func:`retrieve_impressions`: nearest-neighbour retrieval: each report gets the impression of
  the training report whose findings are most similar by TF-IDF cosine (over all sites pooled);
  :func:`retrieve_site_impressions` does the same within the report's own site. On the IU reports it
  scores ROUGE-L ~0.63, because the findings' phrasing identifies the reporting workflow and
  with it the impression's style. :func:`retrieve_consensus_impressions` takes, of the site's 8
  most similar reports, the impression the others agree with most (similarity-weighted ROUGE-L):
  ROUGE-L 0.668 on the IU test reports, above pooled retrieval (0.647) with one site's archive.

A fine-tuned model that does not beat retrieval is not worth deploying. The baselines see only
the training pool (:func:`training_pool`: the train splits of the internal sites), never the
evaluated reports.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

from fedmira.common.reports import Report

_SPACES = re.compile(r"\s+")
_TRAILING = re.compile(r"[\s.;:,!]+$")
#: Candidates the consensus baseline ranks (the default of ``data.neighbor_pool``).
CONSENSUS_POOL = 8


def normalize_impression(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation: "No acute disease. " == "no acute disease"."""
    return _TRAILING.sub("", _SPACES.sub(" ", text.strip().lower()))


def most_frequent_impression(impressions: Sequence[str]) -> str:
    """Find the most frequent impression by normalised text, in its most frequent spelling.

    Ties (between normalised texts, then between spellings) go to the alphabetically first, so
    the answer does not depend on the order of the reports.

    Raises
    ------
    ValueError
        When there is no non-empty impression.
    """
    texts = [t.strip() for t in impressions if t and t.strip()]
    if not texts:
        raise ValueError("no non-empty training impression to take the most frequent of")
    groups = Counter(normalize_impression(t) for t in texts)
    top = min(groups, key=lambda k: (-groups[k], k))
    spellings = Counter(t for t in texts if normalize_impression(t) == top)
    return min(spellings, key=lambda s: (-spellings[s], s))


def predict_most_frequent(train: Sequence[Report], queries: Sequence[Report]) -> list[str]:
    """Predict the training pool's most frequent impression, once per query report."""
    answer = most_frequent_impression([r.impression for r in train])
    return [answer] * len(queries)


def retrieve_indices(train_findings: Sequence[str], query_findings: Sequence[str]) -> list[int]:
    """Index of the most similar training findings for each query (TF-IDF cosine).

    The vectorizer (scikit-learn, unigrams and bigrams, sublinear term frequency) is fitted on
    the training findings only. Rows are L2-normalised, so the dot product is the cosine. Ties
    go to the lowest training index; a query sharing no term with any training text gets
    index 0 (every cosine is 0).

    Raises
    ------
    ValueError
        When there are no training findings.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not train_findings:
        raise ValueError("retrieval needs at least one training report")
    if not query_findings:
        return []
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
    try:
        train_m = vectorizer.fit_transform(list(train_findings))
    except ValueError:  # an empty vocabulary: no word anywhere in the training findings
        return [0] * len(query_findings)
    sims: Any = vectorizer.transform(list(query_findings)) @ train_m.T
    return [int(i) for i in sims.toarray().argmax(axis=1)]  # argmax: first of equal maxima


def retrieve_impressions(train: Sequence[Report], queries: Sequence[Report]) -> list[str]:
    """For each query, the impression of the training report with the most similar findings."""
    idx = retrieve_indices([r.findings for r in train], [r.findings for r in queries])
    return [train[i].impression for i in idx]


def retrieve_site_impressions(train: Sequence[Report], queries: Sequence[Report]) -> list[str]:
    """Retrieve within the query's own site: the most similar same-site training report's impression.

    That report is the first prior case a ``site_aware_rag`` prompt shows. A site with no
    training reports (an external one) falls back to retrieval over the whole pool.
    """
    return _site_first(train, queries, "similarity")


def retrieve_consensus_impressions(train: Sequence[Report], queries: Sequence[Report]) -> list[str]:
    """Within the query's own site, the impression its 8 most similar reports agree with most.

    The first prior case of a ``data.neighbor_order=consensus`` prompt
    (:func:`fedmira.common.retrieval.consensus_order`); the same fallback as
    :func:`retrieve_site_impressions`.
    """
    return _site_first(train, queries, "consensus")


def _site_first(train: Sequence[Report], queries: Sequence[Report], order: str) -> list[str]:
    from fedmira.common.retrieval import site_neighbors

    near = site_neighbors(queries, train, 1, "tfidf", leave_one_out=False, order=order, pool=CONSENSUS_POOL)
    missing = [i for i, n in enumerate(near) if not n]
    fallback = retrieve_impressions(train, [queries[i] for i in missing]) if missing else []
    out = [n[0].impression if n else "" for n in near]
    for i, text in zip(missing, fallback):
        out[i] = text
    return out


def training_pool(splits: Sequence[Any]) -> list[Report]:
    """Collect what the baselines may learn from: the train splits of internal (non-external) sites."""
    return [r for s in splits if not s.external for r in s.train]


#: Baseline name -> prediction function (training pool, query reports) -> impressions.
BASELINES = {"retrieval": retrieve_impressions, "retrieval_site": retrieve_site_impressions,
             "retrieval_consensus": retrieve_consensus_impressions, "most_frequent": predict_most_frequent}
