"""The 3D encoders: token grids of any divisible size, masking, and HLIP's attention levels."""

from __future__ import annotations

import pytest
import torch

from shared_models.config import VisionConfig
from shared_models.vision import PatchStem, ResNet3DEncoder, ViT3D, patchify, random_masking, sincos_position_3d


def vit(**kw) -> ViT3D:
    torch.manual_seed(0)
    base = dict(width=48, depth=4, heads=3, patch_size=(4, 4, 4))
    return ViT3D(VisionConfig(**{**base, **kw})).eval()


def test_hierarchical_attention_with_one_scan_equals_plain_attention():
    plain = vit()
    hier = vit(study_attention_every=2)
    hier.load_state_dict(plain.state_dict())
    assert hier.levels == ["scan", "study", "scan", "study"]
    x = torch.randn(2, 1, 16, 16, 16)
    assert torch.allclose(hier(x).tokens, plain(x).tokens, atol=1e-5)


def test_padding_scans_do_not_change_real_scans():
    hier = vit(study_attention_every=2)
    x = torch.randn(2, 1, 16, 16, 16)
    alone = hier(x).tokens
    padded_study = torch.stack([x, 100 * torch.randn_like(x)], dim=1)  # [B, S=2, 1, D, H, W]
    out = hier(padded_study, torch.tensor([[True, False], [True, False]]))
    assert out.tokens.shape == (2, 2 * 64, 48)
    assert torch.allclose(out.tokens[:, :64], alone, atol=1e-5)
    assert out.valid[:, :64].all() and not out.valid[:, 64:].any()


def test_study_blocks_mix_scans_and_scan_blocks_do_not():
    x = torch.randn(1, 2, 1, 8, 8, 8)
    changed = x.clone()
    changed[:, 1] += 1.0
    local_only = vit(study_attention_every=100)  # no block reaches the study level
    a, b = local_only(x).tokens, local_only(changed).tokens
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)  # scan 0 unaffected by scan 1
    mixed = vit(study_attention_every=2)
    a, b = mixed(x).tokens, mixed(changed).tokens
    assert not torch.allclose(a[:, :8], b[:, :8], atol=1e-4)


def test_slice_groups_are_local_along_depth():
    model = vit(depth=2, study_attention_every=100, slice_group=1, scan_attention_every=100)
    assert model.levels == ["slice", "slice"]
    x = torch.randn(1, 1, 16, 8, 8)  # token grid 4 x 2 x 2: 4 slice groups of 4 tokens
    changed = x.clone()
    changed[..., 12:, :, :] += 1.0  # last token slice only
    a, b = model(x).tokens, model(changed).tokens
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 16), (2, 1, 8, 16, 24), (1, 1, 32, 8, 8)])
def test_any_input_divisible_by_patch_size(shape):
    out = vit()(torch.randn(*shape))
    grid = tuple(s // 4 for s in shape[2:])
    assert out.grid == grid and out.tokens.shape == (shape[0], grid[0] * grid[1] * grid[2], 48)


def test_anisotropic_patches():
    model = vit(patch_size=(2, 4, 8))
    out = model(torch.randn(1, 1, 8, 8, 16))
    assert out.grid == (4, 2, 2)


@pytest.mark.parametrize(
    "shape, message",
    [((1, 16, 16, 16), "shape (1, 16, 16, 16)"), ((1, 1, 15, 16, 16), "not divisible by patch size")],
)
def test_bad_inputs_name_the_problem(shape, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        vit()(torch.randn(*shape))


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.2])
def test_mask_ratio_outside_open_interval_is_refused(ratio):
    with pytest.raises(ValueError, match=f"mask_ratio should be in \\(0, 1\\), got {ratio}"):
        vit()(torch.randn(1, 1, 8, 8, 8), mask_ratio=ratio)


def test_random_masking_keeps_the_ratio_and_restores_order():
    tokens = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16, 1)
    kept, mask, ids_restore = random_masking(tokens, 0.75, torch.Generator().manual_seed(0))
    assert kept.shape == (2, 4, 1) and mask.sum(1).tolist() == [12.0, 12.0]
    for row in range(2):  # kept tokens are exactly the unmasked positions
        assert sorted(kept[row, :, 0].long().tolist()) == [i + 16 * row for i in range(16) if mask[row, i] == 0]
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(16).expand(2, 16))


def test_patchify_orders_voxels_per_patch():
    volume = torch.arange(4 * 4 * 4, dtype=torch.float32).reshape(1, 1, 4, 4, 4)
    patches = patchify(volume, (2, 2, 2))
    assert patches.shape == (1, 8, 8)
    assert patches[0, 0].tolist() == [0, 1, 4, 5, 16, 17, 20, 21]  # the first 2x2x2 corner
    assert patches[0, 7].tolist() == [42, 43, 46, 47, 58, 59, 62, 63]


def test_sincos_positions_are_distinct_and_bounded():
    pos = sincos_position_3d((3, 4, 5), 48)
    assert pos.shape == (60, 48) and pos.abs().max() <= 1.0
    assert torch.cdist(pos, pos).add(torch.eye(60)).min() > 1e-3  # every token has its own position


def test_resnet_encoder_tokens_and_no_masking():
    enc = ResNet3DEncoder(VisionConfig(kind="resnet", width=32, resnet_layers=(1, 1, 1, 1), resnet_groups=8))
    assert not any("BatchNorm" in type(m).__name__ for m in enc.modules())
    out = enc(torch.randn(2, 1, 32, 32, 32))
    assert out.tokens.shape[0] == 2 and out.tokens.shape[2] == 32 and out.valid.all()
    with pytest.raises(ValueError, match="MAE masking needs vision.kind 'vit'"):
        enc(torch.randn(1, 1, 32, 32, 32), mask_ratio=0.5)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    """Activation checkpointing trades compute for memory: the loss and every gradient stay the same."""
    common = dict(width=32, heads=2, depth=2, patch_size=(8, 8, 8)) if kind == "vit" else \
        dict(kind="resnet", width=32, resnet_layers=(1, 1, 1, 1), resnet_groups=8)
    x = torch.randn(2, 1, 32, 32, 32)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = VisionConfig(**common, gradient_checkpointing=checkpointing)
        enc = (ViT3D(cfg) if kind == "vit" else ResNet3DEncoder(cfg)).train()
        (enc(x).tokens ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


def test_given_mask_noise_fixes_which_tokens_are_hidden():
    tokens = torch.randn(2, 8, 4)
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]] * 2)
    kept, mask, _ = random_masking(tokens, 0.5, noise=noise)
    assert mask[0].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]  # the lowest noise is kept, as in MAE
    assert torch.equal(kept[0], tokens[0, [1, 3, 5, 7]])
    with pytest.raises(ValueError, match="mask noise should have shape"):
        random_masking(tokens, 0.5, noise=noise[:, :4])


# ---------------------------------------------------------------------------------- patch stem (vision.conv_stem)


@pytest.mark.parametrize("conv_stem, kernel", [((), 4), ((8,), 4), ((6, 8), 2), ((5,), 2)])
def test_a_conv_stem_keeps_the_token_grid(conv_stem, kernel):
    model = vit(patch_size=(8, 8, 8), conv_stem=conv_stem, conv_stem_kernel=kernel)
    assert model.patch_embed.kernel_size == tuple(8 // kernel ** len(conv_stem) for _ in range(3))
    out = model(torch.randn(2, 1, 16, 24, 32))
    assert out.grid == (2, 3, 4) and out.tokens.shape == (2, 24, 48)


def _conv_like(linear: torch.nn.Linear, in_channels: int, k: int) -> torch.nn.Conv3d:
    conv = torch.nn.Conv3d(in_channels, linear.out_features, kernel_size=k, stride=k)
    with torch.no_grad():  # a Linear over (channel, kd, kh, kw) features is the kernel, flattened
        conv.weight.copy_(linear.weight.reshape(linear.out_features, in_channels, k, k, k))
        conv.bias.copy_(linear.bias)
    return conv


@pytest.mark.parametrize("in_channels, channels, k", [(1, (8,), 4), (1, (4, 6), 2), (3, (5,), 2)])
def test_patch_stem_is_a_strided_convolution_with_gelu(in_channels, channels, k):
    torch.manual_seed(0)
    stem = PatchStem(in_channels, channels, k)
    x = torch.randn(2, in_channels, 16, 8, 32)
    expected, c = x, in_channels
    for level, out in zip(stem.levels, channels):
        expected = torch.nn.functional.gelu(_conv_like(level, c, k)(expected))
        c = out
    assert torch.allclose(stem(x), expected, atol=1e-5)


def test_an_empty_patch_stem_is_the_identity():
    x = torch.randn(1, 1, 8, 8, 8)
    assert torch.equal(PatchStem(1, (), 4)(x), x)


@pytest.mark.parametrize("conv_stem, patch", [((), (4, 4, 4)), ((), (2, 4, 8)), ((6,), (8, 8, 8))])
def test_the_patch_embedding_matmul_equals_the_convolution(conv_stem, patch):
    model = vit(patch_size=patch, conv_stem=conv_stem, conv_stem_kernel=2)
    stem_out = model.stem(torch.randn(2, 1, 16, 16, 16))
    as_conv = model.patch_embed(stem_out).flatten(2).transpose(1, 2)  # [N, L, W]
    assert torch.allclose(model._embed(stem_out), as_conv, atol=1e-5)
    seen = []  # a hooked Conv3d (opacus's per-sample gradients) is called as itself, with the same result
    model.patch_embed.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert torch.allclose(model._embed(stem_out), as_conv, atol=1e-6) and len(seen) == 1


def test_mae_masking_with_a_stem_hides_the_masked_patches():
    model = vit(patch_size=(8, 8, 8), conv_stem=(4, 8), conv_stem_kernel=2)
    x = torch.randn(1, 1, 16, 16, 16)  # 8 patches
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]])
    out = model(x, mask_ratio=0.5, mask_noise=noise)
    assert out.mask[0].tolist() == [1, 0, 1, 0, 1, 0, 1, 0] and out.tokens.shape == (1, 4, 48)
    changed = x.clone()
    changed[..., :8, :8, :8] += 5.0  # patch 0, hidden: no stem kernel crosses into a kept patch
    assert torch.allclose(model(changed, mask_ratio=0.5, mask_noise=noise).tokens, out.tokens, atol=1e-6)
    changed[..., :8, :8, 8:] += 5.0  # patch 1, kept
    assert not torch.allclose(model(changed, mask_ratio=0.5, mask_noise=noise).tokens, out.tokens, atol=1e-4)


def _hu_volume(wire_hu: float) -> torch.Tensor:
    """A preprocessed tiny-preset volume of soft tissue (40 HU) with a 2-voxel wire at ``wire_hu``."""
    from shared_models.config import load_preset
    from shared_models.volumes import preprocess_volume

    hu = torch.full((64, 64, 64), 40.0)
    hu[30:32, 30:32, 10:50] = wire_hu
    return preprocess_volume(hu, (5.0, 5.0, 5.0), "CT", load_preset("tiny"))[None]


def test_the_metal_window_sees_metal_that_the_soft_tissue_window_clips():
    from shared_models.config import load_preset
    from shared_models.vision import IntensityWindows

    cfg = load_preset("tiny")
    windows = IntensityWindows(cfg.vision.input_windows, (cfg.preprocess.norm_mean, cfg.preprocess.norm_std))
    bone, metal = windows(_hu_volume(1000.0)), windows(_hu_volume(3000.0))
    assert bone.shape == metal.shape == (1, 2, 64, 64, 64)
    soft, wire = (slice(None), slice(None), 0, 0, 0), (slice(None), slice(None), 30, 30, 20)
    assert torch.allclose(bone[soft], metal[soft])                  # 40 HU: the same in both volumes
    assert torch.allclose(bone[wire][:, 0], metal[wire][:, 0])      # soft-tissue window: both clipped at 1000 HU
    low, high, mean, std = cfg.vision.input_windows[1]
    assert torch.allclose(bone[wire][:, 1], torch.tensor((0.0 - mean) / std))          # metal window: 1000 HU is 0
    assert torch.allclose(metal[wire][:, 1], torch.tensor((1.0 - mean) / std), atol=1e-3)  # ... 3000 HU its top
    # the soft-tissue channel is the -1000..1000 HU window, standardised by the preset's mean/std
    low, high, mean, std = cfg.vision.input_windows[0]
    assert torch.allclose(metal[soft][:, 0], torch.tensor(((1040.0 / 4000.0 - low) / (high - low) - mean) / std),
                          atol=1e-3)


def test_input_windows_change_the_encoder_input_not_its_state_dict_layout():
    from shared_models.config import load_preset
    from shared_models.vision import build_vision_encoder

    cfg = load_preset("tiny")
    torch.manual_seed(0)
    enc = build_vision_encoder(cfg.vision, (cfg.preprocess.norm_mean, cfg.preprocess.norm_std)).eval()
    assert enc.patch_embed.weight.shape[1] == 2                     # two channels into the patch embedding
    assert not any("window" in k for k in enc.state_dict())          # a fixed map: nothing to send or save
    with torch.no_grad():
        assert not torch.allclose(enc(_hu_volume(1000.0)).tokens, enc(_hu_volume(3000.0)).tokens, atol=1e-4)
