"""Loading NIfTI volumes (already-converted exports) with nibabel.

:func:`load_nifti` returns what :func:`shared_models.volumes.preprocess_volume` takes with ``affine=``:
the voxel array in file order, nibabel's RAS+ affine (sform or qform, as nibabel chooses) and the voxel
spacing as the affine's column norms (``preprocess_volume`` checks the two agree).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from client.ingest.reasons import MAX_SERIES_VOXELS, SERIES_TOO_LARGE, UNREADABLE_NIFTI, IngestError


def load_nifti(path: str | Path, max_voxels: int = MAX_SERIES_VOXELS) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Load a 3D NIfTI (``.nii`` or ``.nii.gz``) as (float32 array, 4x4 RAS+ affine, voxel spacing in mm).

    Intensities are nibabel's ``get_fdata`` (``scl_slope``/``scl_inter`` applied). Trailing singleton
    axes beyond the third (e.g. a 4D file with one volume) are squeezed.

    Raises:
        IngestError: UNREADABLE_NIFTI when the file is missing, not NIfTI, corrupt or truncated, is
            not 3D (a real 4D series is refused, not split), or its affine is not finite and invertible;
            SERIES_TOO_LARGE when its header claims more than ``max_voxels`` voxels (checked before the
            voxels are read).
    """
    p = Path(path)
    try:
        img = nib.load(p)
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, OSError, EOFError, ...
        raise IngestError(UNREADABLE_NIFTI, f"{p}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(img, (nib.Nifti1Pair, nib.Nifti2Pair)):  # .nii(.gz) and .hdr/.img pairs
        raise IngestError(UNREADABLE_NIFTI, f"{p}: a {type(img).__name__}, not a NIfTI image")
    shape = tuple(int(s) for s in img.shape)
    keep = len(shape)
    while keep > 3 and shape[keep - 1] == 1:
        keep -= 1
    if keep != 3:
        what = f"{keep}D" if keep > 3 else f"{len(shape)}D"
        raise IngestError(UNREADABLE_NIFTI, f"{p}: {what} image of shape {shape}; only 3D volumes are ingested")
    if int(np.prod(shape[:3], dtype=np.int64)) > max_voxels:
        raise IngestError(SERIES_TOO_LARGE, f"{p}: {shape[:3]} voxels over the limit of {max_voxels}; raise "
                          "data.max_series_voxels in the site YAML if the image is real")
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise IngestError(UNREADABLE_NIFTI, f"{p}: affine is not finite and invertible: {affine.tolist()}")
    try:
        data = img.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as exc:  # truncated or corrupt data block, bad gzip stream
        raise IngestError(UNREADABLE_NIFTI, f"{p}: cannot read the voxel data: {type(exc).__name__}: {exc}") from exc
    if p.name.lower().endswith(".gz"):
        _check_gzip(p)
    data = np.ascontiguousarray(data.reshape(shape[:3]))
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return data, affine, spacing  # type: ignore[return-value]


def _check_gzip(p: Path) -> None:
    """Read a gzip file to its end, where its CRC-32 and length are checked: nibabel stops reading once it
    has the voxels, so damaged data that still inflates would be ingested as garbage. Costs a second
    decompression of the file."""
    try:
        with gzip.open(p, "rb") as f:
            while f.read(1 << 22):
                pass
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise IngestError(UNREADABLE_NIFTI, f"{p}: the gzip stream is damaged ({type(exc).__name__}: {exc}); "
                          "re-export or re-copy the file") from exc
