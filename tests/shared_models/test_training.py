"""Local training: the optimizer's parameter groups (text.lr_scale, weight decay, frozen parameters) and
the learning rate ``run_steps`` gives each group."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared_models import build_model
from shared_models.training import StepSettings, make_optimizer, run_steps

CPU = torch.device("cpu")
SMALL = {"preprocess": {"size": [32, 32, 32]}, "vision": {"width": 96, "depth": 2, "heads": 2}}
REPORTS = ["FINDINGS: Small left pleural effusion. The heart is enlarged.", "FINDINGS: No effusion. A 12 mm nodule.",
           "FINDINGS: Emphysema. No nodules."]
FINDINGS = [{"Pleural effusion": True, "Cardiomegaly": True}, {"Pleural effusion": False, "Lung nodule": True},
            {"Emphysema": True, "Lung nodule": False}]


@pytest.fixture
def cohort_cache(tmp_path):
    """A cohort cache as ``fedvlp-site ingest`` leaves it: float16 volumes and a manifest row per series."""
    rng = np.random.default_rng(0)
    rows = []
    for i, (report, findings) in enumerate(zip(REPORTS, FINDINGS)):
        relative = f"volumes/s{i}.npy"
        (tmp_path / "volumes").mkdir(exist_ok=True)
        np.save(tmp_path / relative, rng.normal(size=(32, 32, 32)).astype(np.float16))
        rows.append({"study_uid": f"1.2.{i}", "series_key": f"1.2.{i}.1", "num_slices": 32, "cache_file": relative,
                     "report": report, "findings": findings})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def settings(**overrides) -> StepSettings:
    return StepSettings(**{"steps": 1, "lr": 1e-3, "weights": {"clip": 1.0}, "batch_size": 2, **overrides})


def small_model(make_tiny_config, **text):
    torch.manual_seed(0)
    return build_model(make_tiny_config(**SMALL, text=text))


@pytest.mark.parametrize("trainable_layers", [-1, 0, 1])
def test_text_tower_groups_get_the_text_lr_scale_and_frozen_parameters_stay_out(make_tiny_config, trainable_layers):
    model = small_model(make_tiny_config, trainable_layers=trainable_layers, lr_scale=0.1)
    s = settings(weight_decay=0.05)
    optimizer = make_optimizer(model, s, CPU)
    tower = {id(p) for p in model.text.parameters()}
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped))  # each parameter in one group
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    frozen = [p for n, p in model.text.named_parameters() if not p.requires_grad and ".pooler." not in n]
    assert bool(frozen) == (trainable_layers >= 0)  # (BERT's pooler is never used, so never trained)
    for group in optimizer.param_groups:
        in_tower = {id(p) in tower for p in group["params"]}
        assert len(in_tower) == 1  # a group is all tower or all the rest
        assert group["lr_scale"] == (0.1 if in_tower.pop() else 1.0)
        assert group["weight_decay"] == (0.05 if group["params"][0].dim() >= 2 else 0.0)
        assert all((p.dim() >= 2) == (group["params"][0].dim() >= 2) for p in group["params"])
    scaled = sum(p.numel() for g in optimizer.param_groups if g["lr_scale"] == 0.1 for p in g["params"])
    assert scaled == sum(p.numel() for p in model.text.parameters() if p.requires_grad)
    assert (scaled == 0) == (trainable_layers == 0)


def test_a_model_without_a_text_tower_has_one_scale():
    optimizer = make_optimizer(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)), settings(), CPU)
    assert [g["lr_scale"] for g in optimizer.param_groups] == [1.0, 1.0]


@pytest.mark.parametrize("lr_scale", [0.0, 0.5])
def test_run_steps_trains_the_text_tower_at_its_scaled_rate(make_tiny_config, cohort_cache, lr_scale):
    model = small_model(make_tiny_config, trainable_layers=-1, lr_scale=lr_scale)
    s = settings()
    optimizer = make_optimizer(model, s, CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_steps(model, [cohort_cache], s, optimizer, CPU)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(s.lr * group["lr_scale"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    tower = {n for n in before if n.startswith("text.")}
    assert changed & {n for n in before if n.startswith("vision.")}  # the rest trains at the full rate
    assert bool(changed & tower) == (lr_scale > 0)  # a zero scale keeps the tower where it was
