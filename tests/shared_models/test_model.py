"""The foundation model's public face, every objective end to end, and learning on a toy batch."""

from __future__ import annotations

import pytest
import torch

from shared_models import OBJECTIVES, build_model, load_preset, training_losses
from shared_models.objectives import osl_inputs
from shared_models.reports import findings_vector

REPORTS = [
    "FINDINGS: Large right pleural effusion. No lung nodule. IMPRESSION: Pleural effusion.",
    "FINDINGS: The heart is enlarged. No pleural effusion. IMPRESSION: Cardiomegaly.",
    "FINDINGS: A 2 cm nodule in the left upper lobe. Heart size is normal. IMPRESSION: Lung nodule.",
    "FINDINGS: Emphysema in both upper lobes. No effusion. IMPRESSION: Emphysema without effusion.",
]
FINDINGS = [
    {"Pleural effusion": True, "Lung nodule": False},
    {"Cardiomegaly": True, "Pleural effusion": False},
    {"Lung nodule": True, "Cardiomegaly": False},
    {"Emphysema": True, "Pleural effusion": False},
]


def toy_batch(size: int = 64) -> dict:
    """Four distinct smooth volumes (upsampled 4^3 noise, as different as four patients) with a block each."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(4, 1, 4, 4, 4, generator=g)
    volumes = torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)
    for i in range(4):  # a bright block at a different place in each volume
        s = slice(8 * i + 4, 8 * i + 20)
        volumes[i, 0, s, s, s] += 2.0
    labels, masks = zip(*(findings_vector(f, "ct_rate") for f in FINDINGS))
    return {
        "volume": volumes,
        "report": REPORTS,
        "findings": FINDINGS,
        "finding_labels": torch.tensor(labels),
        "finding_mask": torch.tensor(masks),
    }


def test_public_api_shapes_and_normalization(tiny_model):
    volumes = toy_batch()["volume"][:2]
    v = tiny_model.encode_volume(volumes)
    t = tiny_model.encode_text(["No pleural effusion.", "Cardiomegaly is present."])
    assert v.shape == (2, 128) and t.shape == (2, 128)
    assert torch.allclose(v.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    reports = tiny_model.generate_report(volumes, max_new_tokens=5)
    assert len(reports) == 2 and all(isinstance(r, str) for r in reports)


def test_encode_volume_accepts_a_study_with_padding(tiny_model):
    volumes = toy_batch()["volume"][:2]
    study = torch.stack([volumes, torch.zeros_like(volumes)], dim=1)
    mask = torch.tensor([[True, False], [True, False]])
    tiny_model.eval()
    assert torch.allclose(tiny_model.encode_volume(study, mask), tiny_model.encode_volume(volumes), atol=1e-5)


def test_training_losses_returns_one_entry_per_weighted_objective(tiny_model):
    weights = {"clip": 1.0, "mae": 0.5, "report": 0.0}
    losses = training_losses(tiny_model, toy_batch(), weights)
    assert set(losses) == {"clip", "mae", "total"}
    assert losses["total"].item() == pytest.approx(losses["clip"].item() + 0.5 * losses["mae"].item(), rel=1e-5)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_backpropagates_into_the_vision_encoder(tiny_model, objective):
    losses = training_losses(tiny_model, toy_batch(), {objective: 1.0})
    assert torch.isfinite(losses[objective])
    losses["total"].backward()
    grad = tiny_model.vision.patch_embed.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_sigmoid_clip_variant_trains_its_bias(make_tiny_config):
    model = build_model(make_tiny_config(clip_loss="sigmoid"))
    training_losses(model, toy_batch(), {"clip": 1.0})["total"].backward()
    assert model.logit_bias.grad is not None and model.logit_bias.grad.abs() > 0


def test_bad_arguments_name_the_bad_value(tiny_model):
    with pytest.raises(ValueError, match="got shape \\(1, 64, 64, 64\\)"):
        tiny_model.encode_volume(torch.zeros(1, 64, 64, 64))
    with pytest.raises(ValueError, match="unknown objective\\(s\\) \\['clipp'\\]"):
        training_losses(tiny_model, toy_batch(), {"clipp": 1.0})
    with pytest.raises(KeyError, match="batch has no 'finding_labels', which the 'findings' objective needs"):
        training_losses(tiny_model, {"volume": torch.zeros(2, 1, 64, 64, 64)}, {"findings": 1.0})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_preset("huge")


def test_missing_text_model_directory_is_named(tmp_path, make_tiny_config):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=f"text.model_dir '{missing}' is not a directory"):
        build_model(make_tiny_config(text={"model_dir": str(missing)}))


def test_mae_with_a_resnet_is_refused(make_tiny_config):
    cfg = make_tiny_config(vision={"kind": "resnet", "width": 64, "heads": 4, "resnet_layers": [1, 1, 1, 1]})
    model = build_model(cfg)
    with pytest.raises(ValueError, match="'mae' objective needs vision.kind 'vit'"):
        training_losses(model, toy_batch(), {"mae": 1.0})


def test_osl_prefers_the_true_polarity_after_a_few_steps():
    """The tiny preset as shipped (pretrained MiniLM text side): OSL alone teaches polarity."""
    torch.manual_seed(0)
    model = build_model(load_preset("tiny"))
    batch = {**toy_batch(), **osl_inputs(FINDINGS)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.no_grad():
        before = training_losses(model, batch, {"osl": 1.0})["osl"].item()
    for _ in range(40):
        opt.zero_grad()
        training_losses(model, batch, {"osl": 1.0})["total"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        v = model.encode_volume(batch["volume"])[batch["osl_index"]]
        pos = (v * model.encode_text(batch["osl_positive"])).sum(-1)
        neg = (v * model.encode_text(batch["osl_negative"])).sum(-1)
    assert bool((pos > neg).all()), (pos - neg).tolist()
    with torch.no_grad():
        assert training_losses(model, batch, {"osl": 1.0})["osl"].item() < 0.5 * before


def test_hundreds_of_steps_drive_every_objective_down(tiny_cfg):
    """Overfitting a fixed toy batch proves the gradients of every objective flow."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    batch = {**toy_batch(), **osl_inputs(FINDINGS)}
    weights = {name: 1.0 for name in OBJECTIVES}
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    first = None
    for _ in range(250):
        opt.zero_grad()
        losses = training_losses(model, batch, weights)
        losses["total"].backward()
        opt.step()
        first = first or {k: v.item() for k, v in losses.items()}
    last = {k: v.item() for k, v in training_losses(model, batch, weights).items()}
    for name in OBJECTIVES:  # MAE draws a new random mask each step, so it cannot reach 0 (it ends near 0.55x)
        assert last[name] < (0.65 if name == "mae" else 0.5) * first[name], (name, first[name], last[name])


@pytest.mark.parametrize("preset", ["colipri", "t3d", "hlip", "supervised_clip"])
def test_each_seed_preset_runs_a_training_step_of_its_objectives(preset, make_tiny_config):
    """Each seed preset's own code path (ResNet-50 bottleneck, HLIP studies, ...) at shrunken sizes."""
    cfg = load_preset(preset)
    small_vision = {"depth": min(cfg.vision.depth, 3), "width": 48, "heads": 3, "resnet_layers": [1, 1, 1, 1]}
    patch = cfg.vision.patch_size
    size = [2 * p for p in patch] if cfg.vision.kind == "vit" else [32, 32, 32]
    cfg = make_tiny_config(
        vision={**cfg.vision.__dict__, **small_vision},
        preprocess={"size": size}, multiview={"num_views": 2, "view_size": size},
        vocabulary=cfg.vocabulary, objectives=cfg.objectives, clip_loss=cfg.clip_loss,
    )
    model = build_model(cfg)
    batch = {**toy_batch(32), "finding_labels": torch.zeros(4, len(model.findings)), **osl_inputs(FINDINGS)}
    if preset == "hlip":  # studies of up to 3 scans, one padded
        batch["study"] = torch.randn(4, 3, 1, *size)
        batch["study_mask"] = torch.tensor([[True, True, True], [True, False, False], [True, True, False]] + [[True] * 3])
        del batch["volume"]
    else:
        batch["volume"] = torch.nn.functional.interpolate(batch["volume"], size=size)
    losses = training_losses(model, batch)
    assert set(losses) == set(cfg.objectives) | {"total"}
    losses["total"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
