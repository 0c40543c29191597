"""Deterministic preprocessing of CT/MR volumes and random multi-view crops.

:func:`preprocess_volume` is the one function that hospital sites and the central evaluator both call,
so the same input always gives bit-identical output: it always runs on the CPU in float32 and uses no
randomness. Output axes are (D, H, W) = (S, A, R): depth runs inferior->superior, H posterior->anterior
and W left->right (MONAI axcodes ``"SAR"``, i.e. RAS orientation with the slice axis first).

MONAI is imported inside the functions that need it (importing it takes seconds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from shared_models.config import ModelConfig, PreprocessConfig

AXCODES = "SAR"
"""MONAI axis codes of the output: axis 0 -> superior, axis 1 -> anterior, axis 2 -> right."""

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain ``torch.Tensor`` (drops MONAI's MetaTensor wrapper and its metadata)."""
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


def _size3(size: Sequence[int], name: str) -> tuple[int, int, int]:
    """``size`` as three positive ints, else ValueError naming ``name`` and the value."""
    try:
        out = tuple(int(s) for s in size)
        ok = len(out) == 3 and all(o == s and o > 0 for o, s in zip(out, size))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} should be three positive ints (D, H, W), got {size!r}.")
    return out  # type: ignore[return-value]


def _modality(modality: str) -> str:
    """``"CT"`` or ``"MR"`` (case-insensitive; ``"MRI"`` means MR), else ValueError naming it."""
    key = modality.strip().upper() if isinstance(modality, str) else None
    if key == "CT":
        return "CT"
    if key in ("MR", "MRI"):
        return "MR"
    raise ValueError(f"unknown modality {modality!r}; expected 'CT' or 'MR' (or 'MRI').")


def _check_cfg(cfg: PreprocessConfig) -> None:
    """Check the preprocessing config values; each error names the key and the bad value.

    Args:
        cfg: the preprocessing config.
    """
    sp = tuple(float(s) for s in cfg.spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"preprocess.spacing should be three finite values > 0, got {cfg.spacing!r}.")
    _size3(cfg.size, "preprocess.size")
    lo, hi = cfg.hu_window
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"preprocess.hu_window should be finite (low, high) with low < high, "
                         f"got {cfg.hu_window!r}.")
    lo, hi = cfg.mr_percentiles
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"preprocess.mr_percentiles should satisfy 0 <= low < high <= 100, "
                         f"got {cfg.mr_percentiles!r}.")
    if not (math.isfinite(cfg.norm_std) and cfg.norm_std > 0 and math.isfinite(cfg.norm_mean)):
        raise ValueError(f"preprocess.norm_mean/norm_std should be finite with std > 0, "
                         f"got {cfg.norm_mean!r}/{cfg.norm_std!r}.")


def _voxel_spacing(spacing: Sequence[float] | None, affine: np.ndarray | None) -> tuple[float, float, float]:
    """The voxel spacing in array axis order, validated (and checked against ``affine`` if given).

    Args:
        spacing: spacing in mm per array axis, or None (only allowed with ``affine``).
        affine: 4x4 voxel->world matrix or None.
    """
    derived = None
    if affine is not None:
        derived = tuple(float(n) for n in np.linalg.norm(affine[:3, :3], axis=0))
    if spacing is None:
        if derived is None:
            raise ValueError("spacing is None but no affine was given; pass spacing (sd, sh, sw) in mm.")
        spacing = derived
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing should be three finite values > 0 (mm), got {spacing!r}.") from None
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing should be three finite values > 0 (mm), got {spacing!r}.")
    if derived is not None and not np.allclose(sp, derived, rtol=0.0, atol=1e-3):
        raise ValueError(f"spacing {sp} disagrees with the affine's voxel sizes (column norms) "
                         f"{tuple(round(d, 6) for d in derived)}; pass spacing=None to use the affine's.")
    return sp  # type: ignore[return-value]


def _as_float_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy of ``array`` (numpy and torch inputs give identical tensors)."""
    if isinstance(array, torch.Tensor):
        return _plain(array).detach().to(device="cpu", dtype=torch.float32).clone()
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True, order="C"))


def _scale_intensity(x: torch.Tensor, modality: str, cfg: PreprocessConfig) -> torch.Tensor:
    """Scale intensities to [0, 1]: CT by the HU window, MR by robust percentiles.

    Args:
        x: float32 volume, all voxels finite.
        modality: ``"CT"`` or ``"MR"``.
        cfg: the preprocessing config.
    """
    from monai.transforms import ScaleIntensityRange

    if modality == "CT":
        lo, hi = (float(v) for v in cfg.hu_window)
    else:
        # Percentiles computed here rather than by ScaleIntensityRangePercentiles: MONAI switches
        # between torch.quantile and np.percentile by size, and divides by zero (with a warning and
        # no clipping) when both percentiles are equal; we always use numpy and handle that case.
        lo, hi = (float(v) for v in np.percentile(x.numpy(), list(cfg.mr_percentiles)))
        if not hi > lo:
            # Degenerate (e.g. constant image or >99% background): the limit of the ramp as
            # hi -> lo, a step; a constant image maps to all zeros.
            return (x > lo).to(torch.float32)
    scale = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)
    return _plain(torch.as_tensor(scale(x)))


def center_crop_or_pad(volume: torch.Tensor, size: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Centre-crop or pad the last three axes of ``volume`` to ``size`` (MONAI ResizeWithPadOrCrop).

    Where an axis has an odd surplus, the crop/pad puts the extra voxel at the end.

    Args:
        volume: tensor ``[..., D, H, W]`` (any number of leading axes, including none).
        size: output size (d, h, w).
        value: constant used for padding.

    Returns:
        A plain tensor ``[..., d, h, w]`` with the dtype and device of ``volume``.
    """
    from monai.transforms import ResizeWithPadOrCrop

    size = _size3(size, "size")
    if volume.ndim < 3:
        raise ValueError(f"volume should have at least 3 axes [..., D, H, W], "
                         f"got shape {tuple(volume.shape)}.")
    lead = volume.shape[:-3]
    flat = _plain(volume).reshape(-1, *volume.shape[-3:])  # leading axes act as MONAI's channel axis
    out = ResizeWithPadOrCrop(spatial_size=size, mode="constant", value=value)(flat)
    return _plain(torch.as_tensor(out)).reshape(*lead, *size)


@torch.no_grad()
def preprocess_volume(
    array: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None,
    modality: str,
    cfg: PreprocessConfig | ModelConfig,
    affine: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn a raw CT/MR volume into the model input ``[1, D, H, W]`` (float32, CPU, deterministic).

    Steps: validate; replace NaN/inf voxels by the modality's minimum (CT: ``cfg.hu_window[0]``;
    MR: the smallest finite voxel, 0 if none), so they become 0 ("air") after scaling; scale
    intensities to [0, 1] (CT: clip to ``cfg.hu_window``; MR: ``cfg.mr_percentiles`` -> 0 and 1,
    clipped; a constant MR image gives zeros); reorient to axcodes ``"SAR"`` (only with ``affine``);
    resample to ``cfg.spacing`` with trilinear interpolation (MONAI Spacing: voxel 0 stays in place,
    edges replicate the border); centre-crop or pad with 0 to ``cfg.size``; then
    ``(x - cfg.norm_mean) / cfg.norm_std``.

    Args:
        array: 3D volume (numpy or torch). Without ``affine`` its axes are already (S, A, R);
            with ``affine`` they are in voxel order and are reoriented.
        spacing: voxel spacing in mm per array axis. With ``affine`` it may be None (taken from the
            affine's column norms), else it must agree with them to 1e-3 mm.
        modality: ``"CT"`` or ``"MR"`` (case-insensitive; ``"MRI"`` means MR).
        cfg: a :class:`PreprocessConfig`, or a :class:`ModelConfig` whose ``.preprocess`` is used.
        affine: optional 4x4 voxel->world (RAS+, mm) matrix, as nibabel's ``img.affine``. An oblique
            affine is reoriented to the closest axis codes; it is not resampled onto world axes.

    Returns:
        float32 tensor ``[1, *cfg.size]`` on the CPU.

    Raises:
        ValueError: wrong rank or empty array (names the shape), bad spacing or spacing that disagrees
            with the affine (names the values), bad affine, unknown modality, bad config values.
    """
    cfg = getattr(cfg, "preprocess", cfg)
    _check_cfg(cfg)
    mod = _modality(modality)
    shape = tuple(array.shape)
    if len(shape) != 3:
        raise ValueError(f"volume should be 3D (D, H, W), got shape {shape}.")
    if min(shape) == 0:
        raise ValueError(f"volume is empty, got shape {shape}.")
    aff = None
    if affine is not None:
        aff = np.array(_plain(affine).detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine,
                       dtype=np.float64)
        if aff.shape != (4, 4) or not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            raise ValueError(f"affine should be a finite, invertible 4x4 matrix, got {aff.tolist()}.")
    sp = _voxel_spacing(spacing, aff)

    x = _as_float_tensor(array)
    bad = ~torch.isfinite(x)
    if bad.any():
        if mod == "CT":
            fill = float(cfg.hu_window[0])
        else:
            fill = float(x[~bad].min()) if bool((~bad).any()) else 0.0
        x[bad] = fill
    x = _scale_intensity(x, mod, cfg)
    out = _to_model_grid(x, aff, sp, cfg, mode="bilinear")
    out = (out - float(cfg.norm_mean)) / float(cfg.norm_std)
    return out.contiguous()


def _to_model_grid(x: torch.Tensor, aff: np.ndarray | None, sp, cfg: PreprocessConfig, mode: str) -> torch.Tensor:
    """Orientation (SAR), resampling to ``cfg.spacing`` and centred crop/pad (with 0) to ``cfg.size``."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    if aff is None:
        # The array is already (S, A, R): an affine whose columns point along world z, y, x.
        aff = np.zeros((4, 4))
        aff[2, 0], aff[1, 1], aff[0, 2] = sp
        aff[3, 3] = 1.0
    img = MetaTensor(x[None], affine=torch.as_tensor(aff, dtype=torch.float64))
    img = Orientation(axcodes=AXCODES, labels=_RAS_LABELS)(img)  # flips/permutes only: exact
    # float32 resampling keeps memory down on 512^2 x N CTs; precision is ample for [0, 1] values.
    img = Spacing(pixdim=tuple(float(s) for s in cfg.spacing), mode=mode, dtype=np.float32)(img)
    return center_crop_or_pad(_plain(torch.as_tensor(img)).to(torch.float32), cfg.size, value=0.0)


def preprocess_label_map(
    labels: np.ndarray | torch.Tensor, cfg: PreprocessConfig | ModelConfig, affine: np.ndarray | torch.Tensor,
) -> torch.Tensor:
    """A segmentation label map on the same grid as :func:`preprocess_volume` gives its image.

    Same orientation, spacing and crop/pad as the image, with nearest-neighbour resampling and 0
    (background) padding; no intensity change. Returns int64 ``[D, H, W]``.

    Args:
        labels: 3D integer label map in voxel order. cfg: the preprocessing config.
        affine: its 4x4 voxel->world (RAS+, mm) matrix (the image's, for masks drawn on the image).
    """
    cfg = getattr(cfg, "preprocess", cfg)
    _check_cfg(cfg)
    if len(tuple(labels.shape)) != 3:
        raise ValueError(f"label map should be 3D, got shape {tuple(labels.shape)}.")
    aff = np.array(_plain(affine).detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine,
                   dtype=np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError(f"affine should be a finite, invertible 4x4 matrix, got {aff.tolist()}.")
    x = _as_float_tensor(labels)
    return _to_model_grid(x, aff, None, cfg, mode="nearest")[0].round().to(torch.int64)


def random_views(
    volumes: torch.Tensor,
    num_views: int,
    view_size: Sequence[int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``num_views`` random crops of each volume, at independent positions (T3D multi-view alignment).

    Crop corners are drawn uniformly with ``torch.randint`` on the generator's device (CPU when
    ``generator`` is None, then from torch's global RNG), per axis in the order D, H, W, each as a
    ``[B, num_views]`` draw; the crops are taken on ``volumes``' device.

    Args:
        volumes: tensor ``[B, C, D, H, W]`` (C is 1 for our model).
        num_views: crops per volume, >= 1.
        view_size: crop size (d, h, w), each at most the volume's size.
        generator: torch generator for reproducible crops.

    Returns:
        Tensor ``[B, num_views, C, d, h, w]``.
    """
    if not isinstance(volumes, torch.Tensor) or volumes.ndim != 5:
        shape = tuple(volumes.shape) if hasattr(volumes, "shape") else type(volumes).__name__
        raise ValueError(f"volumes should be a tensor [B, C, D, H, W], got shape {shape}.")
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"num_views should be an int >= 1, got {num_views!r}.")
    size = _size3(view_size, "view_size")
    spatial = tuple(volumes.shape[-3:])
    if any(v > s for v, s in zip(size, spatial)):
        raise ValueError(f"view_size {size} is larger than the volume size {spatial} (D, H, W).")
    b = volumes.shape[0]
    device = generator.device if generator is not None else torch.device("cpu")
    starts = [
        torch.randint(0, s - v + 1, (b, num_views), generator=generator, device=device).tolist()
        for s, v in zip(spatial, size)
    ]
    d, h, w = size
    views: list[torch.Tensor] = []
    for i in range(b):
        crops = []
        for m in range(num_views):
            z, y, x = starts[0][i][m], starts[1][i][m], starts[2][i][m]
            crops.append(volumes[i, :, z:z + d, y:y + h, x:x + w])
        views.append(torch.stack(crops))
    if b == 0:
        return volumes.new_empty((0, num_views, volumes.shape[1], d, h, w))
    return torch.stack(views)
