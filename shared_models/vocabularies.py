"""Findings vocabularies: canonical names, sentence noun phrases and the regexes that find them in reports.

Every pattern is matched case-insensitively and as whole words (the alternation of a finding's
patterns is wrapped in ``\\b...\\b``). Per finding:

* ``patterns`` name the finding; whether a mention is present, absent or uncertain is decided by the
  negation rules of :mod:`shared_models.reports`.
* ``absent_patterns`` are phrases that state the finding absent by themselves ("heart size is
  normal" for Cardiomegaly, "ventricles are normal in size" for Hydrocephalus).
* ``blockers``: a pattern match that lies inside a blocker match is not a mention of this finding.
  They keep neighbouring findings apart:

  - Arterial wall calcification vs Coronary artery wall calcification: a calcification phrase that is
    about the coronaries ("coronary artery wall calcification", "calcified plaques in the coronary
    arteries") fires only Coronary artery wall calcification. Arterial wall calcification needs an
    aortic / arterial / vascular / atherosclerotic phrase of its own; "atherosclerotic calcifications in
    the aorta and coronary arteries" fires both.
  - Pleural vs Pericardial effusion: a bare "effusion" counts as pleural (chest CT usage) unless it is
    part of "pericardial effusion"; "pleural or pericardial effusion" fires both.
  - Lung nodule vs Lung opacity vs Consolidation vs Mosaic attenuation pattern: "nodular opacity" and
    "ground-glass nodule" are nodules, "consolidative opacity" is consolidation, "mosaic attenuation"
    only fires the mosaic pattern; plain "opacity", "ground-glass" and "infiltrate" are Lung opacity.
  - Emphysema excludes subcutaneous / mediastinal emphysema; Mass excludes "mass effect";
    Enhancing lesion excludes "non-enhancing".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Finding:
    """One finding of a vocabulary.

    Args:
        name: canonical name, as in the dataset's labels ("Lung nodule").
        phrase: lowercase noun phrase used to build sentences ("lung nodules").
        patterns: regexes that mention the finding.
        absent_patterns: regexes that state the finding absent on their own.
        blockers: regexes whose matches hide pattern matches lying inside them.
        plural: ``phrase`` is plural ("There are lung nodules.").
    """

    name: str
    phrase: str
    patterns: tuple[str, ...]
    absent_patterns: tuple[str, ...] = ()
    blockers: tuple[str, ...] = ()
    plural: bool = False
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    absent_regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    blocker_regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        canonical = re.escape(self.name.lower()).replace(r"\ ", r"\s+")
        object.__setattr__(self, "regex", _compile((*self.patterns, canonical)))
        object.__setattr__(self, "absent_regex", _compile(self.absent_patterns) if self.absent_patterns else None)
        object.__setattr__(self, "blocker_regex", _compile(self.blockers) if self.blockers else None)


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One case-insensitive whole-word regex for an alternation (earlier patterns win at one position)."""
    return re.compile(r"\b(?:" + "|".join(f"(?:{p})" for p in patterns) + r")\b", re.IGNORECASE)


# A calcification / plaque phrase, shared by the two calcification findings.
_CALC = (
    r"(?:calcifications?|calcified\s+(?:atherom\w*\s+)?plaques?|calcific\s+(?:atherom\w*|plaques?)(?:\s+plaques?)?"
    r"|atherom\w*(?:\s+plaques?)?|atherosclerotic\s+(?:calcifications?|plaques?|changes?)|plaques?|calcium)"
)
_CORONARY_CALC = (
    rf"coronary(?:\s+arter(?:y|ies|ial))?(?:\s+wall)?\s+{_CALC}",
    r"coronary\s+(?:artery\s+)?atherosclero\w*",
    r"calcified\s+coronar(?:y|ies)(?:\s+arter(?:y|ies))?",
)
_ENLARGED = r"(?:(?:mildly|moderately|markedly|severely|slightly)\s+)?enlarged"

_CT_RATE = (
    Finding("Medical material", "medical material", (
        r"pace\s*makers?", r"(?:implantable\s+)?(?:cardioverter[-\s])?defibrillators?", r"stents?", r"catheters?",
        r"port-a-cath", r"ports?", r"sternotomy(?:\s+wires?)?", r"(?:sternal\s+)?(?:cerclage\s+)?wires?",
        r"(?:surgical|vascular|metallic)\s+clips?", r"clips?",
        r"(?:endotracheal|tracheostomy|chest|nasogastric|feeding)\s+tubes?", r"tubes?", r"prosthe(?:sis|ses|tic)",
        r"(?:metallic|surgical)\s+(?:material|implants?|sutures?)",
        r"implants?", r"drains?", r"coils?", r"(?:mechanical|prosthetic)\s+valves?", r"valve\s+replacement",
    )),
    Finding("Arterial wall calcification", "arterial wall calcification", (
        rf"aort\w*(?:\s+(?:wall|arch))?(?:\s+(?:and|&)\s+coronary(?:\s+arter(?:y|ies))?)?\s+{_CALC}",
        rf"(?:arter(?:y|ies|ial)|vascular|vessel)(?:\s+wall)?\s+{_CALC}",
        rf"{_CALC}\s+(?:of|in|within|at|along|involving|on)\s+(?:the\s+)?(?:[\w-]+\s+){{0,2}}?"
        r"(?:aort\w*|arter(?:y|ies|ial)|vessels?|vascular\w*|vasculature)",
        r"calcified\s+(?:aorta|arteries|vessels)", r"calcified\s+(?:atherom\w*\s+)?plaques?",
        r"atherosclero(?:sis|tic)", r"atherom\w*",
    ), blockers=(*_CORONARY_CALC, rf"{_CALC}\s+(?:(?!aort)\w+\s+){{0,3}}coronar(?:y|ies)(?:\s+arter(?:y|ies))?")),
    Finding("Cardiomegaly", "cardiomegaly", (
        r"cardiomegaly", r"enlarged\s+(?:cardiac\s+silhouette|heart)", r"(?:cardiac|heart)\s+enlargement",
        rf"heart\s+(?:size\s+)?(?:is|was|appears|seems)\s+{_ENLARGED}",
        r"(?:heart|cardiac)\s+size\s+(?:is\s+|was\s+)?(?:mildly\s+|slightly\s+)?increased",
        r"increased\s+(?:heart|cardiac)\s+size", r"cardiothoracic\s+ratio\s+(?:is\s+)?increased",
    ), absent_patterns=(
        r"(?:heart|cardiac)(?:[\s,]+(?:size|contour|contours|silhouette|and|shape)){0,3}\s+(?:is|are|was|were|appears?)"
        r"\s+(?:of\s+)?(?:normal|within\s+normal\s+limits)(?:\s+in\s+size)?",
        r"(?:heart|cardiac)\s+size\s+(?:normal|within\s+normal\s+limits)",
        r"normal(?:[-\s]sized)?\s+heart(?:\s+size)?", r"normal\s+cardiac\s+size",
        r"heart(?:\s+size)?\s+(?:is|was|appears)\s+not\s+(?:enlarged|increased)",
    )),
    Finding("Pericardial effusion", "pericardial effusion", (
        r"pericardial(?:\s+|-)(?:thickening[-\s](?:and\s+)?)?(?:effusions?|fluid)", r"hydropericardium",
    )),
    Finding("Coronary artery wall calcification", "coronary artery wall calcification", (
        *_CORONARY_CALC, rf"{_CALC}\s+(?:[\w-]+\s+){{0,7}}coronar(?:y|ies)(?:\s+arter(?:y|ies))?",
        rf"(?:LAD|RCA|left\s+anterior\s+descending|circumflex)(?:\s+(?:coronary\s+)?artery)?\s+{_CALC}",
    )),
    Finding("Hiatal hernia", "hiatal hernia", (
        r"hiat(?:al|us)\s+hernias?", r"(?:para-?o?esophageal|sliding)\s+(?:hiatal\s+)?hernias?",
    )),
    Finding("Lymphadenopathy", "lymphadenopathy", (
        r"lymphadenopath(?:y|ies)", r"adenopath(?:y|ies)", r"lymphadenomegaly",
        r"(?:pathologic(?:al(?:ly)?)?\s+)?enlarged\s+(?:[\w-]+\s+){0,3}?(?:lymph\s+)?nodes?",
        r"pathologic(?:al(?:ly)?)?\s+(?:sized\s+|enlarged\s+)?lymph\s+nodes?",
        r"lymph\s+nodes?\s+(?:[\w-]+\s+){0,8}?(?:in|of|with)\s+pathologic(?:al)?\s+(?:size|dimensions?|appearance)",
        rf"lymph\s+nodes?\s+(?:are|is|were|was|appear)\s+(?:pathologically\s+)?{_ENLARGED}",
        r"(?:lymph\s+)?node\s+enlargement",
    ), absent_patterns=(
        r"lymph\s+nodes?\s+(?:are|is|were|was)\s+not\s+(?:pathologically\s+)?enlarged",
        r"lymph\s+nodes?\s+(?:are|is|were|was)\s+(?:of\s+)?(?:normal\s+(?:in\s+)?size|within\s+normal\s+limits)",
    )),
    Finding("Emphysema", "emphysema", (
        r"emphysema(?:tous)?(?:\s+changes?)?", r"bullae", r"bullous\s+changes?",
    ), blockers=(r"(?:subcutaneous|mediastinal|soft[-\s]tissue|surgical|interstitial)\s+emphysema",)),
    Finding("Atelectasis", "atelectasis", (
        r"atelecta(?:sis|ses|tic)", r"(?:lobar|segmental|subsegmental|lung|lobe)\s+collapse",
        r"collapsed\s+(?:lung|lobe|segment)", r"collapse\s+of\s+the\s+(?:[\w-]+\s+){0,3}(?:lung|lobe)",
    )),
    Finding("Lung nodule", "lung nodules", (
        r"nodular\s+opacit(?:y|ies)", r"micro-?nodules?", r"nodules?",
    ), blockers=(r"(?:thyroid|adrenal|hepatic|liver|renal|kidney|breast|splenic)\s+(?:gland\s+)?nodules?",),
        plural=True),
    Finding("Lung opacity", "lung opacity", (
        r"ground[-\s]glass(?:\s+(?:opacit(?:y|ies)|densit(?:y|ies)|attenuation|areas?))?", r"GGOs?",
        r"opacit(?:y|ies)", r"infiltrat(?:e|es|ion|ions|ive)",
    ), blockers=(
        r"(?:nodular|fibrotic|consolidat\w*)\s+opacit(?:y|ies)", r"ground[-\s]glass\s+(?:opacity\s+)?nodules?",
        r"mosaic\s+ground[-\s]glass(?:\s+attenuation)?",
    )),
    Finding("Pulmonary fibrotic sequela", "pulmonary fibrotic sequela", (
        r"fibro-?atelecta(?:sis|ses|tic)(?:\s+(?:changes?|sequela(?:e|s)?))?",
        r"fibrotic\s+(?:sequela(?:e|s)?|changes?|bands?|strands?|areas?|scarring|opacit(?:y|ies))",
        r"fibros(?:is|es)", r"fibrotic", r"(?:parenchymal|fibrous)\s+bands?", r"scar(?:s|ring)?", r"sequela(?:e|s)?",
    )),
    Finding("Pleural effusion", "pleural effusion", (
        r"pleural(?:\s*(?:/|,|\bor\b|\band\b|\bnor\b)\s*[a-z-]+)*\s+effusions?", r"pleural\s+fluid",
        r"hydro(?:pneumo)?thorax", r"effusions?",
    ), blockers=(
        r"pericardial(?:\s+|-)(?:thickening[-\s](?:and\s+)?)?(?:effusions?|fluid)",
        r"(?:joint|subdural|middle\s+ear|mastoid)\s+effusions?",
    )),
    Finding("Mosaic attenuation pattern", "mosaic attenuation pattern", (
        r"mosaic(?:\s+(?:ground[-\s]glass|attenuation|perfusion|oligemia|appearance|pattern))*",
    )),
    Finding("Peribronchial thickening", "peribronchial thickening", (
        r"peri-?bronchial\s+(?:wall\s+)?(?:thickening|cuffing)", r"bronchial\s+wall\s+thickening",
        r"thickening\s+of\s+(?:the\s+)?(?:peri)?bronchial\s+walls?", r"thickened\s+(?:peri)?bronch\w*\s+walls?",
        r"peribronchovascular\s+(?:interstitial\s+)?thickening",
    )),
    Finding("Consolidation", "consolidation", (
        r"consolidat(?:ion|ions|ive|ed)(?:\s+opacit(?:y|ies))?", r"air\s+bronchograms?",
    )),
    Finding("Bronchiectasis", "bronchiectasis", (
        r"bronchiecta(?:sis|ses|tic)", r"bronchial\s+dilat(?:ation|ion)s?", r"dilated\s+bronch(?:i|ioles?|us)",
    )),
    Finding("Interlobular septal thickening", "interlobular septal thickening", (
        r"(?:interlobular\s+)?septal\s+thickenings?", r"thicken(?:ing|ed)\s+(?:of\s+)?(?:the\s+)?(?:interlobular\s+)?"
        r"sept(?:a|al|um)", r"(?:interlobular\s+)?septa\s+(?:are\s+)?thickened",
    ), blockers=(r"(?:inter)?(?:atrial|ventricular)\s+sept(?:a|al|um)\s+thicken\w*", r"nasal\s+sept\w*\s+thicken\w*")),
)

_BRAIN_MRI = (
    Finding("Infarct", "infarct", (
        r"infarct(?:s|ion|ions)?", r"(?:ischa?emic\s+)?strokes?", r"lacun(?:e|es|ar\s+infarcts?)",
        r"restricted\s+diffusion", r"diffusion\s+restriction",
    )),
    Finding("Hemorrhage", "hemorrhage", (
        r"ha?emorrhag(?:e|es|ic)", r"ha?ematomas?", r"bleed(?:s|ing)?", r"(?:subarachnoid|intraventricular)\s+blood",
    )),
    Finding("Mass", "mass", (
        r"mass(?:es)?", r"tumou?rs?", r"neoplasms?", r"space[-\s]occupying\s+lesions?",
        r"(?:glioma|glioblastoma|meningioma|lymphoma)s?", r"metasta(?:sis|ses|tic\s+(?:lesions?|disease))",
    ), blockers=(r"mass\s+effect", r"(?:body|muscle|bone)\s+mass")),
    Finding("White matter hyperintensities", "white matter hyperintensities", (
        r"white\s+matter\s+(?:[\w/-]+\s+){0,2}?hyperintens(?:ity|ities|e\s+(?:lesions?|foci))",
        r"(?:periventricular|deep|subcortical|juxtacortical)\s+(?:white\s+matter\s+)?(?:[\w/-]+\s+)?"
        r"hyperintens(?:ity|ities)",
        r"leu[ck]oaraiosis",
        r"(?:small\s+vessel|microangiopathic|microvascular)\s+(?:ischa?emic\s+)?(?:disease|changes?)",
        r"white\s+matter\s+(?:lesions?|changes?|disease)", r"WMHs?",
    ), plural=True),
    Finding("Hydrocephalus", "hydrocephalus", (
        r"hydrocephal(?:us|ic)", r"ventriculomegaly",
        r"(?:dilated|enlarged)\s+(?:lateral\s+|third\s+|fourth\s+)?ventricles?",
        r"(?:dilatation|enlargement)\s+of\s+the\s+(?:lateral\s+|third\s+|fourth\s+)?ventricles?",
        r"ventricular\s+(?:dilatation|dilation|enlargement)",
    ), absent_patterns=(
        r"ventric(?:les?|ular\s+system)(?:\s+and\s+(?:sulci|cisterns))?\s+(?:are|is)\s+(?:of\s+)?"
        r"(?:normal|unremarkable)(?:\s+in)?(?:\s+(?:size|caliber|calibre))?",
        r"normal(?:[-\s]sized)?\s+ventricles?", r"ventricles?\s+(?:are|is)\s+not\s+(?:enlarged|dilated)",
    )),
    Finding("Atrophy", "atrophy", (
        r"atroph(?:y|ic|ies)", r"(?:(?:parenchymal|cerebral|brain|cortical)\s+)?volume\s+loss",
    ), absent_patterns=(
        r"(?:brain|parenchymal|cerebral)\s+volume\s+(?:is\s+)?(?:normal|preserved)",
    )),
    Finding("Midline shift", "midline shift", (
        r"midline\s+shift", r"shift\s+of\s+(?:the\s+)?midline(?:\s+structures)?", r"subfalcine\s+herniation",
        r"midline\s+(?:structures\s+)?(?:are\s+|is\s+)?(?:shifted|deviated|displaced)",
    ), absent_patterns=(
        r"midline\s+structures\s+(?:are\s+|is\s+)?"
        r"(?:midline|central|preserved|normal|not\s+(?:shifted|displaced|deviated))",
    )),
    Finding("Edema", "edema", (
        r"o?edema(?:tous)?", r"(?:cerebral|brain)\s+swelling",
    )),
    Finding("Microbleeds", "microbleeds", (
        r"(?:cerebral\s+)?micro-?\s?bleeds?", r"micro-?ha?emorrhag(?:e|es)",
        r"(?:punctate\s+)?foci\s+of\s+(?:susceptibility|blooming)(?:\s+artifact)?",
    ), plural=True),
    Finding("Enhancing lesion", "enhancing lesion", (
        r"(?<!non-)(?<!non)(?<!non\s)(?:ring-?|peripherally\s+|avidly\s+|homogeneously\s+|heterogeneously\s+)?enhancing"
        r"\s+(?:[\w-]+\s+)?(?:lesions?|mass(?:es)?|foci|focus|nodules?|components?|tumou?rs?)",
        r"(?:abnormal|pathologic(?:al)?|parenchymal|leptomeningeal|nodular|focal)\s+(?:contrast\s+)?enhancement",
    ), blockers=(r"non-?\s?enhancing(?:\s+[\w-]+){1,2}",)),
)

FINDINGS: dict[str, Finding] = {f.name: f for f in (*_CT_RATE, *_BRAIN_MRI)}
"""Every known finding by canonical name (names are unique across vocabularies)."""

CT_RATE_FINDINGS: tuple[str, ...] = tuple(f.name for f in _CT_RATE)
"""The 18 CT-RATE abnormality labels, in the dataset's column order."""

BRAIN_MRI_FINDINGS: tuple[str, ...] = tuple(f.name for f in _BRAIN_MRI)
"""Common brain MRI findings."""

VOCABULARIES: dict[str, tuple[str, ...]] = {"ct_rate": CT_RATE_FINDINGS, "brain_mri": BRAIN_MRI_FINDINGS}
"""Vocabulary name -> canonical finding names in label order."""


def get_vocabulary(vocabulary: str | Sequence[str] | None = None) -> list[str]:
    """Canonical finding names in label order.

    Args:
        vocabulary: a vocabulary name (``"ct_rate"``, ``"brain_mri"``), a list of canonical names (a
            subset, in the given order), or None for ``"ct_rate"``.

    Raises:
        ValueError: an unknown vocabulary name, unknown or repeated finding names, or an empty list.
    """
    if vocabulary is None:
        vocabulary = "ct_rate"
    if isinstance(vocabulary, str):
        if vocabulary not in VOCABULARIES:
            raise ValueError(f"Unknown vocabulary {vocabulary!r}; known vocabularies: {sorted(VOCABULARIES)}.")
        return list(VOCABULARIES[vocabulary])
    names = list(vocabulary)
    unknown = [name for name in names if name not in FINDINGS]
    if unknown:
        raise ValueError(f"Unknown findings {unknown}; known findings: {list(FINDINGS)}.")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"A findings list must be non-empty and without repeats, got {names}.")
    return names


def get_finding(name: str) -> Finding:
    """The :class:`Finding` of a canonical name; ValueError naming it when unknown."""
    if name not in FINDINGS:
        raise ValueError(f"Unknown finding {name!r}; known findings: {list(FINDINGS)}.")
    return FINDINGS[name]
