"""One series: load it (DICOM or NIfTI), preprocess it with the shared function, cache it.

A top-level function of plain data in and out, so ingest can run it in worker processes.
"""

from __future__ import annotations

import traceback
from typing import Any

from shared_models.config import PreprocessConfig, build_dataclass
from shared_models.volumes import preprocess_volume

from . import reasons
from .cache import write_volume
from .reasons import IngestError


def process_series(job: dict[str, Any]) -> dict[str, Any]:
    """Returns the manifest fields of the cached series, or ``{"error": (reason, detail)}``."""
    try:
        pcfg = build_dataclass(PreprocessConfig, job["preprocess"], "preprocess")
        if job["source"] == "nifti":
            from .nifti import load_nifti

            import numpy as np

            array, affine, spacing = load_nifti(job["inputs"][0][0], max_voxels=job["max_voxels"])
            num_slices = int(array.shape[int(np.argmax(np.abs(affine[2, :3])))])  # the voxel axis along S
        else:
            from .dicom import DicomHeader, load_series

            headers = [DicomHeader(**{k: tuple(v) if isinstance(v, list) else v for k, v in h.items()})
                       for h in job["headers"]]
            volume = load_series(headers, min_slices=job["min_slices"], max_voxels=job["max_voxels"])
            array, affine, spacing, num_slices = volume.array, volume.affine, volume.spacing, volume.num_slices
        tensor = preprocess_volume(array, None, job["modality"], pcfg, affine=affine)
        cache_file = write_volume(job["cache_dir"], job["series_key"], tensor[0].numpy())
        return {
            "cache_file": cache_file,
            "shape": list(tensor.shape[1:]),
            "original_shape": [int(s) for s in array.shape],
            "original_spacing": [round(float(s), 4) for s in spacing],
            "num_slices": int(num_slices),
        }
    except IngestError as err:
        return {"error": (err.reason, err.detail)}
    except Exception as err:  # noqa: BLE001 - one bad series never stops the ingest
        detail = f"{type(err).__name__}: {err} | {traceback.format_exc(limit=2).splitlines()[-1]}"
        return {"error": (reasons.UNEXPECTED_ERROR, detail)}
