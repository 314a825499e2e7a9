"""An embedded synthetic multicenter radiology-report corpus (no patient data).

:func:`make_synthetic_corpus` builds a deterministic network of simulated hospitals ("sites")
that differ the way real ones do: long-tailed sizes, different modality and body-part mixes,
their own spelling of exam descriptions and, most importantly, their own reporting style for
impressions (normal-study phrase, numbered list vs one sentence, hedging words, a closing
recommendation). Findings are composed from per-body-part observation banks (CheXpert-style for
chest) in which every observation is present, absent (negated) or uncertain; the impression
summarises the present and uncertain ones in the site's style, so it is learnable from
findings + site + exam. Everything is drawn from one ``random.Random(seed)``; nothing touches
global random state.
"""

from __future__ import annotations

import datetime as _dt
import math
import random
from dataclasses import dataclass, field

from fedmira.common.errors import ConfigError
from fedmira.common.reports import Report

Slots = dict[str, tuple[str, ...]]

_SIDES = ("left", "right")
_SIZES = ("small", "moderate", "large")
_DEGREES = ("mild", "moderate", "severe")


@dataclass(frozen=True)
class _Obs:
    """One observation of a body part's bank.

    ``pos`` are findings sentences for a present observation, ``imp`` its impression phrase
    (both filled from the same slot values); ``neg_np`` is the noun phrase negated by the site's
    negation template (``None``: not mentioned when absent) and ``neg`` optional descriptive
    normal sentences ("Heart size is normal.").
    """

    label: str
    prevalence: float
    pos: tuple[str, ...]
    imp: str
    neg_np: str | None = None
    neg: tuple[str, ...] = ()
    slots: Slots = field(default_factory=dict)
    modalities: tuple[str, ...] = ("CT", "MR", "DR")


_CHEST: tuple[_Obs, ...] = (
    _Obs("support devices", 0.08, ("{device} is in satisfactory position.",),
         "{device_bare} in satisfactory position", None, (),
         {"device": ("an endotracheal tube", "a right internal jugular central venous catheter",
                     "a left chest wall pacemaker", "an enteric tube")}),
    _Obs("cardiomegaly", 0.12, ("The heart is {degree_ly} enlarged.", "{degree} cardiomegaly."),
         "{degree} cardiomegaly", "cardiomegaly",
         ("Heart size is normal.", "The cardiac silhouette is normal in size."),
         {"degree": _DEGREES[:2]}),
    _Obs("enlarged cardiomediastinum", 0.04, ("The mediastinum is widened.",),
         "widened mediastinum", "mediastinal widening", ("The mediastinal contours are normal.",)),
    _Obs("edema", 0.07, ("There is {degree} interstitial pulmonary edema.",
                         "{degree} pulmonary vascular congestion and interstitial edema."),
         "{degree} pulmonary edema", "pulmonary edema", (), {"degree": _DEGREES}),
    _Obs("consolidation", 0.05, ("There is {side} {zone} consolidation.",),
         "{side} {zone} consolidation", "focal consolidation", (),
         {"side": _SIDES, "zone": ("lower lobe", "upper lobe", "basilar")}),
    _Obs("pneumonia", 0.06, ("Patchy {side} {zone} airspace opacity, concerning for pneumonia.",),
         "{side} {zone} pneumonia", "pneumonia", (),
         {"side": _SIDES, "zone": ("lower lobe", "upper lobe")}),
    _Obs("atelectasis", 0.12, ("{extent} {side} {zone} atelectasis.",),
         "{extent} {side} {zone} atelectasis", "atelectasis", (),
         {"extent": ("minimal", "mild", "subsegmental"), "side": _SIDES + ("bibasilar",),
          "zone": ("basilar", "lower lobe")}),
    _Obs("lung opacity", 0.07, ("There is a hazy {side} {zone} opacity.",),
         "{side} {zone} opacity", "focal airspace opacity", (),
         {"side": _SIDES, "zone": ("basilar", "perihilar", "mid lung")}),
    _Obs("lung lesion", 0.04, ("A {nsize} nodule is seen in the {side} {lobe}.",),
         "{nsize} {side} {lobe} pulmonary nodule", "suspicious pulmonary nodule", (),
         {"nsize": ("6 mm", "9 mm", "1.4 cm"), "side": _SIDES, "lobe": ("upper lobe", "lower lobe")}),
    _Obs("pleural effusion", 0.14, ("There is a {size} {side} pleural effusion.",
                                    "{size} {side} pleural effusion is present."),
         "{size} {side} pleural effusion", "pleural effusion",
         ("The costophrenic angles are sharp.",), {"size": _SIZES, "side": _SIDES}),
    _Obs("pneumothorax", 0.04, ("There is a {size} {side} apical pneumothorax.",),
         "{size} {side} pneumothorax", "pneumothorax", (),
         {"size": ("tiny", "small", "moderate"), "side": _SIDES}),
    _Obs("fracture", 0.04, ("There is an acute fracture of the {rib}.",),
         "acute {rib} fracture", "acute displaced fracture",
         ("The osseous structures are intact.",),
         {"rib": ("left 6th rib", "right 4th rib", "left 8th rib", "right clavicle")}),
)

_HEAD: tuple[_Obs, ...] = (
    _Obs("intracranial hemorrhage", 0.05,
         ("There is an acute intraparenchymal hemorrhage in the {side} {lobe} lobe measuring {hsize}.",),
         "acute {hsize} {side} {lobe} intraparenchymal hemorrhage", "intracranial hemorrhage", (),
         {"side": _SIDES, "lobe": ("frontal", "parietal", "temporal"),
          "hsize": ("8 mm", "1.5 cm", "2.6 cm")}),
    _Obs("acute infarct", 0.06, ("There is an acute infarct in the {side} {territory} territory.",),
         "acute {side} {territory} territory infarct", "acute infarct", (),
         {"side": _SIDES, "territory": ("MCA", "PCA", "ACA")}),
    _Obs("mass", 0.03, ("A {msize} mass in the {side} {lobe} lobe with surrounding vasogenic edema.",),
         "{msize} {side} {lobe} mass with vasogenic edema", "mass lesion",
         ("There is no mass effect or midline shift.",),
         {"msize": ("1.8 cm", "3.2 cm"), "side": _SIDES, "lobe": ("frontal", "parietal", "occipital")}),
    _Obs("hydrocephalus", 0.03, ("The ventricles are enlarged out of proportion to the sulci.",),
         "hydrocephalus", "hydrocephalus", ("The ventricles are normal in size.",)),
    _Obs("small vessel disease", 0.18,
         ("{degree} periventricular white matter {signal}, likely chronic small vessel ischemic disease.",),
         "{degree} chronic small vessel ischemic disease", None, (), {"degree": _DEGREES[:2]}),
    _Obs("atrophy", 0.14, ("{degree} generalized cerebral volume loss.",),
         "{degree} cerebral atrophy", None, (), {"degree": _DEGREES[:2]}),
    _Obs("sinus disease", 0.1, ("Mucosal thickening of the {side} {sinus} sinus.",),
         "{side} {sinus} sinus disease", None,
         ("The visualized paranasal sinuses are clear.",),
         {"side": _SIDES, "sinus": ("maxillary", "ethmoid", "sphenoid")}),
    _Obs("fracture", 0.02, ("Nondisplaced fracture of the {side} {bone} bone.",),
         "nondisplaced {side} {bone} bone fracture", "calvarial fracture", (),
         {"side": _SIDES, "bone": ("frontal", "parietal", "occipital")}, ("CT",)),
)

_ABDOMEN: tuple[_Obs, ...] = (
    _Obs("hepatic steatosis", 0.15, ("{degree} diffuse hepatic steatosis.",),
         "{degree} hepatic steatosis", None, ("The liver is normal in size and contour.",),
         {"degree": _DEGREES[:2]}),
    _Obs("liver lesion", 0.06,
         ("A {lsize} hypodense lesion in hepatic {segment}, too small to characterize.",),
         "{lsize} indeterminate hepatic {segment} lesion", "focal hepatic lesion", (),
         {"lsize": ("5 mm", "8 mm", "1.1 cm"), "segment": ("segment 4", "segment 6", "segment 7")}),
    _Obs("cholelithiasis", 0.1, ("Cholelithiasis without gallbladder wall thickening.",),
         "cholelithiasis without cholecystitis", None, ("The gallbladder is unremarkable.",)),
    _Obs("nephrolithiasis", 0.08, ("A {ksize} nonobstructing calculus in the {side} kidney.",),
         "{ksize} nonobstructing {side} renal calculus", "hydronephrosis or nephrolithiasis", (),
         {"ksize": ("3 mm", "5 mm", "7 mm"), "side": _SIDES}),
    _Obs("appendicitis", 0.05, ("The appendix is dilated to {mm} with periappendiceal fat stranding.",),
         "acute appendicitis", "appendicitis", ("The appendix is normal.",),
         {"mm": ("9 mm", "11 mm", "13 mm")}),
    _Obs("bowel obstruction", 0.04,
         ("Dilated small bowel loops measure up to {cm} with a transition point in the {quad}.",),
         "small bowel obstruction with transition point in the {quad}", "bowel obstruction", (),
         {"cm": ("3.2 cm", "4.0 cm"), "quad": ("right lower quadrant", "left lower quadrant")}),
    _Obs("diverticulitis", 0.04, ("Sigmoid diverticula with adjacent fat stranding.",),
         "acute sigmoid diverticulitis", "diverticulitis", ()),
    _Obs("free fluid", 0.06, ("{size} volume free fluid in the pelvis.",),
         "{size} volume pelvic free fluid", "free fluid or free air", (), {"size": _SIZES[:2]}),
    _Obs("lymphadenopathy", 0.04, ("Enlarged {station} lymph nodes measuring up to {nsize}.",),
         "{station} lymphadenopathy", "lymphadenopathy", (),
         {"station": ("retroperitoneal", "mesenteric"), "nsize": ("1.6 cm", "2.1 cm")}),
)

_SPINE: tuple[_Obs, ...] = (
    _Obs("spondylolisthesis", 0.06, ("Grade 1 anterolisthesis at {disc}.",),
         "grade 1 anterolisthesis at {disc}", None, ("Alignment is normal.",)),
    _Obs("compression fracture", 0.05, ("{percent} loss of height of the {vert} vertebral body.",),
         "{vert} compression fracture with {percent} height loss", "compression fracture",
         ("Vertebral body heights are maintained.",), {"percent": ("20%", "30%", "50%")}),
    _Obs("degenerative disc disease", 0.3,
         ("{degree} disc space narrowing and endplate osteophytes at {disc}.",),
         "{degree} degenerative disc disease at {disc}", None, (), {"degree": _DEGREES}),
    _Obs("disc herniation", 0.2, ("At {disc}, there is a {side} paracentral disc protrusion {effect}.",),
         "{disc} {side} paracentral disc protrusion {effect}", "disc herniation", (),
         {"side": _SIDES, "effect": ("contacting the traversing nerve root", "with mild canal narrowing")},
         ("MR",)),
    _Obs("spinal stenosis", 0.12, ("{degree} spinal canal stenosis at {disc}.",),
         "{degree} spinal canal stenosis at {disc}", "significant spinal canal stenosis", (),
         {"degree": _DEGREES}, ("MR",)),
    _Obs("foraminal stenosis", 0.12, ("{degree} {side} neural foraminal narrowing at {disc}.",),
         "{degree} {side} foraminal stenosis at {disc}", "significant foraminal narrowing", (),
         {"degree": _DEGREES, "side": _SIDES}, ("MR",)),
)

_KNEE: tuple[_Obs, ...] = (
    _Obs("joint effusion", 0.2, ("{size} joint effusion.",), "{size} joint effusion",
         "joint effusion", (), {"size": _SIZES}),
    _Obs("osteoarthritis", 0.3, ("{degree} {comp} compartment joint space narrowing with osteophytes.",),
         "{degree} {comp} compartment osteoarthritis", None, ("Joint spaces are preserved.",),
         {"degree": _DEGREES, "comp": ("medial", "lateral", "patellofemoral")}),
    _Obs("fracture", 0.05, ("Nondisplaced fracture of the {bone}.",), "nondisplaced {bone} fracture",
         "acute fracture or dislocation", (),
         {"bone": ("tibial plateau", "patella", "fibular head")}),
    _Obs("meniscal tear", 0.2, ("{kind} tear of the {part} of the {men} meniscus.",),
         "{kind} tear of the {men} meniscus {part}", "meniscal tear", ("The menisci are intact.",),
         {"kind": ("horizontal", "complex", "radial"), "part": ("posterior horn", "body"),
          "men": ("medial", "lateral")}, ("MR",)),
    _Obs("ligament tear", 0.08, ("There is a {acl} tear of the anterior cruciate ligament.",),
         "{acl} anterior cruciate ligament tear", "ligament tear",
         ("The cruciate ligaments are intact.",), {"acl": ("complete", "partial")}, ("MR",)),
    _Obs("bone contusion", 0.1, ("Bone marrow edema in the {bone}.",), "{bone} bone contusion",
         None, (), {"bone": ("lateral femoral condyle", "medial tibial plateau")}, ("MR",)),
)

_BANKS: dict[str, tuple[_Obs, ...]] = {
    "chest": _CHEST, "head": _HEAD, "abdomen": _ABDOMEN, "spine": _SPINE, "knee": _KNEE,
}

# Sentences closing a study without any positive or uncertain observation.
_CLEAR: dict[str, str] = {
    "chest": "The lungs are clear.",
    "head": "Gray-white matter differentiation is preserved.",
    "abdomen": "The pancreas, spleen and adrenal glands are unremarkable.",
    "spine": "The paraspinal soft tissues are unremarkable.",
    "knee": "The extensor mechanism is intact.",
}

_DISCS: dict[str, tuple[str, ...]] = {
    "cervical": ("C4-C5", "C5-C6", "C6-C7"),
    "thoracic": ("T7-T8", "T11-T12"),
    "lumbar": ("L3-L4", "L4-L5", "L5-S1"),
}
_VERTS: dict[str, tuple[str, ...]] = {
    "cervical": ("C6",), "thoracic": ("T8", "T12"), "lumbar": ("L1", "L2"),
}

# Body-part weights given the modality (before a site's own Dirichlet noise).
_PARTS: dict[str, dict[str, float]] = {
    "DR": {"chest": 0.7, "spine": 0.15, "knee": 0.15},
    "CT": {"head": 0.35, "chest": 0.25, "abdomen": 0.4},
    "MR": {"head": 0.35, "spine": 0.35, "knee": 0.2, "abdomen": 0.1},
}

# Site kinds: (probability, modality weights CT / MR / DR, acuity multiplier).
_KINDS: dict[str, tuple[float, dict[str, float], float]] = {
    "community": (0.4, {"CT": 0.25, "MR": 0.05, "DR": 0.7}, 0.8),
    "general": (0.3, {"CT": 0.4, "MR": 0.2, "DR": 0.4}, 1.0),
    "academic": (0.2, {"CT": 0.45, "MR": 0.4, "DR": 0.15}, 1.4),
    "imaging_center": (0.1, {"CT": 0.2, "MR": 0.7, "DR": 0.1}, 0.9),
}

_NEGATIONS = ("No {np}.", "There is no {np}.", "No evidence of {np}.")
# (findings template, impression item template) for uncertain observations.
_HEDGES = (
    ("Possible {np}.", "possible {np}"),
    ("Questionable {np}.", "questionable {np}"),
    ("Cannot exclude {np}.", "cannot exclude {np}"),
    ("Findings may represent {np}.", "findings may represent {np}"),
)
_NORMALS = ("acute", "active", "normal", "unremarkable", "negative", "significant")
_ACUTE_NORMAL = {
    "chest": "No acute cardiopulmonary abnormality.",
    "head": "No acute intracranial abnormality.",
    "abdomen": "No acute abdominal or pelvic abnormality.",
    "spine": "No acute abnormality of the spine.",
    "knee": "No acute abnormality of the knee.",
}
_MOD_WORD = {"CT": "CT", "MR": "MRI", "DR": "radiograph"}
_LIST_FORMATS = ("numbered", "sentence", "semicolon")
_RECOMMEND = ("never", "abnormal", "always")
_RECOMMEND_TEXT = "Recommend clinical correlation."
_EXAM_STYLES = ("caps", "plain", "short", "verbose", "title")
_COMPARISONS = ("", "Comparison: None.", "No prior studies are available for comparison.")
_DAYS = (_dt.date(2024, 12, 31) - _dt.date(2020, 1, 1)).days + 1


@dataclass(frozen=True)
class _Site:
    """A simulated hospital's case mix and reporting habits."""

    site_id: str
    size: int
    modality_w: dict[str, float]
    part_w: dict[str, dict[str, float]]
    acuity: float
    hedge_rate: float
    negation: str
    desc_rate: float
    mentions: float
    hedge: tuple[str, str]
    normal: str
    list_format: str
    recommend: str
    exam_style: str
    comparison: str
    has_patient_ids: bool


# --------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------


def _site_sizes(rng: random.Random, num_sites: int, num_reports: int) -> list[int]:
    """Long-tailed (lognormal) sizes, each >= min(10, num_reports // num_sites), summing exactly."""
    floor = min(10, num_reports // num_sites)
    weights = [rng.lognormvariate(0.0, 1.0) for _ in range(num_sites)]
    rest = num_reports - floor * num_sites
    total = sum(weights)
    shares = [rest * w / total for w in weights]
    sizes = [floor + math.floor(s) for s in shares]
    missing = num_reports - sum(sizes)
    by_remainder = sorted(range(num_sites), key=lambda i: (-(shares[i] % 1.0), i))
    for i in by_remainder[:missing]:
        sizes[i] += 1
    return sizes


def _dirichlet(rng: random.Random, base: dict[str, float], concentration: float) -> dict[str, float]:
    """Dirichlet draw around ``base`` (keys kept in order)."""
    draws = {k: rng.gammavariate(max(w * concentration, 1e-3), 1.0) for k, w in base.items()}
    total = sum(draws.values()) or 1.0
    return {k: v / total for k, v in draws.items()}


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    """One key of ``weights`` drawn proportionally to its weight."""
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def _make_site(rng: random.Random, site_id: str, size: int) -> _Site:
    """Draw one site's case mix and reporting style."""
    kind = _pick(rng, {k: v[0] for k, v in _KINDS.items()})
    _, modality_base, acuity = _KINDS[kind]
    return _Site(
        site_id=site_id,
        size=size,
        modality_w=_dirichlet(rng, modality_base, 20.0),
        part_w={m: _dirichlet(rng, w, 10.0) for m, w in _PARTS.items()},
        acuity=acuity * rng.lognormvariate(0.0, 0.25),
        hedge_rate=rng.uniform(0.1, 0.4),
        negation=rng.choice(_NEGATIONS),
        desc_rate=rng.uniform(0.2, 0.8),
        mentions=rng.uniform(4.5, 7.0),
        hedge=rng.choice(_HEDGES),
        normal=rng.choices(_NORMALS, weights=(4, 2, 2, 2, 1, 1))[0],
        list_format=rng.choices(_LIST_FORMATS, weights=(4, 3, 2))[0],
        recommend=rng.choices(_RECOMMEND, weights=(5, 2, 2))[0],
        exam_style=rng.choice(_EXAM_STYLES),
        comparison=rng.choice(_COMPARISONS),
        has_patient_ids=rng.random() < 0.8,
    )


# --------------------------------------------------------------------------------------------
# Exam descriptions
# --------------------------------------------------------------------------------------------


def _exam_spec(rng: random.Random, modality: str, part: str) -> dict[str, str]:
    """Contrast, views, spine level and laterality of one exam."""
    contrast = "none"
    if modality == "CT":
        contrast = {"abdomen": "with", "chest": rng.choice(("with", "none"))}.get(part, "none")
    elif modality == "MR":
        contrast = "both" if part in ("head", "abdomen") else "none"
    views = ("2" if rng.random() < 0.75 else "1") if part == "chest" else rng.choice(("2", "3"))
    return {
        "contrast": contrast,
        "views": views,
        "level": rng.choice(("cervical", "lumbar", "lumbar", "thoracic")),
        "side": rng.choice(_SIDES),
    }


def _part_name(part: str, modality: str, spec: dict[str, str]) -> str:
    """Lower-case anatomical name of the examined part."""
    if part == "head":
        return "brain" if modality == "MR" else "head"
    if part == "abdomen":
        return "abdomen and pelvis"
    if part == "spine":
        return f"{spec['level']} spine"
    if part == "knee":
        return f"{spec['side']} knee"
    return part


def _exam_caps(modality: str, part: str, spec: dict[str, str]) -> str:
    """``XR CHEST PA AND LATERAL`` / ``CT ABDOMEN PELVIS W CONTRAST``."""
    mod = {"DR": "XR", "MR": "MRI"}.get(modality, modality)
    name = _part_name(part, modality, spec).replace(" and ", " ")
    if modality == "DR":
        views = {"2": "PA AND LATERAL", "1": "AP PORTABLE"}[spec["views"]] if part == "chest" \
            else f"{spec['views']} VIEWS"
        return f"{mod} {name} {views}".upper()
    contrast = {"none": "WO CONTRAST", "with": "W CONTRAST", "both": "W WO CONTRAST"}
    return f"{mod} {name} {contrast[spec['contrast']]}".upper()


def _exam_plain(modality: str, part: str, spec: dict[str, str]) -> str:
    """``Chest, 2 views, frontal and lateral`` / ``CT head without contrast``."""
    name = _part_name(part, modality, spec)
    if modality == "DR":
        extra = {"2": ", frontal and lateral", "1": ", portable"}[spec["views"]] \
            if part == "chest" else ""
        n = spec["views"]
        return f"{name.capitalize()}, {n} view{'s' if n != '1' else ''}{extra}"
    contrast = {"none": "without contrast", "with": "with contrast",
                "both": "with and without contrast"}[spec["contrast"]]
    return f"{_MOD_WORD[modality]} {name} {contrast}"


def _exam_short(modality: str, part: str, spec: dict[str, str]) -> str:
    """``DX CHEST 2V`` / ``CT ABD/PEL W`` / ``MR L-SPINE WO``."""
    mod = {"DR": "DX"}.get(modality, modality)
    names = {"chest": "CHEST", "abdomen": "ABD/PEL", "head": "BRAIN" if modality == "MR" else "HEAD",
             "spine": f"{spec['level'][0].upper()}-SPINE",
             "knee": f"KNEE {'LT' if spec['side'] == 'left' else 'RT'}"}
    if modality == "DR":
        return f"{mod} {names[part]} {spec['views']}V"
    contrast = {"none": "WO", "with": "W", "both": "W/WO"}[spec["contrast"]]
    return f"{mod} {names[part]} {contrast}"


def _exam_verbose(modality: str, part: str, spec: dict[str, str]) -> str:
    """``Radiograph of the chest, PA and lateral views`` / ``Computed tomography of the head ...``."""
    name = _part_name(part, modality, spec)
    if modality == "DR":
        views = {"2": "PA and lateral views", "1": "single portable view"}[spec["views"]] \
            if part == "chest" else f"{spec['views']} views"
        return f"Radiograph of the {name}, {views}"
    mod = {"CT": "Computed tomography", "MR": "Magnetic resonance imaging"}[modality]
    contrast = {"none": "without intravenous contrast", "with": "with intravenous contrast",
                "both": "without and with intravenous contrast"}[spec["contrast"]]
    return f"{mod} of the {name} {contrast}"


def _exam_title(modality: str, part: str, spec: dict[str, str]) -> str:
    """``XR Chest 2 Views`` / ``CT Abdomen/Pelvis W/ Contrast`` / ``MR Knee Left W/O Contrast``."""
    mod = {"DR": "XR"}.get(modality, modality)
    name = _part_name(part, modality, spec).replace(" and ", "/")
    if part == "knee":
        name = f"knee {spec['side']}"
    if modality == "DR":
        return f"{mod} {name.title()} {spec['views']} View{'s' if spec['views'] != '1' else ''}"
    contrast = {"none": "W/O Contrast", "with": "W/ Contrast", "both": "W/WO Contrast"}
    return f"{mod} {name.title()} {contrast[spec['contrast']]}"


_EXAM_WRITERS = {
    "caps": _exam_caps, "plain": _exam_plain, "short": _exam_short,
    "verbose": _exam_verbose, "title": _exam_title,
}


# --------------------------------------------------------------------------------------------
# Findings and impression
# --------------------------------------------------------------------------------------------


def _cap(text: str) -> str:
    """Upper-case the first character only."""
    return text[:1].upper() + text[1:]


def _slot_values(rng: random.Random, obs: _Obs, context: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Draw the slot values of one observation, plus derived forms (``degree_ly``, ``x_bare``)."""
    values: dict[str, str] = {}
    for key, choices in {**obs.slots, **{k: v for k, v in context.items() if k not in obs.slots}}.items():
        value = rng.choice(choices)
        values[key] = value
        values[f"{key}_ly"] = f"{value}ly"
        values[f"{key}_bare"] = value.split(" ", 1)[1] if value.startswith(("a ", "an ")) else value
    return values


def _context(modality: str, part: str, spec: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """Slot choices fixed by the exam (spine level, imaging signal word)."""
    level = spec["level"]
    signal = "hypoattenuation" if modality == "CT" else "T2/FLAIR hyperintensity"
    return {"disc": _DISCS[level], "vert": _VERTS[level], "signal": (signal,)}


def _observe(rng: random.Random, site: _Site, modality: str, part: str,
             spec: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """Draw the findings sentences, impression items and positive labels of one exam."""
    context = _context(modality, part, spec)
    bank = [o for o in _BANKS[part] if modality in o.modalities]
    sentences: list[str] = []
    items: list[str] = []
    labels: list[str] = []
    negatives: list[tuple[int, str]] = []
    for obs in bank:
        p_pos = min(0.6, obs.prevalence * site.acuity)
        draw = rng.random()
        if draw < p_pos * (1.0 + site.hedge_rate):
            values = _slot_values(rng, obs, context)
            phrase = obs.imp.format(**values)
            if draw < p_pos:
                sentences.append(_cap(rng.choice(obs.pos).format(**values)))
                items.append(phrase)
                labels.append(obs.label)
            else:
                sentences.append(_cap(site.hedge[0].format(np=phrase)))
                items.append(site.hedge[1].format(np=phrase))
        else:
            negatives.append((len(sentences), _negative(rng, site, obs)))
            sentences.append("")
    return _merge_negatives(rng, site, sentences, negatives), items, labels


def _negative(rng: random.Random, site: _Site, obs: _Obs) -> str:
    """Phrase a negated or descriptive normal sentence for an absent observation ('' if unmentioned)."""
    if obs.neg and (obs.neg_np is None or rng.random() < site.desc_rate):
        return rng.choice(obs.neg)
    if obs.neg_np is None:
        return ""
    return site.negation.format(np=obs.neg_np)


def _merge_negatives(rng: random.Random, site: _Site, sentences: list[str],
                     negatives: list[tuple[int, str]]) -> list[str]:
    """Keep about ``site.mentions`` negative sentences, in bank (anatomical) order."""
    candidates = [i for i, text in negatives if text]
    keep_n = min(len(candidates), max(1, round(rng.gauss(site.mentions, 1.0))))
    keep = set(rng.sample(candidates, keep_n))
    by_index = dict(negatives)
    return [by_index[i] if i in keep else s for i, s in enumerate(sentences)
            if s or i in keep]


def _normal_impression(site: _Site, modality: str, part: str, spec: dict[str, str]) -> str:
    """Return the site's phrase for a study without findings."""
    region = _part_name(part, modality, spec).replace("left ", "").replace("right ", "")
    phrases = {
        "acute": _ACUTE_NORMAL[part],
        "active": "No active disease.",
        "normal": f"Normal {_MOD_WORD[modality]} of the {region}.",
        "unremarkable": "Unremarkable study.",
        "negative": f"Negative {region} {_MOD_WORD[modality]}.",
        "significant": "No significant abnormality.",
    }
    return phrases[site.normal]


def _format_items(site: _Site, items: list[str]) -> str:
    """Impression items in the site's list format."""
    if site.list_format == "numbered" and len(items) > 1:
        return " ".join(f"{i}. {_cap(item)}." for i, item in enumerate(items, start=1))
    if site.list_format == "semicolon":
        return _cap("; ".join(items)) + "."
    if len(items) > 1:
        return _cap(", ".join(items[:-1]) + " and " + items[-1]) + "."
    return _cap(items[0]) + "."


def _impression(site: _Site, items: list[str], modality: str, part: str,
                spec: dict[str, str]) -> str:
    """Phrase the impression in the site's style."""
    text = _format_items(site, items) if items else _normal_impression(site, modality, part, spec)
    if site.recommend == "always" or (site.recommend == "abnormal" and items):
        text = f"{text} {_RECOMMEND_TEXT}"
    return text


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _patient(rng: random.Random, site: _Site,
             patients: list[tuple[str, int, str]]) -> tuple[str | None, int, str]:
    """Draw a new or returning patient (id, age, sex) of the site."""
    if patients and rng.random() < 0.2:
        return rng.choice(patients)
    age = min(95, max(18, round(rng.gauss(58.0, 17.0))))
    sex = rng.choice(("M", "F"))
    if not site.has_patient_ids:
        return None, age, sex
    patient = (f"{site.site_id}-P{len(patients) + 1:05d}", age, sex)
    patients.append(patient)
    return patient


def _make_report(rng: random.Random, site: _Site, index: int,
                 patients: list[tuple[str, int, str]]) -> Report:
    """Draw one report of ``site``."""
    modality = _pick(rng, site.modality_w)
    part = _pick(rng, site.part_w[modality])
    spec = _exam_spec(rng, modality, part)
    sentences, items, labels = _observe(rng, site, modality, part, spec)
    if not items:
        sentences.append(_CLEAR[part])
    if site.comparison:
        sentences.insert(0, site.comparison)
    patient_id, age, sex = _patient(rng, site, patients)
    date = _dt.date(2020, 1, 1) + _dt.timedelta(days=rng.randrange(_DAYS))
    return Report(
        report_id=f"{site.site_id}-{index:06d}",
        site_id=site.site_id,
        modality=modality,
        body_part=part,
        exam=_EXAM_WRITERS[site.exam_style](modality, part, spec),
        findings=" ".join(sentences),
        impression=_impression(site, items, modality, part, spec),
        patient_id=patient_id,
        age=age,
        sex=sex,
        study_date=date.isoformat(),
        labels=tuple(labels) or ("normal",),
    )


def make_synthetic_corpus(num_sites: int = 42, num_reports: int = 4200, seed: int = 7) -> list[Report]:
    """Build a deterministic synthetic multicenter corpus of radiology reports.

    Parameters
    ----------
    num_sites : int
        Number of simulated hospitals; ids are ``site_01`` .. (zero-padded, width >= 2).
    num_reports : int
        Total number of reports; site sizes are long-tailed and sum exactly to it, each site
        holding at least ``min(10, num_reports // num_sites)`` reports.
    seed : int
        Seed of the single ``random.Random`` all draws come from.

    Returns
    -------
    list[Report]
        Reports ordered by site, then by report id (``site_07-000123``). ``labels`` holds the
        positive observations, or ``("normal",)`` when there are none.

    Raises
    ------
    ConfigError
        If ``num_sites`` < 1 or ``num_reports`` < 0.
    """
    if num_sites < 1:
        raise ConfigError(f"num_sites must be >= 1 for the synthetic corpus, got {num_sites}.")
    if num_reports < 0:
        raise ConfigError(f"num_reports must be >= 0 for the synthetic corpus, got {num_reports}.")
    rng = random.Random(seed)
    width = max(2, len(str(num_sites)))
    sizes = _site_sizes(rng, num_sites, num_reports)
    sites = [_make_site(rng, f"site_{i:0{width}d}", size) for i, size in enumerate(sizes, start=1)]
    reports: list[Report] = []
    for site in sites:
        patients: list[tuple[str, int, str]] = []
        reports.extend(_make_report(rng, site, i, patients) for i in range(1, site.size + 1))
    return reports
