"""Synthetic phantoms: determinism, planted findings where intended, MR co-registration, site profiles,
and report text that the findings labeler reads back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from shared_models.phantom_reports import _BRAIN, _CT, _IMPRESSION, REPORT_STYLES, _fields, compose_report, write_report
from shared_models.phantoms import (
    BRAIN_FINDINGS, BRAIN_ORGANS, CHEST_FINDINGS, CHEST_ORGANS, MASK_LABELS, SEQUENCES, SITE_PROFILES, brain_mr_phantom,
    chest_ct_phantom, sample_modality, sample_study, scan_geometry,
)
from shared_models.reports import extract_findings
from shared_models.vocabularies import BRAIN_MRI_FINDINGS, CT_RATE_FINDINGS

CT_SHAPE, CT_SPACING = (64, 96, 96), (5.0, 4.0, 4.0)
MR_SHAPE, MR_SPACING = (36, 96, 96), (5.0, 2.5, 2.5)


def ct(findings=(), seed=0):
    return chest_ct_phantom(set(findings), np.random.default_rng(seed), CT_SHAPE, CT_SPACING)


def mr(findings=(), seed=0, sequence="FLAIR"):
    return brain_mr_phantom(set(findings), np.random.default_rng(seed), sequence, MR_SHAPE, MR_SPACING)


def label(name):
    return MASK_LABELS.index(name) + 1


def test_vocabulary_names_and_mask_labels():
    assert len(CHEST_FINDINGS) >= 8 and set(CHEST_FINDINGS) <= set(CT_RATE_FINDINGS)
    assert len(BRAIN_FINDINGS) >= 4 and set(BRAIN_FINDINGS) <= set(BRAIN_MRI_FINDINGS)
    assert MASK_LABELS == CHEST_FINDINGS + BRAIN_FINDINGS and len(MASK_LABELS) < 255


@pytest.mark.parametrize("make", [ct, mr])
def test_same_seed_same_arrays_other_seed_differs(make):
    names = CHEST_FINDINGS if make is ct else BRAIN_FINDINGS
    a, b, c = make(names[:3], seed=5), make(names[:3], seed=5), make(names[:3], seed=6)
    for field in ("volume", "organs", "findings_mask"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert a.details == b.details and a.findings == b.findings
    assert not np.array_equal(a.volume, c.volume)


def test_chest_phantom_types_and_anatomy():
    p = ct()
    assert p.volume.dtype == np.int16 and p.organs.dtype == np.uint8 and p.findings_mask.dtype == np.uint8
    assert p.volume.shape == p.organs.shape == p.findings_mask.shape == CT_SHAPE and p.spacing == CT_SPACING
    assert set(p.findings) == set(CHEST_FINDINGS) and not any(p.findings.values()) and not p.findings_mask.any()
    hu = {name: float(np.median(p.volume[p.organs == lab])) for name, lab in CHEST_ORGANS.items()}
    assert hu["lungs"] < -750 and -60 < hu["heart"] < 300 and hu["bone"] > 350 and hu["airway"] < -900
    assert float(np.median(p.volume[p.organs == 0])) < -950                       # air outside the body
    lungs = np.argwhere(p.organs == CHEST_ORGANS["lungs"])
    assert {0, 1} == {int(i) for i in (lungs[:, 2] > CT_SHAPE[2] / 2)}           # a lung on each side


@pytest.mark.parametrize("name", CHEST_FINDINGS)
def test_each_chest_finding_changes_only_its_own_region(name):
    without, with_ = ct(), ct([name])
    mask = with_.findings_mask == label(name)
    assert mask.sum() >= 8, f"{name} is too small to be seen at 5 mm ({mask.sum()} voxels)"
    assert set(np.unique(with_.findings_mask)) == {0, label(name)}
    changed = with_.volume != without.volume
    assert changed.any() and not (changed & ~mask).any()
    assert with_.findings[name] and name in with_.details


def test_chest_findings_look_as_intended():
    p, q = ct(CHEST_FINDINGS, seed=3), ct(seed=3)
    vol, lung = p.volume.astype(float), CHEST_ORGANS["lungs"]

    def region(name):
        return p.findings_mask == label(name)

    eff = region("Pleural effusion")
    lung_idx = np.argwhere(q.organs == lung)
    eff_idx = np.argwhere(eff)
    assert -20 < vol[eff].mean() < 45 and (p.organs[eff] == lung).all()
    assert eff_idx[:, 1].mean() < lung_idx[:, 1].mean() - 3                       # dependent: posterior
    assert eff_idx[:, 0].mean() < lung_idx[:, 0].mean()                           # at the lung base
    assert (q.volume[eff] < -600).mean() > 0.9                                     # aerated lung when absent
    assert (p.organs == CHEST_ORGANS["heart"]).sum() > 1.8 * (q.organs == CHEST_ORGANS["heart"]).sum()
    nodule = region("Lung nodule")
    assert (p.organs[nodule] == lung).all() and 0 < vol[nodule].mean() < 80
    emph = region("Emphysema")
    assert vol[emph].mean() < -920 and np.argwhere(emph)[:, 0].mean() > lung_idx[:, 0].mean()
    assert -20 < vol[region("Consolidation")].mean() < 60
    assert -25 < vol[region("Pericardial effusion")].mean() < 45
    assert vol[region("Arterial wall calcification")].mean() > 450
    assert vol[region("Medical material")].max() >= 2000


def test_chest_scanner_offset_noise_and_field_of_view():
    from shared_models.phantoms import ScannerProfile

    quiet = ScannerProfile("q", "m", "m", "CT", (96,), (380.0, 380.0), (5.0,), (300.0, 300.0), noise_std=1.0)
    loud = ScannerProfile("l", "m", "m", "CT", (96,), (380.0, 380.0), (5.0,), (300.0, 300.0), noise_std=30.0,
                          offset=25.0, fov_pad=-3024)
    a = chest_ct_phantom(set(), np.random.default_rng(1), CT_SHAPE, CT_SPACING, quiet)
    b = chest_ct_phantom(set(), np.random.default_rng(1), CT_SHAPE, CT_SPACING, loud)
    inside = a.organs == CHEST_ORGANS["liver"]
    assert 15 < (b.volume[inside].astype(float) - a.volume[inside]).mean() < 35
    assert b.volume[inside].std() > 5 * a.volume[inside].std()
    assert b.volume[0, 0, 0] == -3024 and b.volume[0, 48, 48] != -3024             # corners outside the circle


@pytest.mark.parametrize("name", BRAIN_FINDINGS)
def test_each_brain_finding_is_planted(name):
    without, with_ = mr(), mr([name])
    mask = with_.findings_mask == label(name)
    assert mask.sum() >= 8 and set(np.unique(with_.findings_mask)) == {0, label(name)}
    changed = with_.volume != without.volume
    if name != "Atrophy":                                                          # atrophy thins the whole cortex
        assert not (changed & ~mask).any()
    assert not without.findings_mask.any()


def test_brain_sequences_are_coregistered_with_sequence_dependent_contrast():
    names = ("Infarct", "White matter hyperintensities", "Hydrocephalus")
    t1, t2, flair = (mr(names, seed=4, sequence=s) for s in SEQUENCES)
    for other in (t2, flair):
        assert np.array_equal(t1.organs, other.organs) and np.array_equal(t1.findings_mask, other.findings_mask)
        assert not np.array_equal(t1.volume, other.volume) and t1.details == other.details
    assert t1.volume.dtype == np.uint16

    def contrast(p, name):
        return p.volume[p.findings_mask == label(name)].mean() / p.volume[p.organs == BRAIN_ORGANS["brain"]].mean()

    assert contrast(t1, "Infarct") < 0.9 and contrast(t2, "Infarct") > 1.2 and contrast(flair, "Infarct") > 1.2
    assert contrast(flair, "White matter hyperintensities") > 1.3
    csf = flair.findings_mask == label("Hydrocephalus")
    assert flair.volume[csf].mean() < 0.5 * flair.volume[flair.organs == BRAIN_ORGANS["brain"]].mean()  # dark CSF
    assert t2.volume[csf].mean() > 1.5 * t2.volume[t2.organs == BRAIN_ORGANS["brain"]].mean()
    normal = mr(seed=4)
    ratio = (t1.organs == BRAIN_ORGANS["ventricles"]).sum() / (normal.organs == BRAIN_ORGANS["ventricles"]).sum()
    assert ratio > 2
    atrophic = mr(["Atrophy"], seed=4)
    csf_id = BRAIN_ORGANS["csf"]
    assert (atrophic.organs == csf_id).sum() > 1.5 * (normal.organs == csf_id).sum()


def test_unknown_findings_and_sequences_are_refused():
    with pytest.raises(ValueError, match="Infarct"):
        ct(["Infarct"])
    with pytest.raises(ValueError, match="Lung nodule"):
        mr(["Lung nodule"])
    with pytest.raises(ValueError, match="DWI"):
        brain_mr_phantom(set(), np.random.default_rng(0), "DWI")


def test_profiles_differ_in_prevalence_as_specified():
    assert {"general", "cardio", "pulmonary", "neuro", "central"} <= set(SITE_PROFILES)
    observed = {}
    for name, prof in SITE_PROFILES.items():
        rng = np.random.default_rng(0)
        studies = [sample_study(prof, rng) for _ in range(300)]
        for finding in studies[0]:
            rate = np.mean([s[finding] for s in studies])
            assert abs(rate - prof.prevalence[finding]) < 0.1, (name, finding, rate)
            observed[name, finding] = rate
    assert observed["cardio", "Cardiomegaly"] > observed["general", "Cardiomegaly"] + 0.15
    calcification = "Arterial wall calcification"
    assert observed["cardio", calcification] > observed["pulmonary", calcification] + 0.3
    assert observed["pulmonary", "Emphysema"] > observed["cardio", "Emphysema"] + 0.3
    assert observed["pulmonary", "Lung nodule"] > observed["general", "Lung nodule"] + 0.15
    assert sample_modality("neuro", np.random.default_rng(0)) == "MR"
    assert set(sample_study("neuro", np.random.default_rng(0))) == set(BRAIN_FINDINGS)


def test_scan_geometry_stays_small_and_follows_the_scanner():
    for prof in SITE_PROFILES.values():
        for scanner in (s for group in prof.scanners.values() for s in group):
            rng = np.random.default_rng(0)
            for _ in range(20):
                shape, spacing, thickness = scan_geometry(scanner, rng)
                assert 96 <= shape[1] == shape[2] <= 160 and 25 <= shape[0] <= 125
                low, high = (2.2, 4.2) if scanner.modality == "CT" else (1.5, 2.6)   # brain FOV ~230 mm
                assert spacing[0] in scanner.slice_spacing_mm and low <= spacing[1] == spacing[2] <= high
                assert thickness >= spacing[0]
    with pytest.raises(ValueError, match="general"):
        sample_study("nowhere", np.random.default_rng(0))


def _bank_name(key):
    return {"Lung nodules": "Lung nodule", "Pleural effusions": "Pleural effusion"}.get(key, key.split("/")[0])


@pytest.mark.parametrize("bank, vocabulary", [(_CT, "ct_rate"), (_BRAIN, "brain_mri")])
def test_every_phrasing_is_read_right_by_the_labeler(bank, vocabulary):
    rng = np.random.default_rng(0)
    positives: dict[str, int] = {}
    for key, (pos, neg) in bank.items():
        name = _bank_name(key)
        positives[name] = positives.get(name, 0) + len(pos)
        sides = ["bilateral"] if key == "Pleural effusions" else ["left", "right"]
        for template in pos + _IMPRESSION.get(key, ()):
            for side in sides:
                text = template.format(**_fields(name, {"side": side}, rng))
                assert extract_findings(text, vocabulary) == {name: True}, text
        for text in neg:
            assert extract_findings(text, vocabulary) == {name: False}, text
        assert key != name or len(neg) >= 3, f"{name} needs 3 negative phrasings"
    assert all(n >= 3 for n in positives.values()), positives


def test_reports_agree_with_the_labeler_on_500_random_cases():
    agree, styles = 0, set()
    for i in range(500):
        rng = np.random.default_rng(i)
        mri = i % 3 == 0
        names, vocabulary = (BRAIN_FINDINGS, "brain_mri") if mri else (CHEST_FINDINGS, "ct_rate")
        findings = {n: bool(rng.random() < 0.4) for n in names}
        report = compose_report(findings, rng, REPORT_STYLES[int(rng.integers(len(REPORT_STYLES)))])
        styles.add(report.style)
        assert all(report.mentions[n] for n, planted in findings.items() if planted)
        assert all(not report.mentions.get(n, False) for n, planted in findings.items() if not planted)
        labels = extract_findings(report.text, vocabulary)
        agree += labels == report.mentions
        assert "FINDINGS" in report.text.upper() and "IMPRESSION" in report.text.upper()
    assert agree == 500 and styles == set(REPORT_STYLES)


def test_reports_vary_use_the_phantom_details_and_leave_some_findings_out():
    p = ct(["Pleural effusion", "Lung nodule"], seed=2)
    texts = {write_report(p.findings, np.random.default_rng(k), "structured", p.details) for k in range(40)}
    assert len(texts) == 40
    side = p.details["Pleural effusion"]["side"]
    assert all(side in t.split("IMPRESSION")[0].lower() for t in texts)
    omitted = [compose_report(p.findings, np.random.default_rng(k)).mentions for k in range(40)]
    assert any(len(m) < len(CHEST_FINDINGS) for m in omitted)
    with pytest.raises(ValueError, match="style"):
        write_report(p.findings, np.random.default_rng(0), "haiku")
