"""A rule-based labeler of radiology observations, negation- and uncertainty-aware.

Text-overlap metrics (ROUGE, BLEU) and embedding metrics (BERTScore, sentence similarity) score
"No pleural effusion." and "Pleural effusion." as close: the words are the same, the meaning is
opposite. This module labels each impression with a fixed set of observations, each one

* ``1``    positive ("Small left pleural effusion."),
* ``0``    negative ("No pleural effusion.", "Effusion has resolved."),
* ``-1``   uncertain ("Possible effusion.", "Effusion cannot be excluded."),
* ``None`` not mentioned,

and compares reference and generated labels (:func:`clinical_f1`, :func:`clinical_agreement`).

How a text is labeled (in the spirit of the CheXpert / NegBio labelers, much simpler):

1. Lower-case, split into sentences (``.``, ``!``, ``?``, ``;``, new lines, numbered lists).
2. Find *mentions*: regular expressions per observation (synonyms). Some observations also
   have *normal* patterns ("heart size is normal", "lungs are clear") that label them ``0``.
3. Find *cues*: negation ("no", "without", "negative for", "free of", "clear of", "resolved",
   "rather than", ...) and uncertainty ("possible", "may", "likely", "cannot exclude",
   "suggestive of", "versus", ...). Pre-cues act on what follows them, up to the end of the
   clause: a sentence end, ``;``, ``:``, "but", "however", "except", "which", "rather than",
   ... A comma continues a list ("No effusion, pneumothorax, or consolidation.") unless the
   next part starts a new statement (a size or severity word, a side, "there", "new", ...).
   Post-cues ("is not seen", "has resolved", "cannot be excluded", "is suspected") act on
   mentions before them in the same comma-delimited clause. Uncertainty cue phrases are found
   first and hide the negation words inside them ("cannot be excluded" is not a negation).
4. A mention takes the state of its nearest applicable cue (post-cue uncertainty first); with
   no cue it is positive. Within a report an observation is positive if any mention is, else
   uncertain if any mention is, else negative (the CheXpert aggregation rule).
5. ``No Finding`` is positive when no other observation (support devices excepted) is positive
   or uncertain, and ``None`` otherwise. So "No acute cardiopulmonary abnormality." labels
   ``No Finding = 1`` and everything else ``None``; so does a text that mentions nothing.

Observation sets are registered per body part (:func:`register_observation_set`): ``chest``
(the 14 CheXpert observations, the default for every body part without a set of its own) and
``head`` (hemorrhage, infarct, mass effect, midline shift, hydrocephalus, fracture).
Laterality and size words are ignored: "left pleural effusion" is Pleural Effusion.

Known limits: no syntax parsing, so long sentences with mixed statements can be mislabeled;
calcified granulomas are not counted as Lung Lesion (they are mostly incidental); no label
depends on comparisons with prior studies ("unchanged", "stable" are positive mentions).
Messages of this module never contain report text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
NO_FINDING = "No Finding"
DEFAULT_BODY_PART = "chest"

Label = int | None


@dataclass(frozen=True)
class Observation:
    """One observation of a set: its name, synonym patterns and 'normal' patterns.

    Attributes
    ----------
    name : str
        Label name, e.g. ``"Pleural Effusion"``.
    patterns : tuple of str
        Regular expressions (lower-case text) whose matches are mentions of the observation.
    normal_patterns : tuple of str
        Regular expressions whose matches state the observation is absent ("lungs are clear").
    is_finding : bool
        Whether a positive or uncertain label rules out ``No Finding`` (support devices: no).
    """

    name: str
    patterns: tuple[str, ...]
    normal_patterns: tuple[str, ...] = ()
    is_finding: bool = True


# ----------------------------------------------------------------------------- observation sets
_W = r"(?:[\w/-]+\s+){0,3}?"  # up to three words in between ("heart is mildly enlarged")

CHEST: tuple[Observation, ...] = (
    Observation("Enlarged Cardiomediastinum", (
        r"\b(?:widen\w*|enlarged|prominent)\s+(?:the\s+)?(?:cardio)?mediastin\w*",
        r"\b(?:cardio)?mediastin\w*\s+(?:silhouette\s+|contours?\s+|shadow\s+)?" + _W
        + r"(?:widen\w*|enlarged|enlargement|prominen\w*)",
        r"\benlarged\s+cardiomediastinum\b",
    ), (
        r"\b(?:cardio)?mediastin\w*\s+(?:silhouette|contours?)\s+(?:and\s+[\w\s]{0,40}?)?"
        r"(?:is|are|appears?)\s+"
        r"(?:\w+\s+)?(?:normal|within\s+normal\s+limits|unremarkable)",
        r"\bnormal\s+(?:cardio)?mediastin\w*",
    )),
    Observation("Cardiomegaly", (
        r"\bcardiomegaly\b",
        r"\b(?:heart|cardiac\s+(?:silhouette|shadow|size)|heart\s+size)\s+" + _W
        + r"(?:enlarged|enlargement|large|increased)\b",
        r"\b(?:enlarged|large)\s+(?:heart|cardiac\s+(?:silhouette|shadow))\b",
        r"\benlargement\s+of\s+the\s+(?:heart|cardiac\s+silhouette)\b",
    ), (
        r"\b(?:heart|cardiac)\s+size\s+(?:and\s+[\w\s]{0,40}?)?(?:is|are|appears?|remains?)?\s*"
        r"(?:\w+\s+)?(?:normal|within\s+normal\s+limits)",
        r"\bnormal\s+(?:heart|cardiac)(?:\s+size)?\b",
        r"\b(?:heart|cardiac\s+silhouette)\s+(?:is|appears?)\s+normal\b",
    )),
    Observation("Lung Opacity", (
        r"\bopaci\w*", r"\binfiltrat\w*", r"\bair[\s-]?space\s+(?:disease|process|opaci\w*)",
        r"\bground[\s-]glass\b", r"\bhaz(?:e|iness|y)\b", r"\b(?:increased\s+)?densit(?:y|ies)\b",
        r"\binterstitial\s+(?:markings?|prominence|thickening|disease|lung\s+disease)",
        r"\breticul\w*", r"\bfibro(?:sis|tic)\b",
    ), (
        r"\blungs?\s+(?:are|is|appears?|remains?)\s+(?:\w+\s+)?clear\b",
        r"\bclear\s+lungs?\b",
    )),
    Observation("Lung Lesion", (
        r"\bnodul\w*", r"\bmass(?:es)?\b", r"\blesions?\b", r"\btumou?rs?\b", r"\bneoplas\w*",
        r"\bcavit\w*", r"\bmetasta\w*", r"\bmalignan\w*",
    )),
    Observation("Edema", (
        r"\bedema\b", r"\boedema\b", r"\b(?:pulmonary\s+)?vascular\s+congestion\b",
        r"\bcongestive\s+heart\s+failure\b", r"\bchf\b", r"\bfluid\s+overload\b",
        r"\bcephalization\b", r"\bkerley\b",
    )),
    Observation("Consolidation", (r"\bconsolidat\w*",)),
    Observation("Pneumonia", (
        r"\bpneumonias?\b", r"\bpneumonitis\b", r"\binfecti(?:on|ous)\b", r"\baspiration\b",
        r"\bbronchopneumonia\b",
    )),
    Observation("Atelectasis", (r"\batelecta\w*", r"\bcollapse[ds]?\b", r"\bvolume\s+loss\b")),
    Observation("Pneumothorax", (
        r"\bpneumothora(?:x|ces)\b", r"\bhydropneumothorax\b", r"\bptx\b",
    )),
    Observation("Pleural Effusion", (
        r"(?<!pericardial\s)\beffusions?\b", r"\bpleural\s+fluid\b", r"\bhydropneumothorax\b",
        r"\bblunt\w*\s+(?:of\s+)?(?:the\s+)?(?:\w+\s+)?costophrenic\b",
        r"\bcostophrenic\s+(?:angles?|sulc\w+)\s+(?:\w+\s+)?blunt\w*",
    ), (
        r"\bcostophrenic\s+(?:angles?|sulc\w+)\s+(?:are|is)\s+(?:\w+\s+)?(?:sharp|clear)\w*",
    )),
    Observation("Pleural Other", (
        r"\bpleural\s+(?:thickening|plaques?|scarring|calcifications?|reaction)\b",
        r"\bfibrothorax\b", r"\bpleural[\s-]based\b", r"\bpleural\s+parenchymal\s+scarring\b",
    )),
    Observation("Fracture", (r"\bfractur\w*", r"\bfx\b")),
    Observation("Support Devices", (
        r"\b(?:endotracheal|et|enteric|nasogastric|ng|og|orogastric|feeding|chest|"
        r"tracheostomy|dobhoff)\s+tubes?\b",
        r"\bcatheters?\b", r"\bpiccs?\b", r"\b(?:central\s+(?:venous\s+)?)line\b", r"\bpacemakers?\b",
        r"\bpacers?\b", r"\bdefibrillators?\b", r"\bicd\b", r"\bstents?\b", r"\bsternotomy\b",
        r"\b(?:sternal\s+)?wires\b", r"\bclips\b", r"\bport\b", r"\bhardware\b", r"\bprosthe\w*",
        r"\bvalve\s+replacement\b", r"\bdrains?\b", r"\bleads?\b(?!\s+to\b)",
    ), is_finding=False),
)

HEAD: tuple[Observation, ...] = (
    Observation("Hemorrhage", (
        r"\bha?emorrhag\w*", r"\bhematomas?\b", r"\bhaematomas?\b", r"\bbleed\w*",
        r"\b(?:subarachnoid|intraventricular|intraparenchymal|subdural|epidural)\s+blood\b",
        r"\b(?:sah|sdh|edh|ich)\b",
    )),
    Observation("Infarct", (
        r"\binfarct\w*", r"\bstrokes?\b", r"\bischemi\w*", r"\bischaemi\w*",
        r"\brestricted\s+diffusion\b",
    )),
    Observation("Mass Effect", (r"\bmass\s+effect\b", r"\beffacement\b", r"\bherniation\b")),
    Observation("Midline Shift", (r"\bmidline\s+shift\b", r"\bshift\s+of\s+(?:the\s+)?midline\b")),
    Observation("Hydrocephalus", (r"\bhydrocephal\w*", r"\bventriculomegaly\b")),
    Observation("Fracture", (r"\bfractur\w*", r"\bfx\b")),
)

_SETS: dict[str, tuple[Observation, ...]] = {}


def register_observation_set(body_part: str, observations: Sequence[Observation]) -> None:
    """Register (or replace) the observation set used for reports of ``body_part``.

    Parameters
    ----------
    body_part : str
        Body part as in :attr:`common.reports.Report.body_part` (matched case-insensitively).
    observations : sequence of Observation
        The set; ``No Finding`` is added by the labeler and must not be part of it.
    """
    names = [o.name for o in observations]
    if NO_FINDING in names or len(set(names)) != len(names):
        raise ValueError("observation names must be unique and must not include 'No Finding'")
    _SETS[body_part.strip().lower()] = tuple(observations)
    _compiled.cache_clear()


def observation_set(body_part: str | None = None) -> tuple[Observation, ...]:
    """Return the observations for ``body_part``; the chest set when it has none of its own."""
    key = (body_part or DEFAULT_BODY_PART).strip().lower()
    return _SETS.get(key, _SETS[DEFAULT_BODY_PART])


def observation_names(body_part: str | None = None) -> list[str]:
    """Label names for ``body_part``, ``No Finding`` first."""
    return [NO_FINDING] + [o.name for o in observation_set(body_part)]


# ----------------------------------------------------------------------------- cues
_NEG_PRE = (
    r"\bno\b", r"\bnot\b", r"\bwithout\b", r"\bnegative\s+for\b", r"\bfree\s+of\b",
    r"\bclear\s+of\b", r"\bresolved\b", r"\bresolution\s+of\b", r"\brather\s+than\b",
    r"\babsence\s+of\b", r"\bno\s+evidence\s+of\b", r"\bnor\b", r"\bnever\b", r"\bruled\s+out\b",
    r"\bno\s+longer\b", r"\bnegative\b", r"\bremoved\b",
)
# Look like negations but are not: "No change in the left effusion." keeps the effusion.
_PSEUDO_NEG = (
    r"\b(?:no|without)\s+(?:(?:significant|interval|substantial|appreciable)\s+)*"
    r"(?:change|increase|worsening|progression|enlargement)\b",
    r"\bnot\s+(?:significantly\s+)?(?:changed|increased)\b", r"\bnot\s+only\b",
)
# Look like uncertainty but are not: "No consolidation to suggest pneumonia." negates both.
_PSEUDO_UNC = (r"\bto\s+suggest\b", r"\bto\s+indicate\b")
_NEG_POST = (
    r"\b(?:is|are|was|were|has\s+been|have\s+been)\s+(?:not|no\s+longer)\s+"
    r"(?:seen|identified|present|visuali[sz]ed|evident|demonstrated|appreciated|noted|detected)\b",
    r"\bnot\s+(?:be\s+|been\s+)?(?:seen|identified|present|visuali[sz]ed|evident|demonstrated|"
    r"appreciated)\b",
    r"\b(?:has|have)\s+(?:\w+\s+)?resolved\b", r"\bresolved\b", r"\babsent\b", r"\bruled\s+out\b",
    r"\b(?:has|have)\s+been\s+removed\b", r"\bremoved\b", r"\bexcluded\b",
)
_UNC_PRE = (
    r"\bpossibl[ey]\b", r"\bmay\b", r"\bmight\b", r"\bcould\b", r"\blikely\b", r"\bunlikely\b",
    r"\bprobabl[ey]\b", r"\bpresum\w*", r"\bcan\s*not\s+(?:be\s+)?(?:exclude[d]?|rule[d]?\s+out)\b",
    r"\bcan't\s+(?:be\s+)?(?:exclude[d]?|rule[d]?\s+out)\b", r"\bsuggest\w*", r"\bconcern\w*",
    r"\bworrisome\b", r"\bsuspicious\b", r"\bsuspect\w*", r"\bquestionabl[ey]\b",
    r"\bquestion\s+of\b", r"\bversus\b", r"\bvs\b", r"\bdifferential\b", r"\bconsider\w*",
    r"\bborderline\b", r"\bequivocal\b", r"\bindeterminate\b", r"\buncertain\b", r"\bperhaps\b",
    r"\bfavou?r\w*", r"\bmay\s+represent\b", r"\brule\s+out\b", r"\bnot\s+excluded\b",
    r"\bcannot\s+be\s+entirely\s+excluded\b", r"\bnot\s+(?:be\s+)?(?:entirely\s+)?excluded\b",
)
_UNC_POST = (
    r"\b(?:is|are)\s+not\s+(?:entirely\s+)?(?:excluded|ruled\s+out)\b",
    r"\b(?:can|could)\s*not\s+be\s+(?:entirely\s+)?(?:excluded|ruled\s+out)\b",
    r"\bnot\s+(?:be\s+)?(?:entirely\s+)?excluded\b",
    r"\b(?:is|are)\s+(?:suspected|possible|likely|questioned)\b",
    r"\bversus\b", r"\bvs\b", r"\?",
)
# Always end the scope of a pre-cue.
_HARD_STOP = (
    r"[.;:!?]", r"\bbut\b", r"\bhowever\b", r"\balthough\b", r"\bthough\b", r"\bexcept\b",
    r"\bapart\s+from\b", r"\baside\s+from\b", r"\bother\s+than\b", r"\bbesides\b", r"\bwhich\b",
    r"\bwhereas\b", r"\bwhile\b", r"\brather\s+than\b", r"\bversus\b", r"\bvs\b",
    r"\bsecondary\s+to\b", r"\bdue\s+to\b", r"\bconsistent\s+with\b",
)
# A comma followed by one of these starts a new statement (the scope ends at the comma).
_NEW_STATEMENT = (
    r"there|new|small|moderate|large|mild|mildly|severe|minimal|trace|tiny|increased|"
    r"increasing|decreased|worsening|improved|improving|persistent|stable|unchanged|left|"
    r"right|bilateral|status|s/p|otherwise|and\s+there|with|the"
)


def _alt(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


@dataclass(frozen=True)
class _Compiled:
    mentions: tuple[tuple[str, re.Pattern[str]], ...]
    normals: tuple[tuple[str, re.Pattern[str]], ...]


@lru_cache(maxsize=None)
def _compiled(body_part: str) -> _Compiled:
    obs = observation_set(body_part)
    return _Compiled(
        tuple((o.name, _alt(o.patterns)) for o in obs),
        tuple((o.name, _alt(o.normal_patterns)) for o in obs if o.normal_patterns),
    )


_RE_NEG_PRE, _RE_NEG_POST = _alt(_NEG_PRE), _alt(_NEG_POST)
_RE_UNC_PRE, _RE_UNC_POST = _alt(_UNC_PRE), _alt(_UNC_POST)
_RE_HARD_STOP = _alt(_HARD_STOP)
_RE_PSEUDO_NEG, _RE_PSEUDO_UNC = _alt(_PSEUDO_NEG), _alt(_PSEUDO_UNC)
_RE_SOFT_STOP = re.compile(rf"(?:,\s*(?:or\s+|and\s+)?|\s+and\s+)(?=(?:{_NEW_STATEMENT})\b)")
_RE_COMMA = re.compile(r",")
_LIST_MARK = r"(?:\d{1,2}[.)]\s+)?"
_RE_SENTENCE = re.compile(rf"(?<=[.!?;])\s+{_LIST_MARK}|\s*\n\s*{_LIST_MARK}|^\s*\d{{1,2}}[.)]\s+|"
                          r"\s+\d{1,2}[.)]\s+(?=[a-z])")

register_observation_set("chest", CHEST)
register_observation_set("head", HEAD)
register_observation_set("brain", HEAD)


# ----------------------------------------------------------------------------- labeling
def split_sentences(text: str) -> list[str]:
    """Lower-cased sentences of ``text`` (also split at numbered-list markers "1. ", "2) ").

    Parameters
    ----------
    text : str
        Report text.

    Returns
    -------
    list of str
        Non-empty sentences with whitespace collapsed.
    """
    text = re.sub(r"\bvs\.", "vs", text.lower())  # "a vs. b" is one statement
    parts = _RE_SENTENCE.split(text)
    return [s for s in (" ".join(p.split()) for p in parts if p) if s.strip(" .")]


@dataclass(frozen=True)
class _Cue:
    start: int
    end: int
    kind: int  # NEGATIVE or UNCERTAIN


def _spans(pattern: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in pattern.finditer(text) if m.end() > m.start()]


def _overlaps(span: tuple[int, int], others: list[tuple[int, int]]) -> bool:
    return any(span[0] < b and a < span[1] for a, b in others)


def _cues(sentence: str) -> tuple[list[_Cue], list[_Cue]]:
    """Pre-cues and post-cues of a sentence; negation words inside uncertainty phrases dropped."""
    pseudo_unc = _spans(_RE_PSEUDO_UNC, sentence)
    unc_pre = [s for s in _spans(_RE_UNC_PRE, sentence) if not _overlaps(s, pseudo_unc)]
    unc_post = _spans(_RE_UNC_POST, sentence)
    unc_all = unc_pre + unc_post + _spans(_RE_PSEUDO_NEG, sentence)
    neg_pre = [s for s in _spans(_RE_NEG_PRE, sentence) if not _overlaps(s, unc_all)]
    neg_post = [s for s in _spans(_RE_NEG_POST, sentence) if not _overlaps(s, unc_all)]
    pre = [_Cue(a, b, UNCERTAIN) for a, b in unc_pre] + [_Cue(a, b, NEGATIVE) for a, b in neg_pre]
    post = [_Cue(a, b, UNCERTAIN) for a, b in unc_post] + [_Cue(a, b, NEGATIVE) for a, b in neg_post]
    return pre, post


def _scope_end(sentence: str, start: int) -> int:
    """Where a pre-cue ending at ``start`` stops acting: the next clause boundary."""
    found = (_RE_HARD_STOP.search(sentence, start), _RE_SOFT_STOP.search(sentence, start))
    ends = [m.start() for m in found if m]
    return min(ends, default=len(sentence))


def _clause_start(sentence: str, end: int) -> int:
    """Start of the comma-delimited clause that ends at ``end`` (for post-cues)."""
    head = sentence[:end]
    bounds = [m.end() for m in _RE_HARD_STOP.finditer(head)] + [m.end() for m in _RE_COMMA.finditer(head)]
    return max(bounds, default=0)


def _mention_state(sentence: str, span: tuple[int, int], pre: list[_Cue], post: list[_Cue]) -> int:
    """State of one mention: post-cue uncertainty, else nearest pre-cue, else post-negation.

    A pre-cue applies when it starts before the mention ends (a cue inside the mention counts:
    "heart is not enlarged") and the mention starts inside the cue's scope.
    """
    start, end = span
    after = [c for c in post if c.start >= end and _clause_start(sentence, c.start) <= start]
    if any(c.kind == UNCERTAIN for c in after):
        return UNCERTAIN
    before = [c for c in pre if c.start < end and start < _scope_end(sentence, c.end)]
    if before:
        return max(before, key=lambda c: c.start).kind
    if after:
        return NEGATIVE
    return POSITIVE


def _merge(current: Label, new: int) -> int:
    """Report-level aggregation: positive > uncertain > negative."""
    if current is None:
        return new
    order = {POSITIVE: 2, UNCERTAIN: 1, NEGATIVE: 0}
    return new if order[new] > order[current] else current


def _label_sentence(sentence: str, compiled: _Compiled, labels: dict[str, Label]) -> None:
    pre, post = _cues(sentence)
    for name, pattern in compiled.mentions:
        for span in _spans(pattern, sentence):
            labels[name] = _merge(labels[name], _mention_state(sentence, span, pre, post))
    for name, pattern in compiled.normals:
        if pattern.search(sentence):
            labels[name] = _merge(labels[name], NEGATIVE)


def label_text(text: str, body_part: str | None = None) -> dict[str, Label]:
    """Label one report text (an impression, or findings) with its body part's observations.

    Parameters
    ----------
    text : str
        The text to label.
    body_part : str, optional
        Selects the observation set (default and fallback: chest).

    Returns
    -------
    dict
        Observation name -> 1 (positive), 0 (negative), -1 (uncertain) or None (not
        mentioned), ``No Finding`` first.
    """
    compiled = _compiled((body_part or DEFAULT_BODY_PART).strip().lower())
    labels: dict[str, Label] = {name: None for name in observation_names(body_part)}
    for sentence in split_sentences(text):
        _label_sentence(sentence, compiled, labels)
    findings = {o.name for o in observation_set(body_part) if o.is_finding}
    any_finding = any(labels[n] in (POSITIVE, UNCERTAIN) for n in findings)
    labels[NO_FINDING] = None if any_finding else POSITIVE
    return labels


# ----------------------------------------------------------------------------- comparison
def positive_set(labels: dict[str, Label], *, uncertain_as_positive: bool = True) -> set[str]:
    """Observations counted as *mentioned positive*: 1, and -1 unless told otherwise."""
    wanted = (POSITIVE, UNCERTAIN) if uncertain_as_positive else (POSITIVE,)
    return {name for name, value in labels.items() if value in wanted}


def clinical_agreement(reference: str, hypothesis: str, body_part: str | None = None) -> float:
    """Share of observations labeled in either text whose labels (1/0/-1/None) agree exactly.

    ``No Finding`` takes part, so a negation flip ("No pleural effusion." vs "Pleural
    effusion.") scores 0. Two texts that mention nothing (both only ``No Finding``) score 1.

    Returns
    -------
    float
        In 0..1.
    """
    ref, hyp = label_text(reference, body_part), label_text(hypothesis, body_part)
    labeled = [n for n in ref if ref[n] is not None or hyp[n] is not None]
    if not labeled:
        return 1.0
    return sum(ref[n] == hyp[n] for n in labeled) / len(labeled)


def _counts(ref: set[str], hyp: set[str]) -> tuple[int, int, int]:
    return len(ref & hyp), len(hyp - ref), len(ref - hyp)


def sample_clinical_counts(reference: str, hypothesis: str, body_part: str | None = None, *,
                           uncertain_as_positive: bool = True) -> dict[str, float]:
    """Per-sample clinical scores: true/false positives, false negatives, F1 and agreement.

    F1 is over the observations mentioned positive (see :func:`positive_set`); with neither
    text positive for anything it is 1. (``No Finding`` counts as an observation, so two
    normal texts agree and score 1.)

    Returns
    -------
    dict
        ``clinical_tp``, ``clinical_fp``, ``clinical_fn``, ``clinical_f1``,
        ``clinical_agreement``.
    """
    ref, hyp = label_text(reference, body_part), label_text(hypothesis, body_part)
    tp, fp, fn = _counts(positive_set(ref, uncertain_as_positive=uncertain_as_positive),
                         positive_set(hyp, uncertain_as_positive=uncertain_as_positive))
    labeled = [n for n in ref if ref[n] is not None or hyp[n] is not None]
    agree = sum(ref[n] == hyp[n] for n in labeled) / len(labeled) if labeled else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return {"clinical_tp": tp, "clinical_fp": fp, "clinical_fn": fn, "clinical_f1": f1,
            "clinical_agreement": agree}


def _prf(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"precision": precision, "recall": recall, "f1": f1}


def clinical_f1(references: Sequence[str], hypotheses: Sequence[str],
                body_parts: Sequence[str | None] | None = None, *,
                uncertain_as_positive: bool = True) -> dict[str, object]:
    """Observation-level precision, recall and F1 of hypotheses against references.

    Each text is labeled with :func:`label_text`; an observation is *mentioned positive* when
    its label is 1, or -1 (uncertain) when ``uncertain_as_positive`` (the default: a hedged
    finding is still a finding the reader must act on, as in CheXbert-style report metrics).
    Negative and unmentioned count alike as not positive.

    Parameters
    ----------
    references, hypotheses : sequence of str
        Aligned texts.
    body_parts : sequence of str or None, optional
        Per-pair body part selecting the observation set (default: chest for all).
    uncertain_as_positive : bool
        See above.

    Returns
    -------
    dict
        ``per_observation`` (name -> ``precision``, ``recall``, ``f1`` (None when undefined),
        ``support`` (reference positives), ``predicted`` (hypothesis positives)),
        ``micro_f1`` / ``micro_precision`` / ``micro_recall`` (pooled counts),
        ``micro_f1_findings`` (pooled without ``No Finding``: a model that writes nothing
        clinical gets ``No Finding`` right on normal studies for free; this one does not reward it),
        ``macro_f1`` (mean F1 over observations with support > 0; None if none),
        ``n`` (pairs) and ``uncertain_as_positive``.
    """
    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses must have the same length")
    parts = list(body_parts) if body_parts is not None else [None] * len(references)
    if len(parts) != len(references):
        raise ValueError("body_parts must have one entry per pair")
    counts: dict[str, list[int]] = {}
    for ref_text, hyp_text, part in zip(references, hypotheses, parts):
        ref, hyp = label_text(ref_text, part), label_text(hyp_text, part)
        ref_pos = positive_set(ref, uncertain_as_positive=uncertain_as_positive)
        hyp_pos = positive_set(hyp, uncertain_as_positive=uncertain_as_positive)
        for name in ref:
            c = counts.setdefault(name, [0, 0, 0])
            c[0] += name in ref_pos and name in hyp_pos
            c[1] += name in hyp_pos and name not in ref_pos
            c[2] += name in ref_pos and name not in hyp_pos
    per_obs = {name: {**_prf(*c), "support": c[0] + c[2], "predicted": c[0] + c[1]}
               for name, c in counts.items()}
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    micro = _prf(tp, fp, fn)
    findings = [c for name, c in counts.items() if name != NO_FINDING]
    micro_findings = _prf(*(sum(c[i] for c in findings) for i in range(3)))
    # An observation with support has an F1 (its tp + fn > 0); the test only narrows the type.
    macro_vals = [f1 for v in per_obs.values() if v["support"] and (f1 := v["f1"]) is not None]
    return {
        "per_observation": per_obs,
        "micro_f1": micro["f1"], "micro_precision": micro["precision"], "micro_recall": micro["recall"],
        "micro_f1_findings": micro_findings["f1"],
        "macro_f1": (sum(macro_vals) / len(macro_vals)) if macro_vals else None,
        "n": len(references), "uncertain_as_positive": uncertain_as_positive,
    }
