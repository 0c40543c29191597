"""Ingest of synthetic PACS exports checked against the generator's truth.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from client.cli import main as site_cli
from client.ingest.dicom import load_series, read_header
from client.ingest.pipeline import run_ingest
from client.site_config import load_site_config
from shared_models.cohort import read_manifest


@pytest.fixture(scope="module", params=["general", "neuro"])
def ingested(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    assert site_cli(["synth", "--out", str(root), "--profile", request.param, "--studies", "6", "--seed", "5"]) == 0
    reports = {"path": "reports.csv"}
    if request.param == "neuro":
        reports = {"path": "reports.jsonl", "key_column": "accession_number", "text_column": "text"}
    config = {"site_id": request.param, "cache_dir": "cache", "model": "tiny",
              "data": {"dicom_root": "dicom", "nifti_manifest": "nifti_manifest.csv", "reports": reports,
                       "modalities": ["CT", "MR"]},
              "compute": {"workers": 0}}
    (root / "site.yaml").write_text(yaml.safe_dump(config))
    cfg = load_site_config(root / "site.yaml")
    report = run_ingest(cfg, progress=False)
    truth = json.loads((root / "truth.json").read_text())
    return root, cfg, report, truth


def test_every_file_is_accounted_for(ingested):
    root, cfg, report, truth = ingested
    files = report["files"]
    written = len(list((root / "dicom").rglob("*"))) - sum(1 for p in (root / "dicom").rglob("*") if p.is_dir())
    nifti = sum(1 for s in truth["studies"] for series in s["series"] if series["format"] == "nifti")
    assert files["seen"] == written + nifti
    assert files["seen"] == files["ingested"] + files["skipped"] + files["failed"]
    assert files["failed"] == 0, report["reasons"]


def test_every_study_is_ingested_with_the_report_findings(ingested):
    root, cfg, report, truth = ingested
    rows = read_manifest(cfg.cache_dir)
    by_accession = {r["accession_number"]: r for r in rows}
    for study in truth["studies"]:
        row = by_accession[study["accession_number"]]
        assert row["report"].strip() == study["report"]["text"].strip()  # the right report joined the right study
        assert row["modality"] == study["modality"]
        if study["modality"] == "CT":  # the tiny model's vocabulary is CT-RATE's
            assert row["findings"] == study["report"]["mentions"]


def test_slice_order_spacing_and_values_at_planted_points(ingested):
    root, cfg, report, truth = ingested
    checked = 0
    for study in truth["studies"]:
        for series in study["series"]:
            if series["format"] == "nifti" or series["kind"] == "localizer" or not series.get("probes"):
                continue
            headers = [read_header(root / path) for path in sorted(set(series["files"]))]
            volume = load_series(headers, min_slices=1)
            assert volume.num_slices == series["num_slices"]
            assert np.allclose(sorted(volume.spacing), sorted(series["spacing_sar"]), atol=1e-3)
            to_voxel = np.linalg.inv(volume.affine) @ np.asarray(series["affine_sar"])
            for probe in series["probes"]:
                k, r, c = np.rint(to_voxel @ np.array([*probe["index_sar"], 1.0]))[:3].astype(int)
                assert volume.array[k, r, c] == pytest.approx(probe["value"], abs=1e-3), (series["description"], probe)
                checked += 1
    assert checked >= 10
