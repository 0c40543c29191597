"""Training-time volume augmentation: seeded per study, the input untouched, each transform doing what it says."""

from __future__ import annotations

import pytest
import torch

from shared_models.augment import augment_volumes
from shared_models.config import AugmentConfig

ALL = AugmentConfig(intensity_shift=0.1, intensity_scale=0.2, noise_std=0.05, max_translation=2)


def volumes(b: int = 4, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 1, size, size, size, generator=torch.Generator().manual_seed(seed)) + 1.0


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_same_seed_gives_the_same_draw_and_another_seed_another():
    x = volumes()
    a, b, c = (augment_volumes(x, ALL, seeded(s)) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)


def test_each_study_gets_its_own_draw():
    x = volumes(b=1).expand(4, -1, -1, -1, -1)
    out = augment_volumes(x, ALL, seeded(0))
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_input_is_untouched_and_the_dtype_kept(dtype):
    x = volumes().to(dtype)
    kept = x.clone()
    out = augment_volumes(x, ALL, seeded(0))
    assert torch.equal(x, kept)
    assert out.dtype == dtype and out.shape == x.shape


def test_a_zero_config_is_the_identity():
    x = volumes()
    assert torch.equal(augment_volumes(x, AugmentConfig(), seeded(0)), x)


def test_translation_moves_a_bright_voxel_by_the_drawn_shift():
    k, b = 2, 32
    x = torch.zeros(b, 1, 9, 10, 11)
    x[:, 0, 4, 5, 6] = 1.0
    out = augment_volumes(x, AugmentConfig(max_translation=k), seeded(3))
    shifts = torch.randint(-k, k + 1, (b, 3), generator=seeded(3))  # translation is the only draw
    assert out.shape == x.shape
    for i in range(b):
        bright = (out[i, 0] == 1.0).nonzero().tolist()
        assert len(bright) == 1 and out[i].sum() == 1.0  # moved, not smeared or copied
        moved = [p - q for p, q in zip(bright[0], (4, 5, 6))]
        assert moved == shifts[i].tolist() and all(abs(m) <= k for m in moved)
    assert set(shifts.flatten().tolist()) == set(range(-k, k + 1))  # every shift in range is drawn somewhere


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_translation_repeats_the_border(axis):
    k, b, n = 3, 8, 10
    ramp = torch.arange(n, dtype=torch.float32)
    shape = [1, 1, 1]
    shape[axis] = n
    x = ramp.reshape(shape).expand(n, n, n).expand(b, 1, n, n, n).contiguous()
    out = augment_volumes(x, AugmentConfig(max_translation=k), seeded(1))
    shifts = torch.randint(-k, k + 1, (b, 3), generator=seeded(1))[:, axis]
    for i in range(b):  # content moves by +shift; the voxels shifted in copy the edge value
        expected = (ramp - shifts[i]).clamp(0, n - 1).reshape(shape).expand(n, n, n)
        assert torch.equal(out[i, 0], expected)


def test_noise_adds_spread_but_keeps_the_mean():
    std_max, b = 0.2, 16
    x = torch.full((b, 1, 16, 16, 16), 0.5)
    out = augment_volumes(x, AugmentConfig(noise_std=std_max), seeded(0))
    stds = out.flatten(1).std(dim=1)
    assert (stds > 0).all() and (stds <= std_max * 1.05).all()
    assert stds.max() - stds.min() > std_max / 4  # each study draws its own noise level
    assert torch.allclose(out.flatten(1).mean(dim=1), torch.full((b,), 0.5), atol=0.02)


def test_intensity_scale_multiplies_each_study_by_one_factor_in_range():
    s, b = 0.3, 64
    x = volumes(b=b, size=6)
    out = augment_volumes(x, AugmentConfig(intensity_scale=s), seeded(0))
    ratio = out / x
    factor = ratio.flatten(1)[:, :1]
    assert torch.allclose(ratio.flatten(1), factor.expand(-1, ratio[0].numel()), rtol=1e-5)
    assert ((factor >= 1 - s) & (factor <= 1 + s)).all()
    assert (factor < 1).any() and (factor > 1).any()
    assert torch.allclose(out.flatten(1).std(dim=1), x.flatten(1).std(dim=1) * factor[:, 0], rtol=1e-4)


def test_intensity_shift_adds_one_offset_per_study_in_range():
    s, b = 0.25, 64
    x = volumes(b=b, size=6)
    out = augment_volumes(x, AugmentConfig(intensity_shift=s), seeded(0))
    offset = (out - x).flatten(1)
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-6)
    assert (offset.abs() <= s).all() and (offset[:, 0] < 0).any() and (offset[:, 0] > 0).any()
    assert torch.allclose(out.flatten(1).std(dim=1), x.flatten(1).std(dim=1), rtol=1e-4)


@pytest.mark.parametrize("shape", [(1, 8, 8, 8), (1, 1, 1, 8, 8, 8), (8, 8, 8)])
def test_volumes_of_another_shape_are_refused(shape):
    with pytest.raises(ValueError, match=r"volumes should be \[B, C, D, H, W\], got shape"):
        augment_volumes(torch.zeros(shape), ALL, seeded(0))
