"""The rule-based clinical labeler: negation, uncertainty, observation sets and clinical F1."""

from __future__ import annotations

import pytest

from fedmira.common.clinical import (
    NO_FINDING,
    Observation,
    clinical_agreement,
    clinical_f1,
    label_text,
    observation_names,
    register_observation_set,
    sample_clinical_counts,
    split_sentences,
)
from fedmira.common.metrics import rouge_l

P, N, U = 1, 0, -1

# (text, expected labels that are not None; every other observation must be None)
CHEST_CASES: list[tuple[str, dict[str, int]]] = [
    ("No pleural effusion.", {"Pleural Effusion": N, NO_FINDING: P}),
    ("Pleural effusion.", {"Pleural Effusion": P}),
    ("Small left pleural effusion.", {"Pleural Effusion": P}),
    ("Moderate right pleural effusion.", {"Pleural Effusion": P}),
    ("No acute cardiopulmonary abnormality.", {NO_FINDING: P}),
    ("No pleural effusion, pneumothorax, or consolidation.",
     {"Pleural Effusion": N, "Pneumothorax": N, "Consolidation": N, NO_FINDING: P}),
    ("No evidence of pneumothorax or pleural effusion.",
     {"Pneumothorax": N, "Pleural Effusion": N, NO_FINDING: P}),
    ("No pneumothorax, small left pleural effusion.", {"Pneumothorax": N, "Pleural Effusion": P}),
    ("Possible right lower lobe pneumonia.", {"Pneumonia": U}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": U}),
    ("Cannot exclude pneumonia.", {"Pneumonia": U}),
    ("Findings may represent early pneumonia.", {"Pneumonia": U}),
    ("Likely atelectasis rather than pneumonia.", {"Atelectasis": U, "Pneumonia": N}),
    ("Atelectasis versus pneumonia.", {"Atelectasis": U, "Pneumonia": U}),
    ("Bibasilar opacities suggestive of atelectasis.", {"Lung Opacity": P, "Atelectasis": U}),
    ("The heart is not enlarged.", {"Cardiomegaly": N, NO_FINDING: P}),
    ("Heart size is normal.", {"Cardiomegaly": N, NO_FINDING: P}),
    ("Mild cardiomegaly without pulmonary edema.", {"Cardiomegaly": P, "Edema": N}),
    ("Cardiomegaly and pulmonary edema.", {"Cardiomegaly": P, "Edema": P}),
    ("Pneumothorax has resolved.", {"Pneumothorax": N, NO_FINDING: P}),
    ("Pleural effusion is not seen.", {"Pleural Effusion": N, NO_FINDING: P}),
    ("Lungs are clear.", {"Lung Opacity": N, NO_FINDING: P}),
    ("Lungs clear of consolidation.", {"Consolidation": N, NO_FINDING: P}),
    ("Negative for pneumothorax.", {"Pneumothorax": N, NO_FINDING: P}),
    ("No change in small left pleural effusion.", {"Pleural Effusion": P}),
    ("No focal consolidation to suggest pneumonia.",
     {"Consolidation": N, "Pneumonia": N, NO_FINDING: P}),
    ("Left basilar atelectasis; no focal consolidation.", {"Atelectasis": P, "Consolidation": N}),
    ("1. Fracture deformity proximal right humerus. 2. No pulmonary consolidation.",
     {"Fracture": P, "Consolidation": N}),
    ("Endotracheal tube in satisfactory position. No acute cardiopulmonary process.",
     {"Support Devices": P, NO_FINDING: P}),
    ("The cardiomediastinal silhouette is enlarged.", {"Enlarged Cardiomediastinum": P}),
    ("6 mm right lower lobe pulmonary nodule.", {"Lung Lesion": P}),
]


@pytest.mark.parametrize(("text", "expected"), CHEST_CASES)
def test_chest_labels(text: str, expected: dict[str, int]) -> None:
    labels = label_text(text)
    got = {k: v for k, v in labels.items() if v is not None}
    assert got == expected


def test_chest_set_has_the_14_chexpert_observations() -> None:
    names = observation_names("chest")
    assert len(names) == 14 and names[0] == NO_FINDING
    assert {"Pleural Other", "Support Devices", "Lung Lesion", "Enlarged Cardiomediastinum"} <= set(names)


def test_unknown_body_part_falls_back_to_chest() -> None:
    assert observation_names("abdomen") == observation_names("chest") == observation_names(None)


@pytest.mark.parametrize(("text", "expected"), [
    ("Acute subdural hematoma with 5 mm midline shift.", {"Hemorrhage": P, "Midline Shift": P}),
    ("No intracranial hemorrhage, mass effect or midline shift.",
     {"Hemorrhage": N, "Mass Effect": N, "Midline Shift": N, NO_FINDING: P}),
    ("Possible acute infarct in the left MCA territory.", {"Infarct": U}),
    ("Hydrocephalus.", {"Hydrocephalus": P}),
])
def test_head_labels(text: str, expected: dict[str, int]) -> None:
    labels = label_text(text, "head")
    assert "Pleural Effusion" not in labels
    assert {k: v for k, v in labels.items() if v is not None} == expected


def test_register_new_observation_set() -> None:
    register_observation_set("test-knee", [Observation("Osteoarthritis", (r"\bosteoarthritis\b",))])
    assert label_text("No osteoarthritis.", "Test-Knee") == {NO_FINDING: P, "Osteoarthritis": N}
    with pytest.raises(ValueError):
        register_observation_set("test-bad", [Observation(NO_FINDING, (r"x",))])


def test_sentence_splitting_numbered_lists_and_decimals() -> None:
    assert split_sentences("1. No effusion. 2. A 2.5 cm nodule.") == ["no effusion.", "a 2.5 cm nodule."]


def test_negation_flip_disagrees_where_rouge_does_not() -> None:
    ref, hyp = "No pleural effusion.", "Pleural effusion."
    assert rouge_l(ref, hyp) > 0.75
    assert clinical_agreement(ref, hyp) == 0.0
    counts = sample_clinical_counts(ref, hyp)
    assert counts["clinical_f1"] == 0.0 and counts["clinical_fp"] == 1 and counts["clinical_fn"] == 1
    result = clinical_f1([ref], [hyp])
    assert result["micro_f1"] == 0.0
    assert result["per_observation"]["Pleural Effusion"]["predicted"] == 1


def test_clinical_f1_hand_computed() -> None:
    refs = ["Pleural effusion.", "Cardiomegaly.", "No acute disease."]
    hyps = ["Pleural effusion and cardiomegaly.", "No acute disease.", "No acute disease."]
    # effusion TP (1); cardiomegaly FP (1) and FN (2); No Finding FP (2) and TP (3)
    result = clinical_f1(refs, hyps)
    assert result["micro_precision"] == pytest.approx(2 / 4)
    assert result["micro_recall"] == pytest.approx(2 / 3)
    assert result["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    per = result["per_observation"]
    assert per["Pleural Effusion"]["f1"] == 1.0
    assert per["Cardiomegaly"]["f1"] == 0.0
    assert per[NO_FINDING]["f1"] == pytest.approx(2 / 3)
    assert per["Edema"]["f1"] is None
    assert result["macro_f1"] == pytest.approx((1.0 + 0.0 + 2 / 3) / 3)
    assert result["micro_f1_findings"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))


def test_uncertain_counts_as_positive_unless_told_otherwise() -> None:
    refs, hyps = ["Pneumonia."], ["Possible pneumonia."]
    assert clinical_f1(refs, hyps)["micro_f1"] == 1.0
    strict = clinical_f1(refs, hyps, uncertain_as_positive=False)
    assert strict["per_observation"]["Pneumonia"]["recall"] == 0.0
    assert clinical_agreement(refs[0], hyps[0]) == 0.0  # exact states differ (1 vs -1)


def test_identical_texts_agree() -> None:
    text = "Small left pleural effusion. No pneumothorax."
    assert clinical_agreement(text, text) == 1.0
    assert sample_clinical_counts(text, text)["clinical_f1"] == 1.0


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError):
        clinical_f1(["a"], [])


def test_numbered_list_without_periods() -> None:
    assert split_sentences("1. No acute disease 2. Left effusion") == ["no acute disease", "left effusion"]


def test_resolving_is_still_present() -> None:
    assert label_text("Resolving right lower lobe pneumonia.")["Pneumonia"] == P
