"""DICOM header scan and series assembly for a site's PACS export.

:func:`read_header` reads one file's header (never its pixel bytes) into a JSON-serialisable
:class:`DicomHeader`, refusing what cannot become part of an image volume with a reason from
:mod:`client.ingest.reasons`. :func:`load_series` stacks the files of one series (or the frames of an
enhanced multi-frame object) into a float32 volume with a RAS+ affine, after checking the geometry.

Conventions: the volume's axes are (k, r, c) = (slice along the normal, row, column); the affine maps
(k, r, c, 1) to RAS+ world millimetres like a NIfTI affine (DICOM patient coordinates are LPS, so the
x and y rows are negated). Pixel decoding, modality LUT and rescale are pydicom's.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from client.ingest import multiframe as mf
from client.ingest import reasons as R
from client.ingest.reasons import IngestError

_DEFER_SIZE = 1024  # bytes: larger values (pixel data, big private blobs) are skipped, not loaded
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_UNDEFINED_LENGTH = 0xFFFFFFFF
_NON_VOLUME_IMAGE_TYPES = ("LOCALIZER",)  # ImageType values that mark a scout/planning image
_ORIENTATION_TOL = 1e-4  # direction cosines: max difference within a series
_SPACING_RTOL = 1e-4  # pixel spacing: max relative difference within a series
_DUPLICATE_FRACTION = 0.01  # two slices closer than this fraction of the nominal step are duplicates
_GAP_FACTOR = 1.5  # a step longer than this times the median step is a gap
_TILT_FRACTION = 0.1  # max drift of positions off the normal, as a fraction of the in-plane pixel size


@dataclass(frozen=True)
class DicomHeader:
    """What is needed to group, sort and cache one DICOM file without reading its pixels.

    Only str/int/float/None and tuples of them, so ``dataclasses.asdict`` gives JSON-ready data; use
    :meth:`from_dict` to rebuild one from that (JSON turns tuples into lists). For enhanced multi-frame
    objects the geometry fields are those of frame 0 (Shared or Per-frame functional groups).
    """

    path: str
    size: int
    mtime_ns: int
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    accession_number: str
    patient_id: str
    study_date: str
    series_description: str
    image_type: tuple[str, ...]
    sop_class_uid: str
    instance_number: int | None
    image_position: tuple[float, float, float] | None
    image_orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    rows: int
    columns: int
    number_of_frames: int
    transfer_syntax_uid: str
    has_pixel_data: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DicomHeader:
        """Rebuild a header from ``dataclasses.asdict`` output (lists from JSON become tuples again)."""
        names = {f.name for f in fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
        return cls(**values)


@dataclass
class SeriesVolume:
    """One assembled series: float32 volume (k, r, c), RAS+ affine and provenance."""

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    study_uid: str
    series_uid: str
    series_description: str
    num_slices: int
    source_files: list[str]


def _text(ds: Dataset, keyword: str) -> str:
    """A header value as a stripped plain str ('' when absent)."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _int_or_none(value: Any) -> int | None:
    """An IS/US value as int, or None when absent or unparsable."""
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _transfer_syntax(ds: Dataset) -> str:
    """The file's transfer syntax UID (inferred from the encoding pydicom found when there is no meta)."""
    ts = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if ts:
        return str(ts)
    implicit, little = ds.original_encoding
    if implicit:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian)


def _truncation(ds: Dataset, size: int, caught: list[warnings.WarningMessage], deflated: bool,
                preamble: bool) -> str | None:
    """Why the file is truncated, or None: an element whose value runs past the end of the file.

    pydicom stops silently at end of file (and only warns when an undefined-length value lacks its
    delimiter), so the raw elements' offsets and lengths are checked against the file size (not for
    deflated files, whose offsets are in the inflated stream; a cut deflate stream fails to parse).
    """
    for w in caught:
        if "end of file" in str(w.message).lower():
            return str(w.message)
    meta = getattr(ds, "file_meta", None) or Dataset()
    meta_length = _int_or_none(meta.get("FileMetaInformationGroupLength"))
    if preamble and meta_length is not None and 132 + 12 + meta_length > size:  # preamble+DICM, (0002,0000)
        return f"file meta information needs {132 + 12 + meta_length} bytes, file has {size}"
    if len(ds) == 0:
        return "no data set after the file meta information"
    for tag, elem in [(t, d.get_item(t, keep_deferred=True)) for d in (meta, ds) for t in list(d.keys())]:
        if not isinstance(elem, RawDataElement) or elem.length in (0, _UNDEFINED_LENGTH):
            continue
        if elem.value is None and not deflated and elem.value_tell + elem.length > size:
            return f"element {tag} needs {elem.length} bytes from offset {elem.value_tell}, file has {size}"
        if isinstance(elem.value, bytes) and len(elem.value) < elem.length:
            return f"element {tag} has {len(elem.value)} of {elem.length} bytes"
    last = ds.get_item(max(ds.keys()), keep_deferred=True) if len(ds) else None
    if not deflated and isinstance(last, RawDataElement) and last.length != _UNDEFINED_LENGTH:
        stray = size - (last.value_tell + last.length)
        if 0 < stray < 8:  # fewer bytes than an element header: pydicom dropped a cut-off element
            return f"{stray} byte(s) of a cut-off element header after {last.tag}"
    return None


def _check_decoder(ts: str, name: str) -> None:
    """Refuse a transfer syntax that this installation's pydicom cannot decode (asks pydicom's registry)."""
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise IngestError(R.UNSUPPORTED_TRANSFER_SYNTAX,
                          f"{name}: {UID(ts).name} ({ts}): pydicom has no decoder for it") from exc
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise IngestError(R.UNSUPPORTED_TRANSFER_SYNTAX,
                          f"{name}: {UID(ts).name} ({ts}): no decoder installed (install one of: {needs})")


def _parse(path: Path, force: bool) -> tuple[Dataset, list[warnings.WarningMessage]]:
    """``dcmread`` with large values deferred (not loaded); pydicom's warnings are returned, not printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE, force=force)
    return ds, list(caught)


def read_header(path: str | Path) -> DicomHeader:
    """Read the header of one file, deciding by content (not name) whether it is a usable DICOM image.

    A file is DICOM when bytes 128..131 are ``b"DICM"``; without that prefix it is accepted only when
    pydicom (``force=True``) finds a SOPClassUID, Rows, Columns and BitsAllocated in it. Pixel bytes are
    never loaded (``defer_size``); truncation is detected from element offsets against the file size.

    Raises:
        IngestError: NOT_DICOM, UNREADABLE_DICOM (unparsable, truncated, missing SOP class/Rows/Columns),
            NOT_AN_IMAGE_SERIES (non-image SOP class such as SR/PR/KO/RTSTRUCT/RT Dose/SEG, LOCALIZER in
            ImageType, colour images), NO_PIXEL_DATA, UNSUPPORTED_TRANSFER_SYNTAX (no installed decoder).
    """
    p = Path(path)
    name = str(p)
    try:
        st = p.stat()
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise IngestError(R.UNREADABLE_DICOM, f"{name}: cannot read the file: {exc}") from exc
    preamble = len(head) == 132 and head[128:132] == b"DICM"
    try:
        ds, caught = _parse(p, force=not preamble)
        pixel_tags = ("SOPClassUID", "Rows", "Columns", "BitsAllocated")
        if not preamble and not all(k in ds for k in pixel_tags):
            raise IngestError(R.NOT_DICOM, f"{name}: no 'DICM' prefix at byte 128 and no DICOM image header")
    except IngestError:
        raise
    except Exception as exc:  # pydicom raises many types on garbage input
        if preamble:
            raise IngestError(R.UNREADABLE_DICOM, f"{name}: {type(exc).__name__}: {exc}") from exc
        raise IngestError(R.NOT_DICOM, f"{name}: no 'DICM' prefix and pydicom cannot parse it") from exc
    try:
        return _header_from_dataset(ds, name, st, caught, preamble)
    except IngestError:
        raise
    except Exception as exc:
        raise IngestError(R.UNREADABLE_DICOM, f"{name}: bad header value: {type(exc).__name__}: {exc}") from exc


def _header_from_dataset(ds: Dataset, name: str, st: os.stat_result,
                         caught: list[warnings.WarningMessage], preamble: bool) -> DicomHeader:
    """Validate a parsed dataset (see :func:`read_header` for the order of refusals) and build its header."""
    ts = UID(_transfer_syntax(ds))
    why = _truncation(ds, st.st_size, caught, ts.is_transfer_syntax and ts.is_deflated, preamble)
    if why:
        raise IngestError(R.UNREADABLE_DICOM, f"{name}: truncated: {why}")
    sop_class = _text(ds, "SOPClassUID") or str(getattr(ds, "file_meta", Dataset()).get(
        "MediaStorageSOPClassUID") or "")
    if not sop_class:
        raise IngestError(R.UNREADABLE_DICOM, f"{name}: no SOP Class UID")
    modality = _text(ds, "Modality").upper()
    sop_name = UID(sop_class).name
    # A SOP class pydicom knows whose name is not an "... Image Storage" holds no image (SR, PR, KO,
    # RT Structure Set/Plan/Dose, Segmentation, DICOMDIR, waveforms, ...). Unknown/private classes pass.
    if sop_name != sop_class and "Image Storage" not in sop_name:
        raise IngestError(R.NOT_AN_IMAGE_SERIES, f"{name}: {sop_name} (Modality {modality or '?'}) is not an image")
    raw_type = ds.get("ImageType")
    values = raw_type if isinstance(raw_type, (MultiValue, list, tuple)) else [raw_type] if raw_type else []
    image_type = tuple(str(v).strip().upper() for v in values)
    marked = [t for t in _NON_VOLUME_IMAGE_TYPES if t in image_type]
    if marked:
        shown = "\\".join(image_type)
        raise IngestError(R.NOT_AN_IMAGE_SERIES, f"{name}: ImageType {shown} marks a {marked[0].lower()} image")
    if not any(tag in ds for tag in _PIXEL_TAGS):
        if "Image Storage" not in sop_name and ("Rows" not in ds or "Columns" not in ds):
            raise IngestError(R.NOT_AN_IMAGE_SERIES, f"{name}: {sop_name}: no Rows/Columns and no pixel data")
        raise IngestError(R.NO_PIXEL_DATA, f"{name}: {sop_name} without a PixelData element")
    rows, columns = _int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))
    if not rows or not columns or min(rows, columns) < 0:
        raise IngestError(R.UNREADABLE_DICOM, f"{name}: Rows/Columns missing or invalid ({rows}, {columns})")
    samples = _int_or_none(ds.get("SamplesPerPixel")) or 1
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if samples != 1 or photometric not in ("", "MONOCHROME1", "MONOCHROME2"):
        raise IngestError(R.NOT_AN_IMAGE_SERIES, f"{name}: {samples} sample(s) per pixel, {photometric}: "
                          "a colour image, not a grayscale volume")
    _check_decoder(ts, name)
    geo = mf.frame_geometry(ds, 0)
    return DicomHeader(
        path=name, size=int(st.st_size), mtime_ns=int(st.st_mtime_ns),
        study_uid=_text(ds, "StudyInstanceUID"), series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"), modality=modality,
        accession_number=_text(ds, "AccessionNumber"), patient_id=_text(ds, "PatientID"),
        study_date=_text(ds, "StudyDate"), series_description=_text(ds, "SeriesDescription"),
        image_type=image_type, sop_class_uid=sop_class,
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        image_position=geo.position, image_orientation=geo.orientation, pixel_spacing=geo.pixel_spacing,
        slice_thickness=geo.slice_thickness, rows=rows, columns=columns,
        number_of_frames=mf.number_of_frames(ds), transfer_syntax_uid=str(ts), has_pixel_data=True,
    )


def _series_label(header: DicomHeader) -> str:
    """How details name a series: its UID and description."""
    desc = f" ({header.series_description!r})" if header.series_description else ""
    return f"series {header.series_uid}{desc}"


def _where(frame: mf.Frame) -> str:
    """A frame as '<path>' or '<path> frame <i>'."""
    return frame[0] if frame[1] is None else f"{frame[0]} frame {frame[1]}"


def _stack_geometry(frames: list[mf.Frame], label: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Check the stack's geometry and return (order of frames along the normal, RAS+ affine).

    Hand-written: neither pydicom nor nibabel stacks single-frame files by position (nibabel's
    dicomwrappers give per-slice LPS affines and sort enhanced frames by dimension index), and each
    failure here needs its own reason.
    """
    n = len(frames)
    geos = [f[2] for f in frames]
    for attr, what in (("position", "ImagePositionPatient"), ("orientation", "ImageOrientationPatient")):
        missing = [f for f, g in zip(frames, geos) if getattr(g, attr) is None]
        if len(missing) == n:
            raise IngestError(R.NOT_AN_IMAGE_SERIES, f"{label}: no {what} in any image: not a volume")
        if missing:
            raise IngestError(R.INCONSISTENT_GEOMETRY, f"{label}: {len(missing)} of {n} images lack {what} "
                              f"(e.g. {_where(missing[0])})")
    for f, g in zip(frames, geos):
        if g.pixel_spacing is None:
            raise IngestError(R.BAD_SPACING, f"{label}: no PixelSpacing in {_where(f)}")
        if not mf.is_finite(g.pixel_spacing) or min(g.pixel_spacing) <= 0:
            raise IngestError(R.BAD_SPACING, f"{label}: PixelSpacing {g.pixel_spacing} in {_where(f)}")
        if not mf.is_finite(g.position):
            raise IngestError(R.BAD_SPACING, f"{label}: non-finite ImagePositionPatient {g.position} in {_where(f)}")
        if not mf.is_finite(g.orientation):
            raise IngestError(R.INCONSISTENT_GEOMETRY,
                              f"{label}: non-finite ImageOrientationPatient {g.orientation} in {_where(f)}")
    pos = np.array([g.position for g in geos], dtype=np.float64)
    ori = np.array([g.orientation for g in geos], dtype=np.float64)
    ps = np.array([g.pixel_spacing for g in geos], dtype=np.float64)
    if np.abs(ori - ori[0]).max() > _ORIENTATION_TOL:
        other = frames[int(np.abs(ori - ori[0]).max(axis=1).argmax())]
        raise IngestError(R.INCONSISTENT_GEOMETRY, f"{label}: ImageOrientationPatient differs: {geos[0].orientation} "
                          f"in {_where(frames[0])} vs {other[2].orientation} in {_where(other)}")
    if np.abs(ps / ps[0] - 1.0).max() > _SPACING_RTOL:
        other = frames[int(np.abs(ps / ps[0] - 1.0).max(axis=1).argmax())]
        raise IngestError(R.INCONSISTENT_GEOMETRY, f"{label}: PixelSpacing differs: {geos[0].pixel_spacing} "
                          f"in {_where(frames[0])} vs {other[2].pixel_spacing} in {_where(other)}")
    row_cos, col_cos = ori[0, :3], ori[0, 3:]
    norms = np.linalg.norm(row_cos), np.linalg.norm(col_cos)
    if abs(norms[0] - 1) > 1e-3 or abs(norms[1] - 1) > 1e-3 or abs(row_cos @ col_cos) > 1e-3:
        raise IngestError(R.INCONSISTENT_GEOMETRY, f"{label}: ImageOrientationPatient {geos[0].orientation} "
                          "is not two orthogonal unit vectors")
    row_cos, col_cos = row_cos / norms[0], col_cos / norms[1]
    normal = np.cross(row_cos, col_cos)  # slice direction: DICOM PS3.3 C.7.6.2.1.1
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    along, pos = along[order], pos[order]
    # Positions must lie on the line through the first one along the normal; otherwise the stack is
    # sheared (gantry tilt) and a (k, r, c) grid would misplace voxels: refuse rather than resample.
    drift = np.linalg.norm((pos - pos[0]) - np.outer(along - along[0], normal), axis=1)
    tol = max(1e-3, _TILT_FRACTION * float(ps[0].min()))
    if drift.max() > tol:
        raise IngestError(R.INCONSISTENT_GEOMETRY, f"{label}: image positions leave the slice normal by up to "
                          f"{drift.max():.3g} mm (gantry tilt or mixed stacks; tolerance {tol:.3g} mm); not resampled")
    if n > 1:
        steps = np.diff(along)
        nominal = float(np.median(steps[steps > 1e-6])) if (steps > 1e-6).any() else 0.0
        dup = np.nonzero(steps <= max(_DUPLICATE_FRACTION * nominal, 1e-6))[0]
        if dup.size:
            a, b = frames[order[dup[0]]], frames[order[dup[0] + 1]]
            raise IngestError(R.DUPLICATE_SLICES, f"{label}: {dup.size} duplicate position(s), e.g. {_where(a)} at "
                              f"{along[dup[0]]:.6g} mm and {_where(b)} at {along[dup[0] + 1]:.6g} mm along the normal "
                              f"(nominal step {nominal:.4g} mm)")
        step = float(np.median(steps))
        gaps = np.nonzero(steps > _GAP_FACTOR * step)[0]
        if gaps.size:
            g = gaps[0]
            raise IngestError(R.MISSING_SLICES, f"{label}: {gaps.size} gap(s), e.g. {steps[g]:.4g} mm between "
                              f"{_where(frames[order[g]])} and {_where(frames[order[g + 1]])} "
                              f"(median step {step:.4g} mm)")
    else:
        step = geos[0].slice_thickness if geos[0].slice_thickness is not None else float("nan")
    if not (math.isfinite(step) and step > 0):
        raise IngestError(R.BAD_SPACING, f"{label}: slice spacing {step} mm (one slice and no usable SliceThickness)"
                          if n == 1 else f"{label}: slice spacing {step} mm")
    lps = np.eye(4)
    lps[:3, 0] = normal * step  # k: along the normal, in sorted order
    lps[:3, 1] = col_cos * ps[0, 0]  # r: down a column, PixelSpacing[0] = spacing between rows
    lps[:3, 2] = row_cos * ps[0, 1]  # c: along a row, PixelSpacing[1] = spacing between columns
    lps[:3, 3] = pos[0]
    return order, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS: negate world x and y


def _check_claimed_size(headers: list[DicomHeader], label: str, max_voxels: int) -> None:
    """Refuse, before any pixel buffer is allocated, a series whose headers claim more pixels than the
    site allows or (uncompressed) than its files can hold: a damaged header's 65535 x 65535 image on 128
    bytes of pixel data would otherwise make ingest ask for the claimed size."""
    from pydicom.uid import UID

    total = 0
    for h in headers:
        voxels = h.rows * h.columns * max(1, h.number_of_frames)
        total += voxels
        syntax = UID(h.transfer_syntax_uid) if h.transfer_syntax_uid else None
        uncompressed = syntax is not None and syntax.is_transfer_syntax and not syntax.is_compressed \
            and not syntax.is_deflated
        if uncompressed and voxels > h.size:  # at least one byte per pixel
            raise IngestError(R.UNREADABLE_PIXELS, f"{label}: {h.path}: the header claims {h.rows} x {h.columns} x "
                              f"{max(1, h.number_of_frames)} pixels, more than its {h.size} bytes can hold "
                              "(a damaged or truncated file; re-export the series)")
    if total > max_voxels:
        raise IngestError(R.SERIES_TOO_LARGE, f"{label}: {total} voxels (Rows x Columns x images) over the limit "
                          f"of {max_voxels}; raise data.max_series_voxels in the site YAML if the series is real")


def load_series(headers: list[DicomHeader], min_slices: int = 8, max_voxels: int = R.MAX_SERIES_VOXELS) -> SeriesVolume:
    """Assemble one series (single-frame files of one SeriesInstanceUID, or an enhanced multi-frame file).

    Images are sorted by the projection of ImagePositionPatient on the slice normal (row cosines x
    column cosines), never by name or InstanceNumber; the slice spacing is the median step between
    positions. Values are pydicom's modality LUT / rescale output (HU for CT), per frame for enhanced
    objects.

    Args:
        headers: the series' headers from :func:`read_header` (duplicate SOPInstanceUIDs already removed).
        min_slices: fewest images accepted. max_voxels: the largest series accepted (voxels).

    Raises:
        ValueError: empty ``headers`` or more than one SeriesInstanceUID (a caller error).
        IngestError: INCONSISTENT_GEOMETRY, DUPLICATE_SLICES, MISSING_SLICES, BAD_SPACING,
            SERIES_TOO_SMALL, SERIES_TOO_LARGE, UNREADABLE_PIXELS (also: headers that claim more pixels
            than the files hold), NON_FINITE_PIXELS, NOT_AN_IMAGE_SERIES (no positions at all, or a
            multi-frame object without functional groups), UNREADABLE_DICOM (a multi-frame header that
            cannot be re-read); each detail names the series and what differs.
    """
    if not headers:
        raise ValueError("load_series needs at least one header")
    uids = sorted({h.series_uid for h in headers})
    if len(uids) > 1:
        raise ValueError(f"load_series got {len(uids)} SeriesInstanceUIDs: {uids}")
    first = headers[0]
    label = _series_label(first)
    sizes = sorted({(h.rows, h.columns) for h in headers})
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c} ({sum((h.rows, h.columns) == (r, c) for h in headers)} files)" for r, c in sizes)
        raise IngestError(R.INCONSISTENT_GEOMETRY, f"{label}: Rows x Columns differ: {shown}")
    _check_claimed_size(headers, label, max_voxels)
    frames, rescale = mf.collect_frames(headers, label)
    if len(frames) < min_slices:
        raise IngestError(R.SERIES_TOO_SMALL, f"{label}: {len(frames)} image(s), fewer than {min_slices}")
    order, affine = _stack_geometry(frames, label)
    array = mf.read_pixels(frames, order, rescale, sizes[0], label)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return SeriesVolume(
        array=array, affine=affine, spacing=spacing,  # type: ignore[arg-type]
        modality=first.modality, study_uid=first.study_uid, series_uid=first.series_uid,
        series_description=first.series_description, num_slices=len(frames),
        source_files=list(dict.fromkeys(frames[i][0] for i in order)),
    )
