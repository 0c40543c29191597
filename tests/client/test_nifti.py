"""NIfTI loading: nibabel's shipped test images and small files written in tmp_path."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from client.ingest.nifti import load_nifti
from client.ingest.reasons import UNREADABLE_NIFTI, IngestError

ANATOMICAL = os.path.join(data_path, "anatomical.nii")


def test_anatomical_loads_with_its_affine():
    data, affine, spacing = load_nifti(ANATOMICAL)
    img = nib.load(ANATOMICAL)
    assert data.shape == (33, 41, 25) and data.dtype == np.float32
    np.testing.assert_array_equal(affine, img.affine)
    np.testing.assert_array_equal(data, img.get_fdata(dtype=np.float32))
    assert spacing == pytest.approx(tuple(np.linalg.norm(img.affine[:3, :3], axis=0)))
    assert spacing == pytest.approx(img.header.get_zooms()[:3])


@pytest.mark.parametrize("name", ["example4d.nii.gz", "functional.nii"])
def test_real_4d_series_is_refused(name):
    with pytest.raises(IngestError) as err:
        load_nifti(os.path.join(data_path, name))
    assert err.value.reason == UNREADABLE_NIFTI and "4D" in err.value.detail


def test_singleton_fourth_axis_is_squeezed(tmp_path):
    vol = np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "one.nii")
    data, aff, spacing = load_nifti(tmp_path / "one.nii")
    np.testing.assert_array_equal(data, vol[..., 0])
    assert spacing == (2.0, 3.0, 4.0) and np.array_equal(aff, affine)


def _patch_header(path: Path, **fields) -> None:
    """Overwrite fields of an uncompressed .nii's 348-byte header in place (nibabel reads and packs it)."""
    with open(path, "r+b") as fh:
        hdr = nib.Nifti1Header.from_fileobj(fh)
        for key, value in fields.items():
            hdr[key] = value
        fh.seek(0)
        fh.write(hdr.binaryblock)


def _truncated_gz(tmp_path: Path) -> Path:
    gz = gzip.compress(Path(ANATOMICAL).read_bytes())
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gz[: len(gz) // 2])
    return path


def _truncated_nii(tmp_path: Path) -> Path:
    raw = Path(ANATOMICAL).read_bytes()
    path = tmp_path / "cut.nii"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _text_nii(tmp_path: Path) -> Path:
    path = tmp_path / "notes.nii"
    path.write_text("patient notes, not an image\n" * 40)
    return path


def _nan_affine(tmp_path: Path) -> Path:
    path = tmp_path / "nan.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
    _patch_header(path, srow_x=[np.nan, 0.0, 0.0, 0.0], sform_code=1, qform_code=0)
    return path


def _two_d(tmp_path: Path) -> Path:
    path = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.zeros((5, 6), np.float32), np.eye(4)), path)
    return path


@pytest.mark.parametrize(("make", "why"), [
    (_truncated_gz, "voxel data"), (_truncated_nii, "voxel data"), (_text_nii, "ImageFileError"),
    (_nan_affine, "affine"), (_two_d, "2D"), (lambda tmp: tmp / "missing.nii", "No such file"),
])
def test_unusable_files_are_unreadable_nifti(tmp_path, make, why):
    with pytest.raises(IngestError) as err:
        load_nifti(make(tmp_path))
    assert err.value.reason == UNREADABLE_NIFTI and why in err.value.detail


def test_scl_slope_and_inter_are_applied(tmp_path):
    stored = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    path = tmp_path / "scaled.nii"
    nib.save(nib.Nifti1Image(stored, np.eye(4)), path)
    _patch_header(path, scl_slope=2.0, scl_inter=-10.0)  # stored int16 values kept, scaling added
    assert nib.load(path).get_data_dtype() == np.int16
    data, _, _ = load_nifti(path)
    np.testing.assert_array_equal(data, stored.astype(np.float32) * 2.0 - 10.0)
