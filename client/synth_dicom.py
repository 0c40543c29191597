"""The DICOM side of a synthetic site export (:mod:`client.synth`): encodings, datasets and file writers.

Single-frame series (one file per slice, written in random order), enhanced CT/MR multi-frame files
(functional groups shared or per frame), localizers, the folder layouts of a PACS dump (nested, dated,
flat, per series) and the DICOMDIR/README extras. A series is described by its truth entry (a dict, see
:mod:`client.synth`); ``ctx`` holds the study-level identifiers. Everything here is deterministic given
the generator passed in. :mod:`client.synth` re-exports :data:`SOP_CLASSES`, :data:`MEDIA_DIRECTORY`
and :data:`ENCODINGS`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = ["SOP_CLASSES", "MEDIA_DIRECTORY", "ENCODINGS"]

SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
               "CT-enhanced": "1.2.840.10008.5.1.4.1.1.2.1", "MR-enhanced": "1.2.840.10008.5.1.4.1.1.4.1"}
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
# name -> (PixelRepresentation, RescaleIntercept, RescaleSlope)
ENCODINGS = {"signed": (1, 0.0, 1.0), "signed-half": (1, 0.0, 0.5), "unsigned": (0, -1024.0, 1.0),
             "unsigned-half": (0, -1024.0, 0.5)}
_ORIENTATIONS = {"standard": (1, 1), "flipped-rows": (1, -1), "flipped-columns": (-1, 1)}  # (row x, column y) LPS
_MR_TIMES = {"T1": ("500", "15"), "T2": ("4000", "100"), "FLAIR": ("9000", "120")}  # TR, TE (ms)


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _hex(*parts: object, n: int = 16) -> str:
    return hashlib.sha1("/".join(str(p) for p in parts).encode()).hexdigest()[:n].upper()


def _encode(hu: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored pixels, what they decode to) for a CT volume in HU under one of :data:`ENCODINGS`."""
    rep, intercept, slope = ENCODINGS[encoding]
    lo = -1024 if rep == 0 else -32768 * slope
    decoded = np.clip(hu.astype(np.int32), lo, 3071)
    stored = np.rint((decoded - intercept) / slope).astype(np.uint16 if rep == 0 else np.int16)
    return stored, decoded


def _base(ctx: dict, series: dict, sop_class: str, sop_uid: str) -> Dataset:
    """A dataset with the patient, study, series and pixel-format attributes shared by a series' files."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = series["image_type"]
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ctx["date"]
    ds.StudyTime, ds.SeriesTime = ctx["time"], ctx["time"]
    ds.AccessionNumber, ds.Modality = ctx["accession"], ctx["modality"]
    ds.Manufacturer, ds.ManufacturerModelName = ctx["scanner"].manufacturer, ctx["scanner"].model
    ds.StudyDescription, ds.SeriesDescription = ctx["study_description"], series["description"]
    ds.PatientName, ds.PatientID = ctx["patient_name"], ctx["patient_id"]
    ds.PatientBirthDate, ds.PatientSex = ctx["birth_date"], ctx["sex"]
    ds.BodyPartExamined = "CHEST" if ctx["modality"] == "CT" else "HEAD"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ctx["study_uid"], series["series_uid"]
    ds.StudyID, ds.SeriesNumber = str(ctx["index"] + 1), series["number"]
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = ctx["frame_uid"], ""
    if ctx["modality"] == "CT":
        ds.KVP, ds.ConvolutionKernel = "120", ctx["scanner"].kernel
    else:
        ds.MagneticFieldStrength = "3" if "3T" in ctx["scanner"].model else "1.5"
        ds.ScanningSequence = "IR" if series["sequence"] == "FLAIR" else "SE"
        ds.SequenceName = series["sequence"] or ""
        ds.RepetitionTime, ds.EchoTime = _MR_TIMES.get(series["sequence"], ("", ""))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = series["rescale"]["pixel_representation"]
    return ds


def _slice_geometry(series: dict, s: int) -> tuple[list[float], tuple[slice, slice]]:
    """(ImagePositionPatient in LPS, row/column flips) of slice ``s`` under the series' orientation."""
    rx, cy = _ORIENTATIONS[series["orientation_variant"]]
    shape, aff = series["shape_sar"], np.asarray(series["affine_sar"])
    a0, r0 = (shape[1] - 1 if cy > 0 else 0), (shape[2] - 1 if rx > 0 else 0)
    x, y, z = (aff @ np.array([s, a0, r0, 1.0]))[:3]
    return [round(-x, 4) + 0.0, round(-y, 4) + 0.0, round(z, 4) + 0.0], (slice(None, None, -cy), slice(None, None, -rx))


def _write_classic(ctx: dict, series: dict, stored: np.ndarray, root: Path, paths: list[Path],
                   rng: np.random.Generator) -> list[str]:
    """One file per slice, written in random order (one dataset reused); returns the paths (relative to
    ``root``) by slice."""
    rx, cy = _ORIENTATIONS[series["orientation_variant"]]
    ds = _base(ctx, series, SOP_CLASSES[ctx["modality"]], "")
    ds.ImageOrientationPatient = [float(rx), 0.0, 0.0, 0.0, float(cy), 0.0]
    ds.PixelSpacing = [series["spacing_sar"][1], series["spacing_sar"][2]]
    ds.SliceThickness = series["thickness_mm"]
    ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
    if ctx["modality"] == "CT" or series["rescale"]["slope"] != 1 or series["rescale"]["intercept"] != 0:
        ds.RescaleIntercept, ds.RescaleSlope = series["rescale"]["intercept"], series["rescale"]["slope"]
        ds.RescaleType = "HU" if ctx["modality"] == "CT" else "US"
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for s in rng.permutation(len(paths)):
        ipp, flips = _slice_geometry(series, int(s))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = _uid(series["series_uid"], s)
        ds.InstanceNumber, ds.ImagePositionPatient, ds.SliceLocation = series["instance_numbers"][s], ipp, ipp[2]
        ds.PixelData = np.ascontiguousarray(stored[s][flips]).tobytes()
        ds.save_as(paths[s], enforce_file_format=True)
    return [p.relative_to(root).as_posix() for p in paths]


def _write_multiframe(ctx: dict, series: dict, stored: np.ndarray, path: Path) -> None:
    """One enhanced CT/MR file; frames in InstanceNumber order, functional groups shared or per frame."""
    rx, cy = _ORIENTATIONS[series["orientation_variant"]]
    ds = _base(ctx, series, SOP_CLASSES[ctx["modality"] + "-enhanced"], _uid(series["series_uid"], "mf"))
    ds.InstanceNumber, ds.Rows, ds.Columns = 1, stored.shape[1], stored.shape[2]
    order = np.argsort(series["instance_numbers"])                     # frame k shows slice order[k]
    ds.NumberOfFrames = len(order)
    measures = Dataset()
    measures.PixelSpacing = [series["spacing_sar"][1], series["spacing_sar"][2]]
    measures.SliceThickness, measures.SpacingBetweenSlices = series["thickness_mm"], series["spacing_sar"][0]
    orient = Dataset()
    orient.ImageOrientationPatient = [float(rx), 0.0, 0.0, 0.0, float(cy), 0.0]
    rescale = Dataset()
    rescale.RescaleIntercept, rescale.RescaleSlope = series["rescale"]["intercept"], series["rescale"]["slope"]
    rescale.RescaleType = "HU" if ctx["modality"] == "CT" else "US"
    per_frame_groups = series["functional_groups"] == "per-frame"
    shared = Dataset()
    if not per_frame_groups:
        shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orient])
        shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, items = [], []
    for k, s in enumerate(order):
        ipp, flips = _slice_geometry(series, int(s))
        item, pos, content = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = ipp
        content.StackID, content.InStackPositionNumber, content.DimensionIndexValues = "1", k + 1, [1, k + 1]
        item.FrameContentSequence, item.PlanePositionSequence = Sequence([content]), Sequence([pos])
        if per_frame_groups:
            item.PixelMeasuresSequence, item.PlaneOrientationSequence = Sequence([measures]), Sequence([orient])
            item.PixelValueTransformationSequence = Sequence([rescale])
        items.append(item)
        frames.append(np.ascontiguousarray(stored[s][flips]))
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    ds.PixelData = np.stack(frames).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _write_localizer(ctx: dict, series: dict, hu: np.ndarray, aff: np.ndarray, root: Path, folder: Path) -> list[str]:
    """1-3 projection images (AP, lateral, AP) of a volume: ImageType ORIGINAL\\PRIMARY\\LOCALIZER."""
    ds = _base(ctx, series, SOP_CLASSES[ctx["modality"]], "")
    sp = series["spacing_sar"]
    ds.RescaleIntercept, ds.RescaleSlope = 0.0, 1.0
    out = []
    for k in range(series["num_slices"]):
        lateral = k % 2 == 1
        proj = hu.mean(axis=2 if lateral else 1)[::-1, ::-1]           # rows superior->inferior
        x, y, z = (aff @ np.array([hu.shape[0] - 1, hu.shape[1] - 1 if lateral else hu.shape[1] // 2,
                                    hu.shape[2] // 2 if lateral else hu.shape[2] - 1, 1.0]))[:3]
        uid = _uid(series["series_uid"], "loc", k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid
        ds.InstanceNumber, ds.ImagePositionPatient = k + 1, [round(-x, 4), round(-y, 4), round(z, 4)]
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0] if lateral else [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
        ds.PixelSpacing = [sp[0], sp[1] if lateral else sp[2]]
        ds.Rows, ds.Columns = proj.shape
        ds.PixelData = np.ascontiguousarray(np.rint(proj).astype(np.int16)).tobytes()
        path = folder / f"LOC{k + 1:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        out.append(path.relative_to(root).as_posix())
    return out


def _paths(style: str, ctx: dict, series: dict, n: int, rng: np.random.Generator) -> list[Path]:
    """Relative file paths (by slice) of a series under a folder ``style``; names never follow slice order."""
    num, desc = series["number"], series["description"].replace(" ", "_").replace(".", "p")
    if style == "nested":
        folder, start = Path(f"PAT{ctx['patient'] + 1:04d}/STUDY_{ctx['visit'] + 1}/SE{num}"), int(rng.integers(1, 500))
        names = [f"IM{start + j:05d}" for j in rng.permutation(n)]
    elif style == "dated":
        d = ctx["date"]
        folder = Path(f"{d[:4]}/{d[4:6]}/{d[6:]}/{ctx['accession']}/{_hex(series['series_uid'], n=8)}")
        names = [f"{_hex(series['series_uid'], s)}.dcm" for s in range(n)]
    elif style == "flat":
        folder, ext = Path("dump"), ".dcm" if rng.random() < 0.5 else ""
        names = [f"{_hex(series['series_uid'], s, n=12)}{ext}" for s in range(n)]
    else:
        folder = Path(f"{ctx['patient_name'].replace('^', '_')}/{ctx['study_description'].replace(' ', '_')}_"
                      f"{ctx['visit'] + 1}/{num:03d}_{desc}")
        names = [f"{_uid(series['series_uid'], s)}.dcm" for s in range(n)]
    return [folder / name for name in names]



def _write_extras(out: Path, prof, tag: str, seed: int) -> list[dict]:
    """A README at the DICOM root, and for nested trees a DICOMDIR (a DICOM file without images)."""
    root = out / "dicom"
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.txt").write_text(f"Synthetic PACS export of site profile {prof.name!r}. Not real patients.\n")
    junk = [{"path": "dicom/README.txt", "kind": "non-dicom"}]
    if "nested" in prof.folder_styles:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MEDIA_DIRECTORY, _uid(seed, tag, "dicomdir")
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.FileSetID = tag
        ds.FileSetConsistencyFlag = 0
        ds.DirectoryRecordSequence = Sequence([])
        ds.save_as(root / "DICOMDIR", enforce_file_format=True)
        junk.append({"path": "dicom/DICOMDIR", "kind": "dicomdir"})
    return junk
