"""DICOM header scan and series assembly: pydicom's shipped test files and synthetic series in tmp_path."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from client.ingest import reasons as R
from client.ingest.dicom import DicomHeader, load_series, read_header
from client.ingest.reasons import IngestError

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
CT5N = TEST_FILES / "dicomdirtests" / "98892001" / "CT5N"

AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


def _rot(axis: str, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


_OBL = _rot("z", 30) @ _rot("x", 20)
ORIENTATIONS = {  # (row cosines, column cosines) in DICOM LPS
    "axial": AXIAL,
    "axial_flipped_rows": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "oblique": (tuple(_OBL[:, 0]), tuple(_OBL[:, 1])),
}


def _ds(values) -> list[DSfloat | str]:
    """DS values; a non-finite one is written as the (invalid) string "NaN"/"inf", as broken exports do."""
    return [DSfloat(float(v), auto_format=True) if math.isfinite(v) else str(v) for v in values]


def make_slice(pixels: np.ndarray, *, position, orientation=AXIAL, spacing=(0.75, 1.25), slope=1.0,
               intercept=0.0, modality="CT", series_uid="1.2.3.4", study_uid="1.2.3", instance=1,
               image_type=("ORIGINAL", "PRIMARY", "AXIAL"), thickness=2.5, pixel_data=True) -> Dataset:
    """One single-frame CT/MR slice (int16 stored values) as a pydicom Dataset ready for save_as."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.PatientID, ds.AccessionNumber = modality, "PAT1", "ACC1"
    ds.StudyDate, ds.SeriesDescription = "20240102", "synthetic"
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    if position is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on the invalid "nan" of the NaN case
            ds.ImagePositionPatient = _ds(position)
    ds.ImageOrientationPatient = _ds(list(orientation[0]) + list(orientation[1]))
    ds.PixelSpacing = _ds(spacing)
    if thickness is not None:
        ds.SliceThickness = DSfloat(thickness, auto_format=True)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = DSfloat(slope, auto_format=True), DSfloat(intercept, auto_format=True)
    if pixel_data:
        ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def write_series(folder: Path, volume: np.ndarray, positions, seed: int = 0, per_slice=None, **kw) -> list[Path]:
    """Write ``volume[i]`` at ``positions[i]`` under shuffled file names and InstanceNumbers.

    ``per_slice``: optional {index: {make_slice overrides}} for the bad cases.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = rng.permutation(len(volume))
    instances = rng.permutation(len(volume)) + 1
    paths = []
    for i in range(len(volume)):
        args = {**kw, "position": positions[i], "instance": int(instances[i]), **(per_slice or {}).get(i, {})}
        pixels = args.pop("pixels", volume[i])
        path = folder / f"IM{names[i]:04d}.dcm"
        make_slice(pixels, **args).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def headers_of(paths) -> list[DicomHeader]:
    return [read_header(p) for p in paths]


def z_positions(n: int, step: float = 2.5, z0: float = -10.0):
    return [(-20.0, 30.0, z0 + i * step) for i in range(n)]


# --- pydicom's shipped files -------------------------------------------------------------------------------


def test_ct_small_header_fields_match_pydicom():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    h = read_header(path)
    assert (h.modality, h.rows, h.columns, h.number_of_frames) == ("CT", 128, 128, 1)
    assert (h.study_uid, h.series_uid, h.sop_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert h.sop_class_uid == CTImageStorage and h.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert h.image_position == tuple(float(v) for v in ds.ImagePositionPatient)
    assert h.image_orientation == tuple(float(v) for v in ds.ImageOrientationPatient)
    assert h.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert h.slice_thickness == float(ds.SliceThickness) and h.instance_number == int(ds.InstanceNumber)
    assert h.image_type == tuple(ds.ImageType) and h.has_pixel_data
    assert h.size == os.path.getsize(path) and h.path == str(path)
    # the orchestrator caches asdict() as JSON: it must round-trip to an equal header
    assert DicomHeader.from_dict(json.loads(json.dumps(dataclasses.asdict(h)))) == h


def test_mr_small_header():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    h = read_header(path)
    assert (h.modality, h.rows, h.columns, h.number_of_frames) == ("MR", 64, 64, 1)
    assert h.sop_class_uid == MRImageStorage and h.series_uid == ds.SeriesInstanceUID
    assert h.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert h.image_orientation == tuple(float(v) for v in ds.ImageOrientationPatient)


def test_ct5n_series_assembles_sorted_by_position_with_hu():
    headers = headers_of(sorted(CT5N.iterdir()))
    with pytest.raises(IngestError) as err:  # five slices: too few under the default minimum of 8
        load_series(headers)
    assert err.value.reason == R.SERIES_TOO_SMALL
    vol = load_series(headers, min_slices=5)
    assert vol.array.shape == (5, 16, 16) and vol.array.dtype == np.float32 and vol.num_slices == 5
    assert vol.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in vol.source_files]
    assert z == sorted(z)  # ascending along the normal (0, 0, 1), whatever the file names say
    for k, f in enumerate(vol.source_files):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.array[k], hu.astype(np.float32))
    first = pydicom.dcmread(vol.source_files[0]).ImagePositionPatient
    np.testing.assert_allclose(vol.affine[:3, 3], [-float(first[0]), -float(first[1]), float(first[2])])


@pytest.mark.parametrize(("folder", "reason"), [
    ("98892003/MR700", R.INCONSISTENT_GEOMETRY),  # radial projections: one orientation per image
    ("77654033/CT2", R.MISSING_SLICES),  # one slice 200 mm away from the other three
])
def test_shipped_series_that_are_not_stacks(folder, reason):
    headers = headers_of(sorted((TEST_FILES / "dicomdirtests" / folder).iterdir()))
    with pytest.raises(IngestError) as err:
        load_series(headers, min_slices=1)
    assert err.value.reason == reason and headers[0].series_uid in err.value.detail


@pytest.mark.parametrize(("name", "reason", "why"), [
    ("rtdose.dcm", R.NOT_AN_IMAGE_SERIES, "RT Dose Storage"),  # the base wheel's multi-frame file: a dose grid
    ("test-SR.dcm", R.NOT_AN_IMAGE_SERIES, "SR Storage"),
    ("rtplan.dcm", R.NOT_AN_IMAGE_SERIES, "RT Plan"),
    ("dicomdirtests/DICOMDIR", R.NOT_AN_IMAGE_SERIES, "Directory"),
    ("dicomdirtests/98892001/CT2N/6293", R.NOT_AN_IMAGE_SERIES, "LOCALIZER"),
    ("SC_rgb_small_odd.dcm", R.NOT_AN_IMAGE_SERIES, "colour"),
    ("MR_truncated.dcm", R.UNREADABLE_DICOM, "truncated"),
    ("dicomdirtests/README.txt", R.NOT_DICOM, "DICM"),
])
def test_shipped_files_refused(name, reason, why):
    with pytest.raises(IngestError) as err:
        read_header(TEST_FILES / name)
    assert err.value.reason == reason and why in err.value.detail


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm"])
def test_compressed_files_are_refused_exactly_when_no_decoder_is_installed(name):
    """Which decoders exist depends on the installation (Pillow decodes JPEG 2000, not JPEG-LS)."""
    path = get_testdata_file(name)
    syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if get_decoder(syntax).is_available:
        assert read_header(path).transfer_syntax_uid == syntax
    else:
        with pytest.raises(IngestError) as err:
            read_header(path)
        assert err.value.reason == R.UNSUPPORTED_TRANSFER_SYNTAX and syntax.name in err.value.detail


def test_jpeg_ls_has_no_decoder_in_this_installation():
    """The project installs no JPEG-LS decoder, so the refusal path above is exercised."""
    assert not get_decoder(JPEGLSLossless).is_available


def test_rle_header_is_accepted_since_pydicom_decodes_it_natively():
    assert read_header(get_testdata_file("MR_small_RLE.dcm")).transfer_syntax_uid == "1.2.840.10008.1.2.5"


# --- synthetic series ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("descending", [False, True])
def test_shuffled_names_and_instances_are_ordered_by_position(tmp_path, descending):
    known = np.arange(9 * 4 * 5, dtype=np.int16).reshape(9, 4, 5)
    positions = z_positions(9)
    if descending:  # file i lies below file i-1: the volume must come out reversed
        positions = positions[::-1]
    vol = load_series(headers_of(write_series(tmp_path, known, positions, seed=3)))
    np.testing.assert_array_equal(vol.array, (known[::-1] if descending else known).astype(np.float32))
    assert vol.spacing == pytest.approx((2.5, 0.75, 1.25))


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_voxel_indices_map_to_the_written_ras_points(tmp_path, name):
    row, col = (np.array(v) for v in ORIENTATIONS[name])
    normal = np.cross(row, col)
    n, rows, cols, ps, step = 8, 4, 5, (0.75, 1.25), 2.5
    origin = np.array([-20.0, 30.0, -40.0])
    positions = [origin + (n - 1 - s) * step * normal for s in range(n)]  # written top-down
    ids = np.arange(n * rows * cols, dtype=np.int16).reshape(n, rows, cols)  # value = (slice, r, c) id
    vol = load_series(headers_of(write_series(tmp_path, ids, positions, orientation=(tuple(row), tuple(col)),
                                              spacing=ps, seed=1)))
    k, r, c = np.indices(vol.array.shape).reshape(3, -1)
    s, rr, cc = np.unravel_index(vol.array[k, r, c].astype(int), ids.shape)
    np.testing.assert_array_equal((rr, cc), (r, c))  # rows and columns are not transposed or flipped
    lps = np.array(positions)[s] + cc[:, None] * ps[1] * row + rr[:, None] * ps[0] * col
    ras = lps * np.array([-1.0, -1.0, 1.0])  # DICOM LPS -> RAS: negate x and y
    world = (vol.affine @ np.stack([k, r, c, np.ones_like(k)]))[:3].T
    np.testing.assert_allclose(world, ras, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, np.linalg.norm(vol.affine[:3, :3], axis=0))
    np.testing.assert_allclose(vol.spacing, (step, *ps))
    if name == "axial_flipped_rows":  # columns run towards patient right: +x in RAS
        np.testing.assert_allclose(vol.affine[:3, 2], [ps[1], 0.0, 0.0], atol=1e-12)


@pytest.mark.parametrize(("modality", "slope", "intercept"), [("CT", 0.5, -1024.0), ("CT", 1.0, -1024.0),
                                                            ("MR", 2.0, 0.0), ("MR", None, None)])
def test_rescale_gives_exact_values(tmp_path, modality, slope, intercept):
    stored = np.random.default_rng(0).integers(0, 4000, size=(8, 6, 7)).astype(np.int16)
    vol = load_series(headers_of(write_series(tmp_path, stored, z_positions(8), modality=modality,
                                              slope=slope, intercept=intercept)))
    expected = stored.astype(np.float64) * (slope or 1.0) + (intercept or 0.0)
    np.testing.assert_array_equal(vol.array, expected.astype(np.float32))
    assert vol.modality == modality


def write_enhanced(path: Path, frames: np.ndarray, positions, slopes, intercepts, orientations=None,
                   spacing=(0.75, 1.25), functional_groups=True) -> None:
    """An Enhanced CT multi-frame file with per-frame positions and rescale, shared orientation/spacing."""
    ds = make_slice(frames[0], position=None, spacing=spacing, slope=None, pixel_data=False)
    ds.SOPClassUID = EnhancedCTImageStorage
    for kw in ("ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        delattr(ds, kw)
    ds.NumberOfFrames = len(frames)
    if functional_groups:
        shared = Dataset()
        measures = Dataset()
        measures.PixelSpacing, measures.SliceThickness = _ds(spacing), DSfloat(2.5)
        shared.PixelMeasuresSequence = Sequence([measures])
        if orientations is None:
            plane = Dataset()
            plane.ImageOrientationPatient = _ds(AXIAL[0] + AXIAL[1])
            shared.PlaneOrientationSequence = Sequence([plane])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        items = []
        for i in range(len(frames)):
            item, pos, pvt = Dataset(), Dataset(), Dataset()
            pos.ImagePositionPatient = _ds(positions[i])
            item.PlanePositionSequence = Sequence([pos])
            pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = DSfloat(slopes[i]), DSfloat(intercepts[i]), "HU"
            item.PixelValueTransformationSequence = Sequence([pvt])
            if orientations is not None:
                plane = Dataset()
                plane.ImageOrientationPatient = _ds(orientations[i][0] + orientations[i][1])
                item.PlaneOrientationSequence = Sequence([plane])
            items.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    ds.PixelData = frames.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_multiframe_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    n = 9
    frames = rng.integers(0, 3000, size=(n, 4, 5)).astype(np.int16)
    z = rng.permutation(n) * 2.0  # frames stored out of position order
    slopes, intercepts = rng.choice([0.5, 1.0, 2.0], n), rng.choice([-1024.0, -1000.0, 0.0], n)
    path = tmp_path / "enhanced"
    write_enhanced(path, frames, [(5.0, -7.0, zi) for zi in z], slopes, intercepts)
    h = read_header(path)
    assert h.number_of_frames == n and h.pixel_spacing == (0.75, 1.25) and h.image_position == (5.0, -7.0, z[0])
    vol = load_series([h])
    order = np.argsort(z)
    expected = frames[order] * slopes[order, None, None] + intercepts[order, None, None]
    np.testing.assert_array_equal(vol.array, expected.astype(np.float32))
    assert vol.num_slices == n and vol.source_files == [str(path)] and vol.spacing == pytest.approx((2.0, 0.75, 1.25))
    np.testing.assert_allclose(vol.affine[:3, 3], [-5.0, 7.0, 0.0])


def test_enhanced_multiframe_refusals(tmp_path):
    frames = np.zeros((8, 4, 5), np.int16)
    pos = [(0.0, 0.0, 2.0 * i) for i in range(8)]
    tilted = [AXIAL] * 7 + [ORIENTATIONS["coronal"]]
    write_enhanced(tmp_path / "mixed", frames, pos, [1.0] * 8, [0.0] * 8, orientations=tilted)
    write_enhanced(tmp_path / "legacy", frames, pos, [1.0] * 8, [0.0] * 8, functional_groups=False)
    for name, reason in (("mixed", R.INCONSISTENT_GEOMETRY), ("legacy", R.NOT_AN_IMAGE_SERIES)):
        with pytest.raises(IngestError) as err:
            load_series([read_header(tmp_path / name)])
        assert err.value.reason == reason, name


def _tilt(i: int) -> dict:  # positions drift in y with z: a 15 degree gantry tilt
    return {"position": (-20.0, 30.0 + math.tan(math.radians(15)) * 2.5 * i, -10.0 + 2.5 * i)}


BAD_SERIES = {  # name: (per-slice overrides, number of slices, positions, reason)
    "mixed_rows": ({3: {"pixels": np.zeros((6, 5), np.int16)}}, 8, None, R.INCONSISTENT_GEOMETRY),
    "mixed_orientation": ({2: {"orientation": ORIENTATIONS["coronal"]}}, 8, None, R.INCONSISTENT_GEOMETRY),
    "mixed_pixel_spacing": ({5: {"spacing": (0.8, 1.25)}}, 8, None, R.INCONSISTENT_GEOMETRY),
    "gantry_tilt": ({i: _tilt(i) for i in range(8)}, 8, None, R.INCONSISTENT_GEOMETRY),
    "missing_position": ({4: {"position": None}}, 8, None, R.INCONSISTENT_GEOMETRY),
    "duplicate_position": ({3: {"position": (-20.0, 30.0, -10.0 + 2.5 * 4)}}, 8, None, R.DUPLICATE_SLICES),
    "near_duplicate": ({3: {"position": (-20.0, 30.0, -10.0 + 2.5 * 4 + 0.01)}}, 8, None, R.DUPLICATE_SLICES),
    "gap": ({}, 8, z_positions(4) + z_positions(4, z0=-10.0 + 2.5 * 5), R.MISSING_SLICES),
    "zero_pixel_spacing": ({i: {"spacing": (0.0, 0.0)} for i in range(8)}, 8, None, R.BAD_SPACING),
    "negative_pixel_spacing": ({i: {"spacing": (-0.75, 1.25)} for i in range(8)}, 8, None, R.BAD_SPACING),
    "nan_position": ({2: {"position": (-20.0, 30.0, float("nan"))}}, 8, None, R.BAD_SPACING),
    "too_few_slices": ({}, 5, None, R.SERIES_TOO_SMALL),
}


@pytest.mark.parametrize("case", list(BAD_SERIES))
def test_bad_series_are_refused_with_their_reason(tmp_path, case):
    per_slice, n, positions, reason = BAD_SERIES[case]
    paths = write_series(tmp_path, np.zeros((n, 4, 5), np.int16), positions or z_positions(n), per_slice=per_slice)
    with pytest.raises(IngestError) as err:
        load_series(headers_of(paths))
    assert err.value.reason == reason
    assert "1.2.3.4" in err.value.detail  # the detail names the series


def test_undecodable_pixels(tmp_path):
    paths = write_series(tmp_path, np.zeros((8, 4, 5), np.int16), z_positions(8))
    ds = pydicom.dcmread(paths[6])
    ds.PixelData = np.zeros((4, 4), np.int16).tobytes()  # header says 4x5: too few bytes to decode
    ds.save_as(paths[6], enforce_file_format=True)
    with pytest.raises(IngestError) as err:
        load_series(headers_of(paths))
    assert err.value.reason == R.UNREADABLE_PIXELS and str(paths[6]) in err.value.detail


def test_single_slice_needs_slice_thickness(tmp_path):
    paths = write_series(tmp_path, np.zeros((1, 4, 5), np.int16), z_positions(1), thickness=None)
    with pytest.raises(IngestError) as err:
        load_series(headers_of(paths), min_slices=1)
    assert err.value.reason == R.BAD_SPACING
    paths = write_series(tmp_path / "t", np.zeros((1, 4, 5), np.int16), z_positions(1), thickness=3.0)
    assert load_series(headers_of(paths), min_slices=1).spacing == pytest.approx((3.0, 0.75, 1.25))


def test_mixed_series_uids_are_a_caller_error(tmp_path):
    a = write_series(tmp_path / "a", np.zeros((2, 4, 5), np.int16), z_positions(2), series_uid="1.1")
    b = write_series(tmp_path / "b", np.zeros((2, 4, 5), np.int16), z_positions(2), series_uid="1.2")
    with pytest.raises(ValueError):
        load_series(headers_of(a + b))


# --- file-level refusals -------------------------------------------------------------------------------------


def _one(tmp_path: Path, **kw) -> Path:
    path = tmp_path / "one.dcm"
    make_slice(np.arange(20, dtype=np.int16).reshape(4, 5), position=(0.0, 0.0, 0.0), **kw).save_as(
        path, enforce_file_format=True)
    return path


def test_localizer_and_no_pixel_data(tmp_path):
    with pytest.raises(IngestError) as err:
        read_header(_one(tmp_path, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    assert err.value.reason == R.NOT_AN_IMAGE_SERIES
    with pytest.raises(IngestError) as err:
        read_header(_one(tmp_path, pixel_data=False))
    assert err.value.reason == R.NO_PIXEL_DATA


def test_truncated_files_are_unreadable(tmp_path):
    data = _one(tmp_path).read_bytes()
    raw = pydicom.dcmread(tmp_path / "one.dcm", defer_size=16)
    pixel_at = raw.get_item(0x7FE00010, keep_deferred=True).value_tell
    desc_at = raw.get_item(0x0008103E, keep_deferred=True).value_tell
    # inside the pixel values, the pixel data element header, a header value, the file meta information
    # (a file cut inside the 128-byte preamble has no 'DICM' and is NOT_DICOM: nothing says it was DICOM)
    for cut in (len(data) - 7, pixel_at - 5, desc_at + 3, 150):
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(IngestError) as err:
            read_header(path)
        assert err.value.reason == R.UNREADABLE_DICOM, cut


@pytest.mark.parametrize(("content", "name"), [
    (b"this is a radiology report, not an image\n" * 10, "report.dcm"),
    (b"", "empty.dcm"),
    (bytes(range(256)) * 4, "noise.dcm"),
])
def test_non_dicom_content_is_not_dicom(tmp_path, content, name):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(IngestError) as err:
        read_header(tmp_path / name)
    assert err.value.reason == R.NOT_DICOM


def test_dicom_without_preamble_is_detected_by_content(tmp_path):
    ds = make_slice(np.zeros((4, 5), np.int16), position=(0.0, 0.0, 0.0))
    del ds.file_meta
    path = tmp_path / "IMG0001"  # no extension, no preamble, no 'DICM'
    ds.save_as(path, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    h = read_header(path)
    assert h.modality == "CT" and h.transfer_syntax_uid == "1.2.840.10008.1.2"


def test_unknown_transfer_syntax_is_unsupported(tmp_path):
    path = _one(tmp_path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.99.1"  # a private syntax nobody decodes
    ds.save_as(tmp_path / "private.dcm", enforce_file_format=False)
    with pytest.raises(IngestError) as err:
        read_header(tmp_path / "private.dcm")
    assert err.value.reason == R.UNSUPPORTED_TRANSFER_SYNTAX


def test_headers_are_json_serialisable(tmp_path):
    h = read_header(_one(tmp_path))
    data = json.loads(json.dumps(dataclasses.asdict(h)))
    assert DicomHeader.from_dict(data) == h and isinstance(DicomHeader.from_dict(data).image_type, tuple)


def test_every_shipped_file_gets_a_header_or_a_known_reason():
    known = {v for k, v in vars(R).items() if k.isupper()}
    for f in glob.glob(str(TEST_FILES / "**" / "*"), recursive=True):
        if os.path.isdir(f):
            continue
        try:
            read_header(f)
        except IngestError as exc:
            assert exc.reason in known and exc.detail


# --- conventions shared with NIfTI and preprocess_volume ----------------------------------------------------


def _dicom_layout(plane: str, shape: tuple[int, int, int], sp: tuple[float, float, float], origin: np.ndarray):
    """How a standard scanner writes a RAS grid ``V[i, j, k]`` (i: R, j: A, k: S) as DICOM slices.

    Returns (slices of V as a list of 2D index expressions, IPP per slice in LPS, orientation, PixelSpacing).
    Written from the DICOM standard (LPS patient axes, row/column cosines), independently of the loader.
    """
    nx, ny, nz = shape
    ras_max = origin + (np.array(shape) - 1) * sp
    if plane == "axial":  # rows run anterior->posterior, columns right->left, slices inferior->superior
        views = [lambda v, k=k: v[::-1, ::-1, k].T for k in range(nz)]
        ipp = [(-ras_max[0], -ras_max[1], origin[2] + k * sp[2]) for k in range(nz)]
        return views, ipp, ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), (sp[1], sp[0])
    # sagittal: columns run anterior->posterior, rows superior->inferior, slices right-ward (normal -x LPS)
    views = [lambda v, i=i: v[i, ::-1, ::-1].T for i in range(nx)]
    ipp = [(-(origin[0] + i * sp[0]), -ras_max[1], ras_max[2]) for i in range(nx)]
    return views, ipp, ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)), (sp[2], sp[1])


@pytest.mark.parametrize("plane", ["axial", "sagittal"])
def test_dicom_and_nifti_of_one_volume_preprocess_identically(tmp_path, plane):
    import nibabel as nib
    import torch

    from client.ingest.nifti import load_nifti
    from shared_models.config import PreprocessConfig
    from shared_models.volumes import preprocess_volume

    shape, sp = (10, 12, 9), (1.5, 1.25, 2.5)
    origin = np.array([-7.5, 12.0, -30.0])
    hu = np.random.default_rng(5).integers(-1000, 1000, size=shape).astype(np.int16)  # V[i, j, k] in RAS
    affine_ras = np.diag([*sp, 1.0])
    affine_ras[:3, 3] = origin
    nib.save(nib.Nifti1Image(hu.astype(np.float32), affine_ras), tmp_path / "vol.nii.gz")

    views, ipp, orientation, spacing = _dicom_layout(plane, shape, sp, origin)
    slices = np.stack([view(hu) for view in views]) + 1024  # stored = HU + 1024
    paths = write_series(tmp_path / "dcm", slices, ipp, orientation=orientation, spacing=spacing,
                         slope=1.0, intercept=-1024.0, seed=7)
    vol = load_series(headers_of(paths))
    data, affine, nii_spacing = load_nifti(tmp_path / "vol.nii.gz")

    cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.0), size=(16, 16, 16))
    from_dicom = preprocess_volume(vol.array, vol.spacing, "CT", cfg, affine=vol.affine)
    from_nifti = preprocess_volume(data, nii_spacing, "CT", cfg, affine=affine)
    assert from_nifti.std() > 0.1  # a real volume, not padding
    torch.testing.assert_close(from_dicom, from_nifti, atol=1e-4, rtol=0)
    # the comparison is sensitive: keeping DICOM's LPS x/y unflipped gives a different tensor
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine
    assert not torch.allclose(preprocess_volume(vol.array, None, "CT", cfg, affine=lps), from_nifti, atol=1e-2)
