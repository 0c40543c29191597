"""Radiology report text for synthetic studies: varied phrasing that the findings labeler reads right.

:func:`compose_report` writes a report (FINDINGS and IMPRESSION, sometimes CLINICAL INFORMATION,
TECHNIQUE and COMPARISON) from a study's findings and returns what it states. Every phrasing here is
read correctly by :func:`shared_models.reports.extract_findings` (a test checks 100% agreement on
random reports), so a report's labels equal :attr:`Report.mentions`. Planted findings are always
mentioned; absent ones are mostly stated negative, sometimes left out; a few always-absent findings
outside the phantoms' repertoire ("No bronchiectasis.") may be stated negative too.

Pure Python plus a ``numpy.random.Generator`` for the draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

REPORT_STYLES: tuple[str, ...] = ("structured", "narrative", "terse", "bulleted")
"""Report layouts: headers on their lines with the optional sections; a narrative paragraph; one line
with inline headers ("Findings: ... Impression: ..."); bullet and numbered lists."""

# finding -> (positive templates, negative sentences). Templates use {side} {Side} {lobe} {size} {Size}
# {size_mm} {count} {severity} {Severity} {station} {Station} {age} {Age} {a_age} {rside} {lungs}.
_CT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Lung nodule": ((
        "A {size_mm} mm solid nodule in the {side} {lobe} lobe.",
        "{Side} {lobe} lobe pulmonary nodule measuring {size_mm} mm.",
        "There is a {size_mm} mm noncalcified nodule in the {side} lung.",
        "Solitary pulmonary nodule of {size_mm} mm in the {side} {lobe} lobe.",
    ), ("No pulmonary nodules.", "No suspicious pulmonary nodules are identified.", "No focal lung nodule.",
        "The lungs are free of nodules.")),
    "Lung nodules": ((
        "{Count} pulmonary nodules, the largest measuring {size_mm} mm.",
        "Several solid lung nodules up to {size_mm} mm.",
        "There are {count} nodules in {lungs}, up to {size_mm} mm.",
        "Multiple pulmonary nodules, the largest {size_mm} mm.",
    ), ()),
    "Pleural effusion": ((
        "{Size} {side} pleural effusion.", "{Size} {side}-sided pleural effusion.",
        "There is a {size} {side} pleural effusion.", "Layering {side} pleural fluid.",
        "{Side} pleural effusion with dependent fluid at the lung base.",
    ), ("No pleural effusion.", "No evidence of pleural fluid.", "There is no pleural effusion.",
        "No pleural effusion or thickening.")),
    "Pleural effusions": ((
        "Bilateral pleural effusions, larger on the {rside}.", "{Size} bilateral pleural effusions.",
        "Pleural effusions are present bilaterally.", "There are {size} bilateral pleural effusions.",
    ), ()),
    "Cardiomegaly": ((
        "Cardiomegaly.", "{Severity} cardiomegaly.", "The heart is {severity}ly enlarged.",
        "Enlarged cardiac silhouette.",
        "The heart is enlarged.", "Cardiac enlargement.",
    ), ("Heart size is normal.", "The heart is not enlarged.", "No cardiomegaly.", "Normal heart size.",
        "Heart size within normal limits.")),
    "Emphysema": ((
        "Centrilobular emphysema in both upper lobes.", "{Severity} upper lobe predominant emphysema.",
        "Emphysematous changes with apical bullae.", "Paraseptal and centrilobular emphysema.",
    ), ("No emphysema.", "There is no evidence of emphysema.", "No emphysematous changes.")),
    "Consolidation": ((
        "Consolidation in the {side} {lobe} lobe.",
        "Dense consolidation of the {side} {lobe} lobe with air bronchograms.",
        "Patchy consolidative opacity in the {side} lung.", "{Side} {lobe} lobe airspace consolidation.",
    ), ("No consolidation.", "No focal consolidation.", "There is no airspace consolidation.",
        "No evidence of consolidation.")),
    "Pericardial effusion": ((
        "{Size} pericardial effusion.", "There is a {size} pericardial effusion.", "Circumferential pericardial fluid.",
        "A {size} circumferential pericardial effusion is present.",
    ), ("No pericardial effusion.", "There is no pericardial effusion.", "No pericardial fluid.")),
    "Arterial wall calcification": ((
        "Atherosclerotic calcifications of the thoracic aorta.",
        "Calcified plaques in the aortic arch and descending aorta.",
        "{Severity} aortic wall calcification.", "Atherosclerosis of the thoracic aorta.",
        "Scattered calcified atheromatous plaques along the aorta.",
    ), ("No aortic calcification.", "No atherosclerotic calcification of the aorta.", "No vascular calcifications.",
        "The aorta is free of calcified plaques.")),
    "Medical material/pacemaker": ((
        "Left-sided pacemaker with its lead in the right ventricle.", "Cardiac pacemaker in situ.",
        "A dual-chamber pacemaker is present in the left chest wall.",
    ), ()),
    "Medical material/port": ((
        "Right chest wall port with the catheter tip in the superior vena cava.",
        "Port-a-cath in the right anterior chest wall.", "Central venous port catheter in place.",
    ), ()),
    "Medical material/sternotomy wires": ((
        "Median sternotomy wires.", "Postoperative sternal cerclage wires.",
        "Status post sternotomy with intact sternal wires.",
    ), ()),
    "Medical material": ((), (
        "No pacemaker or other implants.", "No indwelling catheters or tubes.", "No metallic implants.",
        "No surgical clips or wires.")),
    "Lymphadenopathy": ((
        "Enlarged {station} lymph nodes up to {size_mm} mm.",
        "{Station} lymphadenopathy, the largest node {size_mm} mm.",
        "Pathologically enlarged {station} lymph node measuring {size_mm} mm.", "{Station} adenopathy.",
    ), ("No mediastinal or hilar lymphadenopathy.", "No pathologically enlarged lymph nodes.",
        "Mediastinal lymph nodes are not enlarged.", "There is no lymphadenopathy.")),
    "Hiatal hernia": ((
        "{Size} hiatal hernia.", "There is a {size} sliding hiatal hernia.", "Hiatal hernia is present.",
    ), ("No hiatal hernia.", "There is no hiatal hernia.", "No evidence of hiatal hernia.")),
}
_BRAIN: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Infarct": ((
        "{Age} infarct in the {side} {lobe} lobe.", "There is {a_age} {side} {lobe} lobe infarction.",
        "{Side} {lobe} cortical and subcortical infarct.", "Area of {age} ischemic stroke in the {side} {lobe} lobe.",
        "Wedge-shaped {side} {lobe} infarct, {age} in appearance.",
    ), ("No acute infarct.", "No evidence of infarction.", "There is no territorial infarct.", "No ischemic stroke.")),
    "Hemorrhage": ((
        "Intraparenchymal hemorrhage in the {side} {lobe} lobe measuring {size_mm} mm.",
        "{Side} {lobe} hematoma, {size_mm} mm.",
        "Subacute parenchymal haemorrhage in the {side} {lobe} lobe.",
        "There is a {size_mm} mm intracerebral hematoma in the {side} hemisphere.",
    ), ("No intracranial hemorrhage.", "No evidence of hemorrhage.", "There is no intracranial haemorrhage.")),
    "Mass": ((
        "A {size_mm} mm mass in the {side} {lobe} lobe with a necrotic center.",
        "Heterogeneous {side} {lobe} lobe mass measuring {size_mm} mm.",
        "Space-occupying lesion in the {side} {lobe} lobe, {size_mm} mm.", "{Side} {lobe} tumor with central necrosis.",
    ), ("No intracranial mass.", "No mass or space-occupying lesion.", "No evidence of tumor.",
        "There is no mass lesion.")),
    "White matter hyperintensities": ((
        "Scattered periventricular white matter hyperintensities.",
        "{Severity} white matter hyperintensities, consistent with small vessel disease.",
        "Multiple periventricular and deep white matter T2/FLAIR hyperintensities.",
        "{Severity} chronic microangiopathic changes.",
    ), ("No white matter hyperintensities.", "No white matter lesions.",
        "No significant small vessel ischemic disease.")),
    "Hydrocephalus": ((
        "Hydrocephalus with enlarged lateral ventricles.", "Ventriculomegaly consistent with hydrocephalus.",
        "Communicating hydrocephalus.", "Dilated lateral ventricles in keeping with hydrocephalus.",
    ), ("No hydrocephalus.", "Ventricles are normal in size.", "The ventricular system is unremarkable.",
        "Normal-sized ventricles.")),
    "Atrophy": ((
        "Generalized cerebral atrophy.", "{Severity} parenchymal volume loss.",
        "Diffuse brain volume loss with prominent sulci.",
        "{Severity} global atrophy, more than expected for age.",
    ), ("No significant cerebral atrophy.", "Brain volume is preserved.", "Parenchymal volume is normal for age.",
        "No atrophy.")),
}
_IMPRESSION: dict[str, tuple[str, ...]] = {
    "Lung nodule": ("{Side} {lobe} lobe pulmonary nodule, {size_mm} mm. Follow-up CT is recommended.",
                    "Pulmonary nodule, {size_mm} mm."),
    "Lung nodules": ("Multiple pulmonary nodules.", "Pulmonary nodules up to {size_mm} mm."),
    "Pleural effusion": ("{Side} pleural effusion.", "{Size} {side} pleural effusion."),
    "Pleural effusions": ("Bilateral pleural effusions.",),
    "Cardiomegaly": ("Cardiomegaly.",), "Emphysema": ("Emphysema.", "{Severity} emphysema."),
    "Consolidation": ("{Side} {lobe} lobe consolidation.",), "Pericardial effusion": ("Pericardial effusion.",),
    "Arterial wall calcification": ("Aortic atherosclerosis.", "Aortic wall calcification."),
    "Medical material/pacemaker": ("Pacemaker in situ.",), "Medical material/port": ("Port catheter in place.",),
    "Medical material/sternotomy wires": ("Sternotomy wires.",),
    "Lymphadenopathy": ("{Station} lymphadenopathy.",), "Hiatal hernia": ("Hiatal hernia.",),
    "Infarct": ("{Age} {side} {lobe} infarct.",), "Hemorrhage": ("{Side} {lobe} intraparenchymal hemorrhage.",),
    "Mass": ("{Side} {lobe} mass, {size_mm} mm.",),
    "White matter hyperintensities": ("White matter hyperintensities.",),
    "Hydrocephalus": ("Hydrocephalus.",), "Atrophy": ("Cerebral atrophy.",),
}
_COMBINED_NEGATIVES: dict[tuple[str, str], tuple[str, ...]] = {
    ("Pleural effusion", "Pericardial effusion"): ("No pleural or pericardial effusion.",),
    ("Lung nodule", "Consolidation"): ("No pulmonary nodules or consolidation.", "No consolidation or nodules."),
    ("Consolidation", "Pleural effusion"): ("No consolidation or pleural effusion.",),
    ("Hemorrhage", "Mass"): ("No hemorrhage or mass.",), ("Infarct", "Hemorrhage"): ("No infarct or hemorrhage.",),
}
_EXTRA_NEGATIVES = {
    "CT": {"Bronchiectasis": "No bronchiectasis.",
           "Interlobular septal thickening": "No interlobular septal thickening.",
           "Mosaic attenuation pattern": "No mosaic attenuation.",
           "Coronary artery wall calcification": "No coronary artery calcification."},
    "MR": {"Midline shift": "No midline shift.", "Microbleeds": "No cerebral microbleeds."},
}
_NORMAL = {
    "CT": ("The trachea and main bronchi are patent.", "The thyroid gland is unremarkable.",
           "Visualized upper abdominal organs are unremarkable.", "No acute osseous abnormality.",
           "Mild degenerative changes of the thoracic spine.", "The thoracic aorta is normal in caliber.",
           "The esophagus is unremarkable.", "Both lungs are well aerated."),
    "MR": ("Gray-white matter differentiation is preserved.", "The orbits are unremarkable.",
           "The paranasal sinuses and mastoid air cells are clear.",
           "Normal flow voids in the major intracranial vessels.",
           "The craniocervical junction is unremarkable.", "No extra-axial collection."),
}
_NO_POSITIVES = {"CT": ("No acute cardiopulmonary abnormality.", "Unremarkable CT of the chest.",
                        "No significant abnormality."),
                 "MR": ("No acute intracranial abnormality.", "Unremarkable MRI of the brain.",
                        "No significant abnormality.")}
_CLINICAL = {"CT": ("Cough and shortness of breath.", "Follow-up.", "Chest pain.", "Fever.", "Staging.",
                    "Dyspnea on exertion."),
             "MR": ("Headache.", "Dizziness.", "Memory loss.", "Weakness of the left arm.", "Seizure.", "Follow-up.")}
_TECHNIQUE = {"CT": ("Axial CT of the chest with intravenous contrast.",
                     "Non-contrast CT of the thorax, axial reconstructions.",
                     "Helical CT of the chest; multiplanar reformats were reviewed."),
              "MR": ("Axial T1, T2 and FLAIR images of the brain without contrast.",
                     "Multisequence MRI of the brain (T1, T2, FLAIR).")}
_COMPARISON = ("None.", "No prior imaging available.", "Prior CT from 2019.", "Outside study from last year.")
_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Report:
    """A synthetic report: ``text``, the labels it states (``mentions``: finding -> present, in the
    order written; the labeler gives back exactly these) and its ``style``."""

    text: str
    mentions: dict[str, bool]
    style: str


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fields(name: str, d: Mapping, rng: np.random.Generator) -> dict[str, str]:
    """Template fields of one finding from its phantom ``details`` (defaults drawn from ``rng``)."""
    side = str(d.get("side") or _pick(rng, ("left", "right")))
    f = {
        "side": side, "lobe": str(d.get("lobe") or _pick(rng, ("upper", "lower"))),
        "size": str(d.get("size") or _pick(rng, ("small", "moderate"))),
        "size_mm": str(d.get("size_mm") or int(rng.integers(12, 21))),
        "count": _NUMBERS.get(int(d.get("count", 2)), "several"),
        "severity": str(d.get("severity") or _pick(rng, ("mild", "moderate", "severe"))),
        "station": str(d.get("station") or _pick(rng, ("paratracheal", "subcarinal", "hilar", "prevascular"))),
        "age": str(d.get("age") or _pick(rng, ("acute", "chronic"))), "rside": _pick(rng, ("left", "right")),
        "lungs": {"left": "the left lung", "right": "the right lung"}.get(side, "both lungs"),
    }
    if name in ("Infarct", "Hemorrhage", "Mass") and "lobe" not in d:
        f["lobe"] = _pick(rng, ("frontal", "parietal", "temporal", "occipital"))
    f["a_age"] = ("an " if f["age"][0] in "aeiou" else "a ") + f["age"]
    f.update({k.capitalize(): _cap(v) for k, v in list(f.items())})
    return f


def _variant(name: str, d: Mapping) -> str:
    """The phrase-bank key of a planted finding (kind-, count- or side-specific banks)."""
    if name == "Medical material":
        return f"Medical material/{d.get('kind', 'pacemaker')}"
    if name == "Lung nodule" and int(d.get("count", 1)) > 1:
        return "Lung nodules"
    if name == "Pleural effusion" and d.get("side") == "bilateral":
        return "Pleural effusions"
    return name


def compose_report(findings: Mapping[str, bool], rng: np.random.Generator, style: str = "structured",
                   details: Mapping[str, Mapping] | None = None, omit_p: float = 0.2, extra_p: float = 0.3) -> Report:
    """A report of ``findings`` (names of :data:`~shared_models.phantoms.CHEST_FINDINGS` or
    :data:`~shared_models.phantoms.BRAIN_FINDINGS` -> planted) in one of :data:`REPORT_STYLES`.

    Args:
        findings: plantable finding -> planted. Planted ones are always mentioned.
        rng: the generator for every choice.
        style: layout, one of :data:`REPORT_STYLES`.
        details: per planted finding, the phantom's facts (side, lobe, size_mm, kind, ...), so the text
            agrees with the image; missing facts are drawn.
        omit_p: probability that an absent finding is not mentioned at all.
        extra_p: probability of each "always absent" extra negative sentence.
    """
    if style not in REPORT_STYLES:
        raise ValueError(f"Unknown report style {style!r}; choose one of {list(REPORT_STYLES)}.")
    unknown = [n for n in findings if n not in _CT and n not in _BRAIN]
    if unknown:
        raise ValueError(f"No report phrasing for findings {unknown}.")
    modality = "MR" if any(n in _BRAIN for n in findings) else "CT"
    bank = _BRAIN if modality == "MR" else _CT
    details = details or {}
    mentions: dict[str, bool] = {}
    sentences: list[str] = []
    impression: list[str] = []
    for name, present in findings.items():
        if present:
            d = details.get(name, {})
            key, f = _variant(name, d), _fields(name, d, rng)
            sentences.append(_pick(rng, bank[key][0]).format(**f))
            impression.append(_pick(rng, _IMPRESSION[key]).format(**f))
            mentions[name] = True
    negatives = [n for n, p in findings.items() if not p and rng.random() >= omit_p]
    while negatives:
        name = negatives.pop(0)
        pairs = [(name, m) if (name, m) in _COMBINED_NEGATIVES else (m, name) for m in negatives]
        pair = next((p for p in pairs if p in _COMBINED_NEGATIVES), None)
        if pair is not None and rng.random() < 0.5:
            partner = pair[1] if pair[0] == name else pair[0]
            negatives.remove(partner)
            sentences.append(_pick(rng, _COMBINED_NEGATIVES[pair]))
            mentions[name] = mentions[partner] = False
            continue
        options = bank[name][1]
        if name == "Hydrocephalus" and findings.get("Atrophy"):
            options = options[:1]  # ex vacuo ventricles are not "normal in size"
        sentences.append(_pick(rng, options))
        mentions[name] = False
    for name, text in _EXTRA_NEGATIVES[modality].items():
        if rng.random() < extra_p:
            sentences.append(text)
            mentions[name] = False
    normals = [s for s in _NORMAL[modality] if rng.random() < 0.25]
    sentences += normals
    order = rng.permutation(len(sentences))
    sentences = [sentences[i] for i in order]
    if not impression:
        impression = [_pick(rng, _NO_POSITIVES[modality])]
    return Report(_layout(style, sentences, impression, modality, rng), mentions, style)


def _layout(style: str, sentences: list[str], impression: list[str], modality: str, rng: np.random.Generator) -> str:
    """Assemble the sections of one report in ``style``."""
    head = []
    if style == "structured":
        for title, options, p in (("CLINICAL INFORMATION", _CLINICAL[modality], 0.6),
                                  ("TECHNIQUE", _TECHNIQUE[modality], 0.5), ("COMPARISON", _COMPARISON, 0.4)):
            if rng.random() < p:
                head.append(f"{title}: {_pick(rng, options)}")
        return "\n".join([*head, "FINDINGS: " + " ".join(sentences), "IMPRESSION: " + " ".join(impression)])
    if style == "narrative":
        cut = int(rng.integers(1, len(sentences))) if len(sentences) > 2 else len(sentences)
        paragraphs = " ".join(sentences[:cut]) + ("\n" + " ".join(sentences[cut:]) if sentences[cut:] else "")
        clinical = f"Clinical history: {_pick(rng, _CLINICAL[modality])}\n\n" if rng.random() < 0.3 else ""
        return f"{clinical}FINDINGS:\n{paragraphs}\n\nIMPRESSION:\n" + " ".join(impression)
    if style == "terse":
        return "Findings: " + " ".join(sentences) + " Impression: " + " ".join(impression)
    items = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(impression))
    return "FINDINGS:\n" + "\n".join(f"- {s}" for s in sentences) + "\n\nIMPRESSION:\n" + items


def write_report(findings: Mapping[str, bool], rng: np.random.Generator, style: str = "structured",
                 details: Mapping[str, Mapping] | None = None) -> str:
    """The text of :func:`compose_report` (see there)."""
    return compose_report(findings, rng, style, details).text
