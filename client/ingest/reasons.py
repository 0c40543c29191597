"""The fixed vocabulary of reasons an input is skipped or fails, as written to ``ingest_report.json``.

Every input file ends as ingested, or under exactly one of these reasons (with its path and a detail).
"""

from __future__ import annotations

# files
NOT_DICOM = "not DICOM"
UNREADABLE_DICOM = "unreadable or truncated DICOM"
NO_PIXEL_DATA = "no pixel data"
UNSUPPORTED_TRANSFER_SYNTAX = "unsupported transfer syntax"
OUTSIDE_EXPORT_ROOT = "path escapes the export root"
UNREADABLE_FOLDER = "folder that cannot be read (no permission, or a path beyond the system's limit)"
NOT_AN_IMAGE_SERIES = "not an image series (localizer, derived, report or non-volume object)"
MODALITY_NOT_SELECTED = "modality not selected by the site config"
DUPLICATE_FILE = "duplicate instance (same SOPInstanceUID)"
# series
INCONSISTENT_GEOMETRY = "inconsistent geometry (sizes, orientation or spacing differ within the series)"
MISSING_SLICES = "missing slices (gap in the series)"
DUPLICATE_SLICES = "duplicate slices (two images at one position)"
BAD_SPACING = "zero, negative or non-finite spacing"
SERIES_TOO_SMALL = "series too small"
UNREADABLE_PIXELS = "pixel data could not be decoded"
SERIES_TOO_LARGE = "series larger than the site's voxel limit (data.max_series_voxels)"
NON_FINITE_PIXELS = "non-finite pixel values (NaN or infinite after the modality rescale)"
# NIfTI
UNREADABLE_NIFTI = "unreadable NIfTI"
NIFTI_MANIFEST_ROW = "unusable NIfTI manifest row"
# reports
NO_MATCHING_REPORT = "no matching report"
REPORT_FILE_UNUSABLE = "report file unusable (missing columns, unreadable or not UTF-8)"
UNREADABLE_REPORT_ROW = "unreadable report row"
EMPTY_REPORT = "empty report"
REPORT_FOR_UNKNOWN_STUDY = "report for an unknown study"
DUPLICATE_REPORT = "duplicate report for one study"
MAX_SERIES_VOXELS = 2**29
"""The default ``data.max_series_voxels``: 2 GiB of float32, a 512 x 512 x 2048 series."""

# anything else, with the exception's text as detail: one bad input never stops an ingest
UNEXPECTED_ERROR = "unexpected error"


class IngestError(Exception):
    """An input that cannot be ingested, with one of the reasons above and a detail for the operator."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
