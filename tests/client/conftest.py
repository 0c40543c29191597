"""Fixtures for site-side tests: a writer of small CT series and a site YAML over a folder."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import yaml


def write_ct_series(
    folder: Path,
    study_uid: str,
    series_uid: str,
    accession: str,
    slices: int = 20,
    size: int = 32,
    spacing: tuple[float, float, float] = (2.5, 1.5, 1.5),
    z_positions: list[float] | None = None,
    modality: str = "CT",
    pixel_spacing: tuple[float, float] | None = None,
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
    seed: int = 0,
    rows_per_slice: list[int] | None = None,
) -> list[Path]:
    """Write a CT series (shuffled file names), HU = slice index * 10 + a pattern; returns the paths."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    z_positions = z_positions if z_positions is not None else [i * spacing[0] for i in range(slices)]
    order = list(range(len(z_positions)))
    rng.shuffle(order)
    paths = []
    for k in order:
        rows = rows_per_slice[k] if rows_per_slice else size
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.AccessionNumber, ds.PatientID, ds.StudyDate = accession, f"P-{accession}", "20260101"
        ds.Modality, ds.SeriesDescription = modality, "test series"
        ds.ImageType = image_type
        ds.InstanceNumber = rng.randint(1, 9999)
        ds.ImagePositionPatient = [0.0, 0.0, float(z_positions[k])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = list(pixel_spacing if pixel_spacing is not None else spacing[1:])
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = rows, size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        pixels = (np.full((rows, size), 1024 + 10 * k) + np.arange(size)[None, :]).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        path = folder / f"{rng.getrandbits(40):010x}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_site_yaml(root: Path, **overrides) -> Path:
    """A site YAML over ``root/dicom`` and ``root/reports.csv`` with a cache in ``root/cache``."""
    cfg = {
        "site_id": "test-site",
        "cache_dir": str(root / "cache"),
        "data": {"dicom_root": str(root / "dicom"), "reports": {"path": str(root / "reports.csv")}, "min_slices": 8},
        "compute": {"workers": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = root / "site.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def ct_series_writer():
    return write_ct_series


@pytest.fixture
def site_yaml_writer():
    return write_site_yaml
