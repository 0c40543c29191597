"""Tests of shared_models.volumes: deterministic preprocessing and random multi-view crops."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from shared_models.config import ModelConfig, PreprocessConfig
from shared_models.volumes import center_crop_or_pad, preprocess_volume, random_views

MEAN, STD = 0.25, 0.3


def _cfg(spacing=(1.0, 1.0, 1.0), size=(16, 16, 16), **kw) -> PreprocessConfig:
    return PreprocessConfig(spacing=spacing, size=size, norm_mean=MEAN, norm_std=STD, **kw)


def _unnorm(out: torch.Tensor) -> torch.Tensor:
    """Back to the [0, 1] intensity scale."""
    return out * STD + MEAN


def _air() -> float:
    return (0.0 - MEAN) / STD


# ---------------------------------------------------------------- CT intensities


@pytest.mark.parametrize("window", [(-1000.0, 1000.0), (-200.0, 400.0)])
def test_ct_window_scaling_and_clipping(window):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1500, 1500, size=(10, 12, 14)).astype(np.float32)
    hu[3:6, 4:8, 5:9] = 300.0  # bright block
    hu[0, 0, 0], hu[0, 0, 1] = -3000.0, 5000.0  # far outside the window
    cfg = _cfg(size=(10, 12, 14), hu_window=window)
    out = preprocess_volume(hu, (1.0, 1.0, 1.0), "CT", cfg)
    assert out.shape == (1, 10, 12, 14) and out.dtype == torch.float32
    lo, hi = window
    expected = ((np.clip(hu, lo, hi) - lo) / (hi - lo) - MEAN) / STD
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5, rtol=0)
    block = ((300.0 - lo) / (hi - lo) - MEAN) / STD
    np.testing.assert_allclose(out[0, 3:6, 4:8, 5:9].numpy(), block, atol=1e-5, rtol=0)
    assert out[0, 0, 0, 0].item() == pytest.approx((0 - MEAN) / STD, abs=1e-5)
    assert out[0, 0, 0, 1].item() == pytest.approx((1 - MEAN) / STD, abs=1e-5)


def test_nonfinite_voxels_become_the_modality_minimum():
    hu = np.full((8, 8, 8), 500.0, dtype=np.float32)
    hu[1, 2, 3], hu[4, 4, 4], hu[5, 5, 5] = np.nan, np.inf, -np.inf
    out = preprocess_volume(hu, (1, 1, 1), "CT", _cfg(size=(8, 8, 8)))
    for idx in [(1, 2, 3), (4, 4, 4), (5, 5, 5)]:
        assert out[(0, *idx)].item() == pytest.approx(_air(), abs=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx((0.75 - MEAN) / STD, abs=1e-5)
    mr = np.random.default_rng(1).uniform(10, 20, size=(8, 8, 8)).astype(np.float32)
    mr[2, 2, 2] = np.nan
    out = preprocess_volume(mr, (1, 1, 1), "MR", _cfg(size=(8, 8, 8)))
    assert torch.isfinite(out).all()
    assert out[0, 2, 2, 2].item() == pytest.approx(_air(), abs=1e-6)


# ---------------------------------------------------------------- resampling


def _block_volume(shape, block) -> np.ndarray:
    vol = np.full(shape, -1000.0, dtype=np.float32)  # air -> 0
    vol[block] = 1000.0  # -> 1
    return vol


def test_resample_1mm_to_2mm_halves_the_object():
    vol = _block_volume((40, 40, 40), np.s_[10:20, 10:20, 10:20])
    out = preprocess_volume(vol, (1.0, 1.0, 1.0), "CT", _cfg(spacing=(2.0, 2.0, 2.0), size=(20, 20, 20)))
    inside = (_unnorm(out[0]) > 0.5).nonzero()
    assert inside.shape[0] == 5 ** 3  # 10 voxels -> 5 voxels per axis
    assert inside.min(0).values.tolist() == [5, 5, 5]
    assert inside.max(0).values.tolist() == [9, 9, 9]


def test_anisotropic_slices_resampled_along_depth_only():
    vol = _block_volume((8, 20, 20), np.s_[2:4, 5:15, 5:15])  # 5 mm slices, 1 mm in-plane
    out = preprocess_volume(vol, (5.0, 1.0, 1.0), "CT", _cfg(spacing=(2.5, 1.0, 1.0), size=(15, 20, 20)))
    x = _unnorm(out[0])
    # slices at 10 and 15 mm become 2.5 mm steps; 7.5 and 17.5 mm lie halfway to air
    profile = [0, 0, 0, 0.5, 1, 1, 1, 0.5, 0, 0, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(x[:, 10, 10].numpy(), profile, atol=1e-5)
    # in-plane untouched: a fully inside slice is exactly the original in-plane mask
    mask = np.zeros((20, 20), dtype=np.float32)
    mask[5:15, 5:15] = 1
    np.testing.assert_allclose(x[5].numpy(), mask, atol=1e-5)


# ---------------------------------------------------------------- orientation

WORLD_AXIS = {0: 2, 1: 1, 2: 0}  # base (S, A, R) axis -> world RAS+ coordinate index (z, y, x)


def _reoriented(base: np.ndarray, base_spacing, perm, signs):
    """``base`` (S, A, R) stored with voxel axis i = base axis perm[i], flipped where signs[i] < 0."""
    arr = np.transpose(base, perm)
    aff = np.zeros((4, 4))
    aff[:3, 3] = (10.0, -20.0, 30.0)
    aff[3, 3] = 1.0
    for i, (p, s) in enumerate(zip(perm, signs)):
        if s < 0:
            arr = np.flip(arr, axis=i)
        aff[WORLD_AXIS[p], i] = s * base_spacing[p]
    return np.ascontiguousarray(arr), aff


ORIENTATIONS = [
    ((0, 1, 2), (1, 1, 1)),  # already SAR
    ((2, 1, 0), (1, 1, 1)),  # RAS (nibabel canonical)
    ((2, 1, 0), (-1, -1, 1)),  # LPS (DICOM style)
    ((2, 1, 0), (1, 1, -1)),  # RAI
    ((1, 0, 2), (1, 1, -1)),  # voxel axes A, S, L
    ((2, 0, 1), (-1, -1, -1)),  # voxel axes L, I, P
]


@pytest.mark.parametrize("perm,signs", ORIENTATIONS)
def test_orientation_puts_marker_at_same_sar_position(perm, signs):
    base_spacing = (2.0, 1.0, 1.5)
    base = np.full((6, 7, 8), -1000.0, dtype=np.float32)
    base[1, 2, 3] = 1000.0  # marker near the inferior-posterior-left corner
    base[4, 5, 6] = 0.0  # a second, dimmer marker
    cfg = _cfg(spacing=base_spacing, size=(6, 7, 8))
    ref = preprocess_volume(base, base_spacing, "CT", cfg)
    assert ref[0].flatten().argmax().item() == np.ravel_multi_index((1, 2, 3), (6, 7, 8))
    arr, aff = _reoriented(base, base_spacing, perm, signs)
    voxel_spacing = [base_spacing[p] for p in perm]
    for spacing in (None, voxel_spacing):
        out = preprocess_volume(arr, spacing, "CT", cfg, affine=aff)
        assert torch.equal(out, ref)
    # and after resampling (1 mm isotropic) both paths still agree
    cfg1 = _cfg(spacing=(1.0, 1.0, 1.0), size=(12, 8, 12))
    ref1 = preprocess_volume(base, base_spacing, "CT", cfg1)
    out1 = preprocess_volume(arr, None, "CT", cfg1, affine=torch.as_tensor(aff))
    torch.testing.assert_close(out1, ref1, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- crop / pad


def test_crop_and_pad_are_centred_and_pad_with_air():
    hu = np.linspace(-900, 900, 20 * 10 * 16, dtype=np.float32).reshape(20, 10, 16)
    out = preprocess_volume(hu, (1, 1, 1), "CT", _cfg(size=(16, 16, 16)))
    assert out.shape == (1, 16, 16, 16)
    expected = ((hu[2:18] + 1000) / 2000 - MEAN) / STD  # depth 20 -> 16: crop 2 each side
    np.testing.assert_allclose(out[0, :, 3:13].numpy(), expected, atol=1e-5)  # H 10 -> 16: pad 3 each side
    pad = torch.cat([out[0, :, :3], out[0, :, 13:]]).flatten()
    torch.testing.assert_close(pad, torch.full_like(pad, _air()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
def test_center_crop_or_pad_helper(lead):
    vol = torch.arange(float(np.prod(lead, dtype=int) * 5 * 6 * 7)).reshape(*lead, 5, 6, 7)
    out = center_crop_or_pad(vol, (3, 8, 7), value=-1.0)
    assert out.shape == (*lead, 3, 8, 7) and type(out) is torch.Tensor
    assert torch.equal(out[..., 1:7, :], vol[..., 1:4, :, :])
    assert (out[..., 0, :] == -1).all() and (out[..., 7, :] == -1).all()


# ---------------------------------------------------------------- MR


def test_mr_percentile_scaling_is_robust_to_outliers():
    rng = np.random.default_rng(2)
    clean = (100 + 10 * rng.standard_normal((20, 20, 20))).astype(np.float32)
    spiky = clean.copy()
    spiky.flat[[5, 500, 5000, 7000]] = 1e6  # a few extreme voxels (0.05 %)
    cfg = _cfg(size=(20, 20, 20))
    out = preprocess_volume(spiky, (1, 1, 1), "MR", cfg)
    lo, hi = np.percentile(spiky, [0.5, 99.5])
    expected = (np.clip((spiky - lo) / (hi - lo), 0, 1) - MEAN) / STD
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)
    assert out[0].flatten()[5].item() == pytest.approx((1 - MEAN) / STD, abs=1e-6)
    x = _unnorm(out[0])
    assert 0.3 < x.median().item() < 0.7  # the bulk is not squashed towards 0 by the outliers
    ref = _unnorm(preprocess_volume(clean, (1, 1, 1), "MR", cfg)[0])
    keep = np.ones(clean.size, dtype=bool)
    keep[[5, 500, 5000, 7000]] = False
    assert (x.flatten()[keep] - ref.flatten()[keep]).abs().max().item() < 0.05


@pytest.mark.parametrize("modality", ["MR", "mr", "MRI", " Mri "])
def test_mr_constant_image_maps_to_zero(modality):
    out = preprocess_volume(np.full((6, 6, 6), 7.0), (1, 1, 1), modality, _cfg(size=(6, 6, 6)))
    torch.testing.assert_close(out, torch.full_like(out, _air()), atol=1e-6, rtol=0)


def test_mr_degenerate_percentiles_give_a_step():
    vol = np.zeros((10, 10, 10), dtype=np.float32)
    vol[0, 0, :3] = 50.0  # 0.3 % bright: both percentiles are 0
    out = _unnorm(preprocess_volume(vol, (1, 1, 1), "MR", _cfg(size=(10, 10, 10)))[0])
    assert out[0, 0, :3].tolist() == pytest.approx([1, 1, 1], abs=1e-6)
    assert out.sum().item() == pytest.approx(3, abs=1e-4)


# ---------------------------------------------------------------- determinism and config


def test_deterministic_and_input_type_independent():
    rng = np.random.default_rng(3)
    vol = rng.uniform(-1200, 1200, size=(13, 11, 9)).astype(np.float64)
    cfg = _cfg(spacing=(1.5, 1.5, 1.5), size=(8, 8, 8))
    a = preprocess_volume(vol, (2.0, 1.0, 1.0), "ct", cfg)
    b = preprocess_volume(vol, (2.0, 1.0, 1.0), "CT", cfg)
    c = preprocess_volume(torch.from_numpy(vol), [2, 1, 1], "CT", cfg)
    assert torch.equal(a, b) and torch.equal(a, c)
    model_cfg = ModelConfig(preprocess=cfg)
    assert torch.equal(preprocess_volume(vol, (2.0, 1.0, 1.0), "CT", model_cfg), a)


# ---------------------------------------------------------------- bad inputs

EYE = np.eye(4)
AFF_122 = np.diag([1.0, 2.0, 2.0, 1.0])

BAD = [
    (np.zeros((4, 4)), (1, 1, 1), "CT", None, ["(4, 4)"]),
    (np.zeros((1, 4, 4, 4)), (1, 1, 1), "CT", None, ["(1, 4, 4, 4)"]),
    (np.zeros((0, 4, 4)), (1, 1, 1), "CT", None, ["(0, 4, 4)"]),
    (np.zeros((4, 4, 4)), (1.0, 0.0, 1.0), "CT", None, ["(1.0, 0.0, 1.0)"]),
    (np.zeros((4, 4, 4)), (1.0, float("nan"), 1.0), "CT", None, ["(1.0, nan, 1.0)"]),
    (np.zeros((4, 4, 4)), (1.0, 1.0, -2.0), "CT", None, ["(1.0, 1.0, -2.0)"]),
    (np.zeros((4, 4, 4)), (1.0, 1.0), "CT", None, ["(1.0, 1.0)"]),
    (np.zeros((4, 4, 4)), None, "CT", None, ["spacing is None"]),
    (np.zeros((4, 4, 4)), (1, 1, 1), "PET", None, ["'PET'"]),
    (np.zeros((4, 4, 4)), (1, 1, 1), "", None, ["''"]),
    (np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), "CT", AFF_122, ["(1.0, 1.0, 1.0)", "(1.0, 2.0, 2.0)"]),
    (np.zeros((4, 4, 4)), (1, 1, 1), "CT", np.zeros((4, 4)), ["affine"]),
]


@pytest.mark.parametrize("array,spacing,modality,affine,names", BAD)
def test_bad_inputs_raise_value_error_naming_the_value(array, spacing, modality, affine, names):
    with pytest.raises(ValueError) as err:
        preprocess_volume(array, spacing, modality, _cfg(size=(4, 4, 4)), affine=affine)
    for name in names:
        assert name in str(err.value)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match=re.escape("(50.0, 10.0)")):
        preprocess_volume(np.zeros((4, 4, 4)), (1, 1, 1), "MR", _cfg(mr_percentiles=(50.0, 10.0)))


# ---------------------------------------------------------------- random views


def _ramp(b, c, shape) -> torch.Tensor:
    return torch.arange(float(b * c * np.prod(shape))).reshape(b, c, *shape)


def _offset(vol: torch.Tensor, view: torch.Tensor, b: int) -> tuple[int, int, int]:
    """The crop corner of ``view`` in the ramp volume ``vol`` (values are unique)."""
    d, h, w = vol.shape[-3:]
    r = int(view[0, 0, 0, 0].item()) - b * vol[0].numel()
    return r // (h * w), (r // w) % h, r % w


@pytest.mark.parametrize("num_views,view_size", [(4, (3, 4, 5)), (1, (6, 7, 8)), (3, (1, 1, 1))])
def test_random_views_are_crops_of_the_volume(num_views, view_size):
    vol = _ramp(2, 1, (6, 7, 8))
    views = random_views(vol, num_views, view_size, torch.Generator().manual_seed(0))
    assert views.shape == (2, num_views, 1, *view_size)
    d, h, w = view_size
    offsets = set()
    for b in range(2):
        for m in range(num_views):
            z, y, x = _offset(vol, views[b, m], b)
            assert 0 <= z <= 6 - d and 0 <= y <= 7 - h and 0 <= x <= 8 - w
            assert torch.equal(views[b, m], vol[b, :, z:z + d, y:y + h, x:x + w])
            offsets.add((z, y, x))
    if view_size == (6, 7, 8):
        assert offsets == {(0, 0, 0)}
    else:
        assert len(offsets) > 1  # independent positions per view


def test_random_views_deterministic_for_a_seed():
    vol = torch.randn(3, 1, 10, 10, 10)
    a = random_views(vol, 3, (4, 4, 4), torch.Generator().manual_seed(7))
    b = random_views(vol, 3, (4, 4, 4), torch.Generator().manual_seed(7))
    c = random_views(vol, 3, (4, 4, 4), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert random_views(vol, 2, (4, 4, 4)).shape == (3, 2, 1, 4, 4, 4)  # global RNG


@pytest.mark.parametrize("view_size", [(7, 4, 4), (4, 4, 9)])
def test_random_views_too_large_names_both(view_size):
    with pytest.raises(ValueError) as err:
        random_views(torch.zeros(1, 1, 6, 7, 8), 2, view_size)
    assert str(tuple(view_size)) in str(err.value) and "(6, 7, 8)" in str(err.value)


@pytest.mark.parametrize("vol,num_views,view_size", [
    (torch.zeros(1, 6, 7, 8), 2, (2, 2, 2)),
    (torch.zeros(1, 1, 6, 7, 8), 0, (2, 2, 2)),
    (torch.zeros(1, 1, 6, 7, 8), 2, (2, 0, 2)),
])
def test_random_views_bad_arguments(vol, num_views, view_size):
    with pytest.raises(ValueError):
        random_views(vol, num_views, view_size)


def test_label_maps_land_on_the_image_grid_with_nearest_neighbour():
    from shared_models.config import PreprocessConfig
    from shared_models.volumes import preprocess_label_map

    cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.0), size=(16, 16, 16))
    image = np.full((32, 32, 32), -1000.0, dtype=np.float32)
    labels = np.zeros((32, 32, 32), dtype=np.uint8)
    image[8:16, 10:20, 4:12] = 300.0
    labels[8:16, 10:20, 4:12] = 3  # a finding drawn on the image
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # voxel axes (R flipped, A, S) at 1 mm
    x = preprocess_volume(image, None, "CT", cfg, affine=affine)[0]
    y = preprocess_label_map(labels, cfg, affine)
    assert y.dtype == torch.int64 and y.shape == (16, 16, 16)
    assert set(torch.unique(y).tolist()) == {0, 3}  # nearest: no blended label values
    bright = x > x.min() + 1.0
    assert torch.equal(bright, y == 3)  # the label sits exactly where the image shows the finding
