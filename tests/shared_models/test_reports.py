"""Report text: vocabularies, sections, sentences, the findings labeler, prompts and augmentation."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shared_models.reports import (
    BRAIN_MRI_FINDINGS,
    CT_RATE_FINDINGS,
    PROMPT_STYLES,
    SENTENCE_STYLES,
    VOCABULARIES,
    augment_report,
    extract_findings,
    finding_sentence,
    findings_vector,
    get_vocabulary,
    opposite_sentence_pairs,
    report_body,
    short_sentence_report,
    shuffle_sentences,
    split_sections,
    split_sentences,
    structured_findings_report,
    zero_shot_prompts,
)
from shared_models.reports import NO_FINDINGS_SENTENCE

CT_RATE_ORDER = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
]

REPORT = """CLINICAL INFORMATION: Rule out pneumonia. History of lung nodules.
TECHNIQUE: Non-contrast CT of the chest.
FINDINGS:
- Approx. 3.5 mm nodule in the right upper lobe, e.g. stable vs. prior.
- No pleural effusion
1. Mild cardiomegaly.
IMPRESSION
Stable nodule. Dr. Smith was notified."""

# ------------------------------------------------------------------------------------------------ vocabularies


def test_ct_rate_vocabulary_is_the_18_labels_in_dataset_order():
    assert list(CT_RATE_FINDINGS) == CT_RATE_ORDER
    assert get_vocabulary(None) == CT_RATE_ORDER
    assert get_vocabulary("ct_rate") == CT_RATE_ORDER


def test_brain_mri_vocabulary():
    names = get_vocabulary("brain_mri")
    assert names == list(BRAIN_MRI_FINDINGS) == list(VOCABULARIES["brain_mri"])
    assert 8 <= len(names) <= 10
    assert {"Infarct", "Hemorrhage", "Mass", "White matter hyperintensities", "Hydrocephalus"} <= set(names)


def test_vocabulary_subset_keeps_the_given_order():
    assert get_vocabulary(["Pleural effusion", "Cardiomegaly"]) == ["Pleural effusion", "Cardiomegaly"]


@pytest.mark.parametrize(
    "vocabulary, message",
    [
        ("chest_xray", "chest_xray"),
        (["Cardiomegaly", "Pneumothorax", "Lung nodul"], "Pneumothorax"),
        (["Cardiomegaly", "Lung nodul"], "Lung nodul"),
        (["Cardiomegaly", "Cardiomegaly"], "repeats"),
        ([], "non-empty"),
    ],
)
def test_get_vocabulary_errors_name_the_problem(vocabulary, message):
    with pytest.raises(ValueError, match=message):
        get_vocabulary(vocabulary)


def test_unknown_finding_error_lists_the_known_ones():
    with pytest.raises(ValueError, match="known findings: .*Cardiomegaly"):
        get_vocabulary(["Pneumothorax"])


def test_unknown_vocabulary_error_lists_the_known_ones():
    with pytest.raises(ValueError, match="brain_mri.*ct_rate"):
        get_vocabulary("chest_xray")


# ---------------------------------------------------------------------------------------------- text structure


def test_split_sections_canonical_keys_and_bodies():
    sections = split_sections(REPORT)
    assert list(sections) == ["CLINICAL INFORMATION", "TECHNIQUE", "FINDINGS", "IMPRESSION"]
    assert sections["TECHNIQUE"] == "Non-contrast CT of the chest."
    assert sections["IMPRESSION"] == "Stable nodule. Dr. Smith was notified."
    assert sections["FINDINGS"].startswith("- Approx. 3.5 mm nodule")


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Findings: Small effusion.\nImpression: Effusion.",
            {"FINDINGS": "Small effusion.", "IMPRESSION": "Effusion."},
        ),
        ("FINDINGS: No nodule. IMPRESSION: Normal.", {"FINDINGS": "No nodule.", "IMPRESSION": "Normal."}),
        ("CONCLUSION:\nNormal chest CT.", {"CONCLUSION": "Normal chest CT."}),
        ("Comparison: None.\nFindings\nNo nodule.", {"COMPARISON": "None.", "FINDINGS": "No nodule."}),
        ("The lungs are clear. No effusion.", {"FINDINGS": "The lungs are clear. No effusion."}),
        ("Findings are compatible with pneumonia.", {"FINDINGS": "Findings are compatible with pneumonia."}),
        ("CT CHEST\nFINDINGS: Clear.", {"PREAMBLE": "CT CHEST", "FINDINGS": "Clear."}),
        ("   ", {}),
    ],
)
def test_split_sections(text, expected):
    assert split_sections(text) == expected


def test_report_body_keeps_findings_and_impression_only():
    body = report_body(REPORT)
    assert "Rule out pneumonia" not in body and "Non-contrast" not in body
    assert body.startswith("- Approx. 3.5 mm nodule") and body.endswith("Dr. Smith was notified.")


def test_report_body_of_text_without_headers_is_the_text():
    assert report_body("  Small left pleural effusion.  ") == "Small left pleural effusion."


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A 3.5 mm nodule. No effusion.", ["A 3.5 mm nodule.", "No effusion."]),
        ("Nodule measures approx. 4 mm. Stable.", ["Nodule measures approx. 4 mm.", "Stable."]),
        ("Airway disease, e.g. bronchitis. No mass.", ["Airway disease, e.g. bronchitis.", "No mass."]),
        ("Atelectasis, i.e. collapse. Clear.", ["Atelectasis, i.e. collapse.", "Clear."]),
        (
            "Atelectasis vs. pneumonia. Dr. Smith was informed.",
            ["Atelectasis vs. pneumonia.", "Dr. Smith was informed."],
        ),
        ("- Small effusion\n- No nodule", ["Small effusion", "No nodule"]),
        ("1. Emphysema.\n2. Cardiomegaly.", ["Emphysema.", "Cardiomegaly."]),
        ("Is there an effusion? Yes! Small.", ["Is there an effusion?", "Yes!", "Small."]),
        ("First line\n\n   \nSecond line.", ["First line", "Second line."]),
        ("", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


# ---------------------------------------------------------------------------------------------------- labeler

EXTRACT_CASES = [
    # plain positives, plurals and case
    ("Small left pleural effusion.", {"Pleural effusion": True}),
    ("Bilateral pleural effusions, larger on the right.", {"Pleural effusion": True}),
    ("CARDIOMEGALY.", {"Cardiomegaly": True}),
    ("Multiple pulmonary nodules in both lungs.", {"Lung nodule": True}),
    ("The heart is enlarged.", {"Cardiomegaly": True}),
    ("Centrilobular emphysema and bronchiectasis are noted.", {"Emphysema": True, "Bronchiectasis": True}),
    ("Sliding hiatal hernia.", {"Hiatal hernia": True}),
    ("Pacemaker leads in the right heart.", {"Medical material": True}),
    ("Subsegmental atelectasis in the lingula.", {"Atelectasis": True}),
    ("Ground-glass opacities in both lower lobes.", {"Lung opacity": True}),
    ("Fibrotic sequelae in the right upper lobe.", {"Pulmonary fibrotic sequela": True}),
    ("Mosaic attenuation pattern in both lungs.", {"Mosaic attenuation pattern": True}),
    ("Peribronchial thickening with consolidation.", {"Peribronchial thickening": True, "Consolidation": True}),
    ("Interlobular septal thickening at the bases.", {"Interlobular septal thickening": True}),
    ("Enlarged mediastinal lymph nodes.", {"Lymphadenopathy": True}),
    ("Nodular opacity in the right lower lobe.", {"Lung nodule": True}),
    # calcifications: coronary-only phrases do not fire the arterial finding
    ("Coronary artery wall calcification is noted.", {"Coronary artery wall calcification": True}),
    ("Calcified plaques in the coronary arteries.", {"Coronary artery wall calcification": True}),
    ("Atherosclerotic calcification of the thoracic aorta.", {"Arterial wall calcification": True}),
    (
        "Atherosclerotic calcifications in the aorta and coronary arteries.",
        {"Arterial wall calcification": True, "Coronary artery wall calcification": True},
    ),
    # pre-mention negation
    ("No pleural effusion.", {"Pleural effusion": False}),
    ("NO PLEURAL EFFUSION.", {"Pleural effusion": False}),
    ("No evidence of lymphadenopathy.", {"Lymphadenopathy": False}),
    ("Lungs are clear without consolidation.", {"Consolidation": False}),
    ("Negative for pericardial effusion.", {"Pericardial effusion": False}),
    ("Free of pleural effusion.", {"Pleural effusion": False}),
    ("Absence of hiatal hernia.", {"Hiatal hernia": False}),
    ("There is no emphysema.", {"Emphysema": False}),
    ("Resolved right pleural effusion.", {"Pleural effusion": False}),
    ("Heart size is normal.", {"Cardiomegaly": False}),
    ("The heart is not enlarged.", {"Cardiomegaly": False}),
    ("Mediastinal lymph nodes are not enlarged.", {"Lymphadenopathy": False}),
    ("No lymph node in pathological size and appearance.", {"Lymphadenopathy": False}),
    # post-mention negation
    ("Pleural effusion is not seen.", {"Pleural effusion": False}),
    ("Pleural effusions are absent.", {"Pleural effusion": False}),
    ("Pleural effusion has resolved.", {"Pleural effusion": False}),
    ("The previously seen nodule is no longer seen.", {"Lung nodule": False}),
    ("Pericardial effusion-thickening was not observed.", {"Pericardial effusion": False}),
    ("Mosaic attenuation is not identified.", {"Mosaic attenuation pattern": False}),
    ("Findings are not compatible with pleural effusion.", {"Pleural effusion": False}),
    # uncertainty (default policy: present)
    ("A nodule cannot be excluded.", {"Lung nodule": True}),
    ("Possible consolidation in the left lower lobe.", {"Consolidation": True}),
    ("Findings may represent atelectasis.", {"Atelectasis": True}),
    ("Questionable hiatal hernia.", {"Hiatal hernia": True}),
    # lists: the negation distributes
    ("No pleural effusion or pneumothorax.", {"Pleural effusion": False}),
    (
        "No effusion, consolidation, or nodules.",
        {"Pleural effusion": False, "Consolidation": False, "Lung nodule": False},
    ),
    (
        "No hiatal hernia, lymphadenopathy or cardiomegaly.",
        {"Hiatal hernia": False, "Lymphadenopathy": False, "Cardiomegaly": False},
    ),
    (
        "Effusion, consolidation and nodules are not seen.",
        {"Pleural effusion": False, "Consolidation": False, "Lung nodule": False},
    ),
    ("No pleural or pericardial effusion was detected.", {"Pleural effusion": False, "Pericardial effusion": False}),
    # clause scope
    (
        "No pleural effusion, but a small pericardial effusion is present.",
        {"Pleural effusion": False, "Pericardial effusion": True},
    ),
    ("No pleural effusion, mild cardiomegaly.", {"Pleural effusion": False, "Cardiomegaly": True}),
    ("No new nodules; stable 4 mm nodule in the right upper lobe.", {"Lung nodule": True}),
    (
        "Bronchiectasis is seen, without peribronchial thickening.",
        {"Bronchiectasis": True, "Peribronchial thickening": False},
    ),
    ("Possible small nodule, no effusion.", {"Lung nodule": True, "Pleural effusion": False}),
    # pseudo-negation, blocked look-alikes
    ("No change in the size of the right lower lobe nodule.", {"Lung nodule": True}),
    ("Subcutaneous emphysema in the chest wall.", {}),
    # sections: present anywhere wins, non-body sections are not read
    ("FINDINGS: No pleural effusion.\nIMPRESSION: Small pleural effusion.", {"Pleural effusion": True}),
    ("FINDINGS: Large right pleural effusion. No lung nodule. IMPRESSION: Pleural effusion.",
     {"Pleural effusion": True, "Lung nodule": False}),
    ("CLINICAL INFORMATION: Known lung nodule.\nFINDINGS: The lungs are clear.", {}),
    # nothing mentioned
    ("The lungs are clear.", {}),
    ("Trachea and both main bronchi are open.", {}),
    ("", {}),
]


@pytest.mark.parametrize("text, expected", EXTRACT_CASES, ids=[t[:40] or "empty" for t, _ in EXTRACT_CASES])
def test_extract_findings(text, expected):
    assert extract_findings(text) == expected


@pytest.mark.parametrize("present", [True, False])
@pytest.mark.parametrize("style", sorted(SENTENCE_STYLES))
@pytest.mark.parametrize("name", CT_RATE_ORDER + list(BRAIN_MRI_FINDINGS))
def test_labeler_reads_its_own_sentences(name, present, style):
    vocabulary = "ct_rate" if name in CT_RATE_ORDER else "brain_mri"
    assert extract_findings(finding_sentence(name, present, style), vocabulary) == {name: present}


BRAIN_CASES = [
    ("No acute infarct or hemorrhage.", {"Infarct": False, "Hemorrhage": False}),
    ("Chronic lacunar infarct in the left basal ganglia.", {"Infarct": True}),
    ("Ventricles are normal in size.", {"Hydrocephalus": False}),
    ("There is no midline shift or mass effect.", {"Midline shift": False}),
    ("Mild periventricular white matter hyperintensities.", {"White matter hyperintensities": True}),
    ("Ring-enhancing lesion with surrounding vasogenic edema.", {"Enhancing lesion": True, "Edema": True}),
    ("Non-enhancing lesion in the right frontal lobe.", {}),
    ("No abnormal enhancement.", {"Enhancing lesion": False}),
    ("Scattered microbleeds.", {"Microbleeds": True}),
    ("Mass in the left temporal lobe causing 5 mm midline shift.", {"Mass": True, "Midline shift": True}),
    ("Generalized cerebral atrophy.", {"Atrophy": True}),
]


@pytest.mark.parametrize("text, expected", BRAIN_CASES, ids=[t[:40] for t, _ in BRAIN_CASES])
def test_extract_findings_brain_mri(text, expected):
    assert extract_findings(text, "brain_mri") == expected


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("present", {"Lung nodule": True, "Pleural effusion": True, "Consolidation": False}),
        ("absent", {"Lung nodule": False, "Pleural effusion": False, "Consolidation": False}),
        ("ignore", {"Consolidation": False}),
    ],
)
def test_uncertain_policy(policy, expected):
    text = "A nodule cannot be excluded. Possible small effusion. No consolidation."
    assert extract_findings(text, uncertain=policy) == expected


def test_uncertain_absent_does_not_override_a_definite_mention():
    text = "Small nodule in the right lower lobe. Another nodule cannot be excluded."
    assert extract_findings(text, uncertain="absent") == {"Lung nodule": True}


def test_extract_findings_rejects_unknown_policy():
    with pytest.raises(ValueError, match="maybe"):
        extract_findings("No effusion.", uncertain="maybe")


def test_extract_findings_subset_vocabulary_and_order():
    text = "Pleural effusion. No cardiomegaly. Small nodule."
    subset = extract_findings(text, ["Lung nodule", "Pleural effusion"])
    assert subset == {"Lung nodule": True, "Pleural effusion": True}
    assert list(extract_findings(text)) == ["Cardiomegaly", "Lung nodule", "Pleural effusion"]


def test_findings_vector_order_and_mask():
    labels, mask = findings_vector({"Pleural effusion": True, "Cardiomegaly": False, "Medical material": True})
    assert labels == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert mask == [1.0] * 18


def test_findings_vector_ignore_unmentioned():
    labels, mask = findings_vector({"Hemorrhage": False, "Edema": True}, "brain_mri", unmentioned="ignore")
    assert labels == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert mask == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_findings_vector_rejects_unknown_policy():
    with pytest.raises(ValueError, match="skip"):
        findings_vector({}, unmentioned="skip")


# ------------------------------------------------------------------------------------------ sentences, prompts


@pytest.mark.parametrize(
    "name, style, expected",
    [
        ("Cardiomegaly", "ct_clip", ("Cardiomegaly is present.", "Cardiomegaly is not present.")),
        ("Pleural effusion", "plain", ("pleural effusion.", "not pleural effusion.")),
        ("Pleural effusion", "there_is", ("There is pleural effusion.", "There is no pleural effusion.")),
        ("Lung nodule", "there_is", ("There are lung nodules.", "There are no lung nodules.")),
        (
            "Emphysema",
            "compatible",
            ("Findings are compatible with emphysema.", "Findings are not compatible with emphysema."),
        ),
        ("Lung nodule", "colipri_short", ("Lung nodules present", "No lung nodules present")),
        ("Lung nodule", "ct_clip", ("Lung nodule is present.", "Lung nodule is not present.")),
        ("Hemorrhage", "colipri_short", ("Hemorrhage present", "No hemorrhage present")),
    ],
)
def test_zero_shot_prompts(name, style, expected):
    assert zero_shot_prompts(name, style) == expected


def test_prompt_styles_are_the_published_pairs():
    assert PROMPT_STYLES == {
        "ct_clip": ("{X} is present.", "{X} is not present."),
        "plain": ("{x}.", "not {x}."),
        "there_is": ("There is {x}.", "There is no {x}."),
        "compatible": ("Findings are compatible with {x}.", "Findings are not compatible with {x}."),
        "colipri_short": ("{X} present", "No {x} present"),
    }


@pytest.mark.parametrize(
    "name, style, message",
    [("Cardiomegaly", "fancy", "fancy.*ct_clip"), ("Pneumothorax", "ct_clip", "Pneumothorax")],
)
def test_zero_shot_prompts_errors(name, style, message):
    with pytest.raises(ValueError, match=message):
        zero_shot_prompts(name, style)


@pytest.mark.parametrize(
    "name, present, style, expected",
    [
        ("Pleural effusion", True, "plain", "Pleural effusion is present."),
        ("Pleural effusion", False, "plain", "No pleural effusion."),
        ("Cardiomegaly", False, "there_is", "There is no cardiomegaly."),
        ("Lung nodule", True, "colipri_short", "Lung nodules present"),
    ],
)
def test_finding_sentence(name, present, style, expected):
    assert finding_sentence(name, present, style) == expected


def test_opposite_sentence_pairs_default_style():
    pairs = opposite_sentence_pairs({"Pleural effusion": True, "Lung nodule": False})
    assert pairs == [
        ("Pleural effusion is present.", "No pleural effusion."),
        ("No lung nodules.", "Lung nodule is present."),
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_opposite_of_the_opposite_flips_back(seed):
    findings = {"Pleural effusion": True, "Cardiomegaly": False, "Emphysema": True}
    pairs = opposite_sentence_pairs(findings, random.Random(seed))
    flipped = opposite_sentence_pairs({k: not v for k, v in findings.items()}, random.Random(seed))
    assert flipped == [(opposite, true) for true, opposite in pairs]


def test_opposite_sentence_pairs_seeded_rng_is_deterministic_and_varied():
    findings = dict.fromkeys(CT_RATE_ORDER, True)
    pairs = opposite_sentence_pairs(findings, random.Random(7))
    assert pairs == opposite_sentence_pairs(findings, random.Random(7))
    assert len({true.replace(name, "X") for (true, _), name in zip(pairs, findings)}) > 1


def test_opposite_sentence_pairs_restricted_styles():
    pairs = opposite_sentence_pairs({"Emphysema": False}, random.Random(0), styles=["there_is"])
    assert pairs == [("There is no emphysema.", "There is emphysema.")]


# ------------------------------------------------------------------------------------------------ augmentation


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_shuffle_keeps_sections_headers_and_sentences(seed):
    shuffled = shuffle_sentences(REPORT, random.Random(seed))
    before, after = split_sections(REPORT), split_sections(shuffled)
    assert list(after) == list(before)
    assert [Counter(split_sentences(after[k])) for k in after] == [Counter(split_sentences(before[k])) for k in before]


def test_shuffle_without_headers_keeps_the_multiset_and_is_deterministic():
    text = "No effusion. Small nodule. Mild emphysema. Heart size is normal. No lymphadenopathy."
    shuffled = shuffle_sentences(text, random.Random(3))
    assert Counter(split_sentences(shuffled)) == Counter(split_sentences(text))
    assert shuffled == shuffle_sentences(text, random.Random(3))
    assert shuffled != text


def test_short_sentence_report():
    findings = {"Pleural effusion": True, "Cardiomegaly": False, "Lung nodule": True}
    report = short_sentence_report(findings, random.Random(0))
    assert report == short_sentence_report(findings, random.Random(0))
    assert len(split_sentences(report)) == 3
    assert extract_findings(report) == findings
    assert len(split_sentences(short_sentence_report(findings, random.Random(0), max_sentences=2))) == 2
    assert short_sentence_report({}, random.Random(0)) == ""


@pytest.mark.parametrize("seed", range(5))
def test_augment_report_is_deterministic_for_a_seeded_rng(seed):
    findings = extract_findings(REPORT)
    first = augment_report(REPORT, findings, random.Random(seed))
    assert first == augment_report(REPORT, findings, random.Random(seed))


AUGMENT_FINDINGS = {"Lung nodule": True, "Pleural effusion": False, "Cardiomegaly": True}


def test_augment_report_plain_body():
    out = augment_report(REPORT, AUGMENT_FINDINGS, random.Random(0), shuffle_p=0.0, short_p=0.0)
    assert out == report_body(REPORT)


def test_augment_report_shuffled_body():
    out = augment_report(REPORT, AUGMENT_FINDINGS, random.Random(0), shuffle_p=1.0, short_p=0.0)
    assert Counter(split_sentences(out)) == Counter(split_sentences(report_body(REPORT)))


def test_augment_report_short_report():
    out = augment_report(REPORT, AUGMENT_FINDINGS, random.Random(0), shuffle_p=0.0, short_p=1.0)
    assert "Approx." not in out and extract_findings(out) == AUGMENT_FINDINGS


@pytest.mark.parametrize("shuffle_p, short_p", [(-0.1, 0.2), (0.5, 1.5)])
def test_augment_report_rejects_bad_probabilities(shuffle_p, short_p):
    with pytest.raises(ValueError, match="must be in"):
        augment_report(REPORT, AUGMENT_FINDINGS, random.Random(0), shuffle_p=shuffle_p, short_p=short_p)


def test_augment_report_without_findings_never_gives_a_short_report():
    assert augment_report(REPORT, {}, random.Random(0), shuffle_p=0.0, short_p=1.0) == report_body(REPORT)


def test_sentence_styles_cover_the_prompt_styles():
    assert set(SENTENCE_STYLES) == set(PROMPT_STYLES)
    assert SENTENCE_STYLES["plain"] == ("{X} is present.", "No {x}.")


# ----------------------------------------------------------------------------- structured findings (decoder target)


def _all_findings():
    return [(vocabulary, name) for vocabulary in ("ct_rate", "brain_mri") for name in get_vocabulary(vocabulary)]


@pytest.mark.parametrize("vocabulary, name", _all_findings())
def test_the_labeler_reads_a_structured_report_back_as_its_finding(vocabulary, name):
    report = structured_findings_report({name: True}, vocabulary)
    assert report == finding_sentence(name, True)
    assert extract_findings(report, vocabulary) == {name: True}


@pytest.mark.parametrize("vocabulary", ["ct_rate", "brain_mri"])
@pytest.mark.parametrize("seed", range(4))
def test_structured_reports_hold_the_present_findings_only_in_vocabulary_order(vocabulary, seed):
    rng = random.Random(seed)
    names = get_vocabulary(vocabulary)
    findings = {name: rng.random() < 0.4 for name in rng.sample(names, k=len(names) // 2 + seed)}
    findings = dict(reversed(list(findings.items())))  # the input's order must not matter
    present = [name for name in names if findings.get(name)]
    report = structured_findings_report(findings, vocabulary)
    if not present:
        assert report == NO_FINDINGS_SENTENCE
        return
    assert split_sentences(report) == [finding_sentence(name, True) for name in present]
    assert extract_findings(report, vocabulary) == {name: True for name in present}  # absent ones unmentioned


@pytest.mark.parametrize("vocabulary", ["ct_rate", "brain_mri"])
def test_every_finding_at_once_reads_back_whole(vocabulary):
    names = get_vocabulary(vocabulary)
    report = structured_findings_report(dict.fromkeys(names, True), vocabulary)
    assert extract_findings(report, vocabulary) == dict.fromkeys(names, True)


@pytest.mark.parametrize("findings", [{}, {"Cardiomegaly": False, "Pleural effusion": False}, {"Infarct": True}])
def test_no_present_finding_gives_the_no_findings_sentence(findings):
    report = structured_findings_report(findings, "ct_rate")  # Infarct is not a CT-RATE finding
    assert report == NO_FINDINGS_SENTENCE
    assert extract_findings(report, "ct_rate") == {}
