"""Frames of a DICOM series: per-frame geometry, rescale and frame-by-frame pixel decoding.

Enhanced CT/MR/PET objects (and legacy-converted enhanced ones) keep each frame's position, orientation,
pixel spacing and rescale in functional groups: a macro appears either once in the
SharedFunctionalGroupsSequence (same for all frames) or in every item of the
PerFrameFunctionalGroupsSequence. pydicom reads the sequences but has no helper that resolves a macro for
one frame, so :func:`functional_group` does that lookup (per-frame first, then shared). A series is
handled as a list of :data:`Frame` (one per single-frame file, one per frame of a multi-frame file), and
:func:`read_pixels` fills the volume one file, and one frame, at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, iter_pixels

from client.ingest.reasons import (NON_FINITE_PIXELS, NOT_AN_IMAGE_SERIES, UNREADABLE_DICOM, UNREADABLE_PIXELS,
                                   IngestError)

if TYPE_CHECKING:
    from client.ingest.dicom import DicomHeader


class FrameGeometry(NamedTuple):
    """The geometry of one frame, as read from the file (values may be None or non-finite)."""

    position: tuple[float, float, float] | None  # ImagePositionPatient (LPS, mm)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 direction cosines)
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm
    slice_thickness: float | None


def floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``value`` (a DS/FD element value, single or multi-valued) as ``n`` floats, or None if absent/invalid.

    Non-finite numbers are kept (the series checks refuse them with a precise reason).
    """
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    if len(items) != n:
        return None
    try:
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None


def one_float(value: Any) -> float | None:
    """A single DS/FD value as float, or None if absent or unparsable."""
    out = floats(value, 1)
    return out[0] if out is not None else None


def has_functional_groups(ds: Dataset) -> bool:
    """Whether ``ds`` is an enhanced object (has a Shared or Per-frame Functional Groups Sequence)."""
    return "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds


def functional_group(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """The first item of the functional-group macro ``keyword`` that applies to ``frame`` (0-based).

    Looks in the frame's PerFrameFunctionalGroupsSequence item first, then in the
    SharedFunctionalGroupsSequence; None when neither holds it.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        seq = per_frame[frame].get(keyword)
        if seq:
            return seq[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(keyword)
        if seq:
            return seq[0]
    return None


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames as an int (1 when absent, empty or invalid)."""
    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1
    return n if n > 0 else 1


def frame_geometry(ds: Dataset, frame: int) -> FrameGeometry:
    """Position, orientation, pixel spacing and slice thickness of ``frame`` (top-level ones if no groups)."""
    if not has_functional_groups(ds):
        return FrameGeometry(floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
                             floats(ds.get("ImageOrientationPatient"), 6),
                             floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
                             one_float(ds.get("SliceThickness")))
    pos = functional_group(ds, frame, "PlanePositionSequence")
    ori = functional_group(ds, frame, "PlaneOrientationSequence")
    meas = functional_group(ds, frame, "PixelMeasuresSequence")
    return FrameGeometry(
        position=floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None,  # type: ignore[arg-type]
        orientation=floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else None,
        pixel_spacing=floats(meas.get("PixelSpacing"), 2) if meas is not None else None,  # type: ignore[arg-type]
        slice_thickness=one_float(meas.get("SliceThickness")) if meas is not None else None,
    )


def rescale_source(ds: Dataset, frame: int) -> Dataset:
    """The dataset to hand to ``pydicom.pixels.apply_modality_lut`` for ``frame``.

    For enhanced objects that is the frame's Pixel Value Transformation macro item (it carries
    RescaleSlope/RescaleIntercept), else the dataset itself (top-level Modality LUT or rescale).
    """
    item = functional_group(ds, frame, "PixelValueTransformationSequence") if has_functional_groups(ds) else None
    if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item:
        return item
    return ds


def is_finite(values: tuple[float, ...] | None) -> bool:
    """True when ``values`` is present and every entry is finite."""
    return values is not None and all(math.isfinite(v) for v in values)


def to_float(arr: np.ndarray, source: Dataset, shape: tuple[int, int], where: str) -> np.ndarray:
    """One decoded frame through pydicom's modality LUT / rescale, as float32 of the expected shape.

    Raises:
        ValueError: the decoded frame does not have ``shape`` (Rows, Columns).
    """
    if arr.shape != shape:
        raise ValueError(f"{where}: decoded shape {arr.shape}, expected {shape}")
    out = np.asarray(apply_modality_lut(arr, source), dtype=np.float32)
    if not np.isfinite(out).all():  # e.g. RescaleSlope NaN: a blank study would train as a real one
        raise IngestError(NON_FINITE_PIXELS, f"{where}: {int((~np.isfinite(out)).sum())} of {out.size} values are NaN or "
                          "infinite after RescaleSlope/RescaleIntercept (or the modality LUT); fix those tags in the export")
    return out


def read_frames(path: str, label: str) -> tuple[list[FrameGeometry], list[Dataset]]:
    """Per-frame geometry and rescale sources of a multi-frame file, from its header only.

    Raises:
        IngestError: UNREADABLE_DICOM (header cannot be re-read, per-frame items do not match
            NumberOfFrames), NOT_AN_IMAGE_SERIES (no functional groups: no per-frame positions, e.g. a
            cine or legacy multi-frame object).
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise IngestError(UNREADABLE_DICOM, f"{label}: {path}: {type(exc).__name__}: {exc}") from exc
    n = number_of_frames(ds)
    if not has_functional_groups(ds):
        raise IngestError(NOT_AN_IMAGE_SERIES, f"{label}: {path}: {n} frames without functional groups "
                          "(no per-frame position): not a volume stack")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != n:
        raise IngestError(UNREADABLE_DICOM, f"{label}: {path}: PerFrameFunctionalGroupsSequence has "
                          f"{len(per_frame)} items for {n} frames")
    return [frame_geometry(ds, i) for i in range(n)], [rescale_source(ds, i) for i in range(n)]


def decode_frames(path: str, sources: list[Dataset], shape: tuple[int, int]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (frame index, float32 rescaled frame), decoding one frame at a time with ``iter_pixels``.

    Raises:
        ValueError: a frame has the wrong shape, or the file holds another number of frames.
    """
    count = 0
    for i, arr in enumerate(iter_pixels(path)):
        if i >= len(sources):
            break
        yield i, to_float(arr, sources[i], shape, f"{path} frame {i}")
        count += 1
    if count != len(sources):
        raise ValueError(f"{path}: decoded {count} frames, expected {len(sources)}")


Frame = tuple[str, "int | None", FrameGeometry]
"""One image of a series: (path, frame index or None for a single-frame file, geometry)."""


def collect_frames(headers: list[DicomHeader], label: str) -> tuple[list[Frame], dict[str, list[Dataset]]]:
    """Every image of a series as a :data:`Frame`, plus the per-frame rescale sources of multi-frame files.

    Single-frame files take their geometry from the header; multi-frame files are re-read (header only).
    """
    frames: list[Frame] = []
    rescale: dict[str, list[Dataset]] = {}
    for h in headers:
        if h.number_of_frames <= 1:
            geo = FrameGeometry(h.image_position, h.image_orientation, h.pixel_spacing, h.slice_thickness)
            frames.append((h.path, None, geo))
        else:
            geos, rescale[h.path] = read_frames(h.path, label)
            frames.extend((h.path, i, g) for i, g in enumerate(geos))
    return frames, rescale


def read_pixels(frames: list[Frame], order: np.ndarray, rescale: dict[str, list[Dataset]],
                shape: tuple[int, int], label: str) -> np.ndarray:
    """Decode every frame into a preallocated float32 (k, r, c) array, one file at a time.

    ``order[k]`` is the index in ``frames`` of the image that goes to slice ``k``.

    Raises:
        IngestError: UNREADABLE_PIXELS, naming the series and the file, when a file cannot be decoded.
    """
    out = np.empty((len(frames), *shape), dtype=np.float32)
    slot = {(frames[i][0], frames[i][1]): k for k, i in enumerate(order)}
    for path in dict.fromkeys(frames[i][0] for i in order):
        try:
            if path in rescale:
                for i, frame in decode_frames(path, rescale[path], shape):
                    out[slot[(path, i)]] = frame
            else:
                ds = pydicom.dcmread(path)
                out[slot[(path, None)]] = to_float(ds.pixel_array, rescale_source(ds, 0), shape, path)
                del ds
        except IngestError as err:
            raise IngestError(err.reason, f"{label}: {err.detail}") from err
        except Exception as exc:
            raise IngestError(UNREADABLE_PIXELS, f"{label}: {path}: {type(exc).__name__}: {exc}") from exc
    return out
