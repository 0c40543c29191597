"""The synthetic site export: a readable DICOM/NIfTI tree whose geometry, reports and masks match truth.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from client.synth import write_synthetic_export
from shared_models.phantoms import MASK_LABELS
from shared_models.reports import extract_findings

PROFILES = ("general", "cardio", "pulmonary", "neuro", "central")
SEED, STUDIES = 5, 4


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for profile in PROFILES:
        summary = write_synthetic_export(root / profile, profile, STUDIES, SEED)
        assert summary.studies == STUDIES and summary.truth_path == root / profile / "truth.json"
        out[profile] = (root / profile, json.loads(summary.truth_path.read_text()))
    return out


def image_series(truth: dict):
    for study in truth["studies"]:
        for series in study["series"]:
            yield study, series


def load_dicom(out: Path, files: list[str]) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """(volume (S, A, R) after rescale, positions by S, InstanceNumbers in position order) of axial series,
    sorted along the slice normal as an ingest must."""
    datasets = [pydicom.dcmread(out / f) for f in files]
    if len(datasets) == 1 and "NumberOfFrames" in datasets[0]:
        ds = datasets[0]
        shared, per_frame = ds.SharedFunctionalGroupsSequence[0], ds.PerFrameFunctionalGroupsSequence

        def group(k, name):
            return getattr(per_frame[k] if name in per_frame[k] else shared, name)[0]

        iop = np.array(group(0, "PlaneOrientationSequence").ImageOrientationPatient, float)
        transform = group(0, "PixelValueTransformationSequence")
        frames = list(ds.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept))
        positions = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in per_frame]
        numbers = [int(f.FrameContentSequence[0].InStackPositionNumber) for f in per_frame]
    else:
        iop = np.array(datasets[0].ImageOrientationPatient, float)
        frames = [d.pixel_array * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0))
                  for d in datasets]
        positions = [np.array(d.ImagePositionPatient, float) for d in datasets]
        numbers = [int(d.InstanceNumber) for d in datasets]
    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort([p @ normal * np.sign(normal[2]) for p in positions])       # inferior -> superior
    vol = np.stack([frames[k] for k in order])
    if iop[4] > 0:                                                                # rows run posterior
        vol = vol[:, ::-1]
    if iop[0] > 0:                                                                # columns run to the left
        vol = vol[:, :, ::-1]
    return vol, [positions[k] for k in order], [numbers[k] for k in order]


def load_nifti_sar(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(path))
    return np.asarray(img.dataobj).transpose(2, 1, 0), img.affine


def test_every_file_is_accounted_for_and_every_dicom_reads_back(exports):
    for profile, (out, truth) in exports.items():
        listed = {f for _, s in image_series(truth) for f in s["files"]}
        junk = {j["path"] for j in truth["non_image_files"]}
        on_disk = {p.relative_to(out).as_posix() for p in (out / "dicom").rglob("*") if p.is_file()}
        on_disk |= {p.relative_to(out).as_posix() for p in (out / "nifti").glob("*")}
        assert on_disk == listed | junk, profile
        assert "dicom/README.txt" in junk
        for rel in sorted(f for f in listed if f.startswith("dicom/")):
            ds = pydicom.dcmread(out / rel)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian and ds.BitsAllocated == 16
            assert ds.pixel_array.shape[-2:] == (ds.Rows, ds.Columns)
        for j in truth["non_image_files"]:
            if j["kind"] == "dicomdir":
                assert "PixelData" not in pydicom.dcmread(out / j["path"])
            else:
                with pytest.raises(pydicom.errors.InvalidDicomError):
                    pydicom.dcmread(out / j["path"])


def test_uids_and_accession_numbers_are_unique(exports):
    sops, series, studies, accessions = [], [], [], []
    for out, truth in exports.values():
        for study, s in image_series(truth):
            series.append(s["series_uid"])
            for rel in (f for f in s["files"] if f.startswith("dicom/")):
                ds = pydicom.dcmread(out / rel, stop_before_pixels=True)
                assert ds.SeriesInstanceUID == s["series_uid"] and ds.StudyInstanceUID == study["study_uid"]
                assert ds.AccessionNumber == study["accession_number"] and ds.PatientID == study["patient_id"]
                assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
                sops.append(ds.SOPInstanceUID)
        studies += [s["study_uid"] for s in truth["studies"]]
        accessions += [s["accession_number"] for s in truth["studies"]]
    for uids in (sops, series, studies, accessions):
        assert len(uids) == len(set(uids))


def test_geometry_and_values_round_trip_exactly(exports):
    seen = set()
    for profile, (out, truth) in exports.items():
        for study, s in image_series(truth):
            if s["kind"] == "localizer":
                for rel in s["files"]:
                    assert "LOCALIZER" in pydicom.dcmread(out / rel).ImageType
                seen.add("localizer")
                continue
            if s["format"] == "nifti":
                vol, affine = load_nifti_sar(out / s["files"][0])
                assert np.allclose(affine[:, [2, 1, 0, 3]], s["affine_sar"], atol=1e-3)
                seen.add(f"nifti-{s['nifti_layout']}")
            else:
                vol, positions, numbers = load_dicom(out, s["files"])
                assert positions[0][2] == pytest.approx(s["z_first_mm"], abs=1e-3)
                assert positions[-1][2] == pytest.approx(s["z_last_mm"], abs=1e-3)
                seen |= {s["format"], s["orientation_variant"], s["instance_order"], s["rescale"]["encoding"]}
                if s["format"] == "dicom" and numbers != sorted(numbers):
                    seen.add("instance-order-differs-from-position")
            assert list(vol.shape) == s["shape_sar"], (profile, s["series_uid"])
            for probe in s["probes"]:
                assert vol[tuple(probe["index_sar"])] == probe["value"], (profile, s["format"], probe)
    assert seen >= {"dicom", "dicom-multiframe", "nifti-RAS", "nifti-LAS", "localizer", "standard", "flipped-rows",
                    "flipped-columns", "ascending", "descending", "shuffled", "signed", "signed-half", "unsigned",
                    "unsigned-half", "instance-order-differs-from-position"}


def test_reports_parse_one_per_study_and_match_the_labeler(exports):
    multiline = 0
    for profile, (out, truth) in exports.items():
        if profile == "neuro":
            rows = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
            keyed = [(r["accession_number"], r["study_uid"], r["text"]) for r in rows]
            vocabulary = "brain_mri"
        else:
            with open(out / "reports.csv", newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            assert list(rows[0]) == ["AccessionNumber", "StudyInstanceUID", "ReportText", "ReportDate"]
            keyed = [(r["AccessionNumber"], r["StudyInstanceUID"], r["ReportText"]) for r in rows]
            vocabulary = "ct_rate"
        by_accession = {a: (uid, text) for a, uid, text in keyed}
        assert len(by_accession) == len(keyed) == len(truth["studies"])
        for study in truth["studies"]:
            uid, text = by_accession[study["accession_number"]]
            assert uid == study["study_uid"] and text == study["report"]["text"]
            multiline += profile != "neuro" and "\n" in text                    # CSV quoting of multi-line text
            assert extract_findings(text, vocabulary) == study["report"]["mentions"]
            assert all(study["report"]["mentions"][n] for n, planted in study["findings"].items() if planted)
    assert multiline > 5


def test_nifti_manifest_and_masks_load_on_the_primary_grid(exports):
    for profile, (out, truth) in exports.items():
        manifest = out / truth["nifti_manifest"]                             # header-only when all is DICOM
        with open(manifest, newline="") as f:
            header, *rows = list(csv.reader(f))
        assert header == ["path", "study_id", "series_id", "modality", "accession_number"]
        nifti = {s["series_uid"]: (st, s) for st, s in image_series(truth) if s["format"] == "nifti"}
        assert len(rows) == len(nifti)
        for path, study_id, series_id, modality, accession in rows:
            study, series = nifti[series_id]
            assert (path, study_id, modality, accession) == (series["files"][0], study["study_uid"], study["modality"],
                                                              study["accession_number"])
            assert nib.load(manifest.parent / path).shape == tuple(series["shape_sar"][::-1])
        for study in truth["studies"]:
            primary = next(s for s in study["series"] if s["kind"] == "primary")
            labels = {name: MASK_LABELS.index(name) + 1 for name in study["findings"]}
            findings_mask, affine = load_nifti_sar(out / study["masks"]["findings"])
            organs, organs_affine = load_nifti_sar(out / study["masks"]["organs"])
            assert list(findings_mask.shape) == list(organs.shape) == primary["shape_sar"]
            assert np.allclose(affine[:, [2, 1, 0, 3]], primary["affine_sar"], atol=1e-3)
            assert np.allclose(organs_affine, affine) and organs.max() >= 2
            present = set(np.unique(findings_mask)) - {0}
            planted = {labels[n] for n, is_planted in study["findings"].items() if is_planted}
            assert present == planted, study["accession_number"]


def test_profiles_differ_in_spacing_and_mr_studies_are_coregistered(exports):
    slice_spacing = {p: {s["spacing_sar"][0] for _, s in image_series(t) if s["kind"] == "primary"}
                     for p, (_, t) in exports.items()}
    assert slice_spacing["cardio"] == {2.5} and min(slice_spacing["pulmonary"]) >= 4.0
    assert slice_spacing["general"].isdisjoint(slice_spacing["cardio"])
    out, truth = exports["neuro"]
    for study in truth["studies"]:
        assert study["modality"] == "MR"
        mr = [s for s in study["series"] if s["kind"] != "localizer"]
        assert sorted(s["sequence"] for s in mr) == ["FLAIR", "T1", "T2"]
        assert all(s["affine_sar"] == mr[0]["affine_sar"] for s in mr)
        frames = {pydicom.dcmread(out / s["files"][0], stop_before_pixels=True).FrameOfReferenceUID
                  for s in mr if s["format"] != "nifti"}
        assert len(frames) <= 1


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first, again = (write_synthetic_export(tmp_path / name, "cardio", 2, 11) for name in ("first", "again"))
    assert again.truth_path.read_bytes() == first.truth_path.read_bytes()
    truth = json.loads(first.truth_path.read_text())
    files = [f for _, s in image_series(truth) for f in s["files"]]
    masks = truth["studies"][0]["masks"]
    for rel in (files[0], files[-1], "reports.csv", masks["findings"], masks["organs"]):
        assert (tmp_path / "again" / rel).read_bytes() == (tmp_path / "first" / rel).read_bytes(), rel
    other = write_synthetic_export(tmp_path / "other", "cardio", 1, 12)
    assert json.loads(other.truth_path.read_text())["studies"][0]["study_uid"] != truth["studies"][0]["study_uid"]


def test_refuses_a_non_empty_folder_and_unknown_profiles(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        write_synthetic_export(tmp_path / "x", "general", 1, 0)
    with pytest.raises(ValueError, match="neuro"):
        write_synthetic_export(tmp_path / "y", "nowhere", 1, 0)
    with pytest.raises(ValueError, match="studies"):
        write_synthetic_export(tmp_path / "z", "general", 0, 0)
