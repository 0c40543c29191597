"""Data parallelism over a site's GPUs: 2 DDP processes (gloo, CPU) train as 1 process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared_models import build_model, training_losses
from shared_models import distributed
from shared_models.objectives import osl_inputs
from shared_models.reports import findings_vector
from shared_models.volumes import random_views

WORKER = Path(__file__).with_name("ddp_step_worker.py")
REPORTS = ["Small left pleural effusion. The heart is enlarged.", "No pleural effusion. A 12 mm nodule.",
           "Emphysema. No nodules. Cardiomegaly.", "Normal chest. No effusion, no cardiomegaly."]
FINDINGS = [{"Pleural effusion": True, "Cardiomegaly": True}, {"Pleural effusion": False, "Lung nodule": True},
            {"Emphysema": True, "Lung nodule": False, "Cardiomegaly": True},
            {"Pleural effusion": False, "Cardiomegaly": False}]
ALL_SIX = {"clip": 1.0, "osl": 0.5, "multiview": 0.5, "mae": 1.0, "report": 0.5, "findings": 1.0}


def global_batch(cfg, n: int = 4) -> dict:
    """A fixed batch of ``n`` studies with every key each objective needs, randomness drawn up front."""
    g = torch.Generator().manual_seed(0)
    volumes = torch.randn(n, 1, *cfg.preprocess.size, generator=g)
    labels, masks = zip(*(findings_vector(f, cfg.vocabulary) for f in FINDINGS[:n]))
    tokens = 1
    for size, patch in zip(cfg.preprocess.size, cfg.vision.patch_size):
        tokens *= size // patch
    return {
        "volume": volumes,
        "report": REPORTS[:n], "report_target": REPORTS[:n], "findings": FINDINGS[:n],
        "finding_labels": torch.tensor(labels), "finding_mask": torch.tensor(masks),
        "views": random_views(volumes, cfg.multiview.num_views, cfg.multiview.view_size, g),
        "mae_noise": torch.rand(n, tokens, generator=g),
        **osl_inputs(FINDINGS[:n]),
    }


@pytest.fixture
def case(tmp_path, make_tiny_config):
    cfg = make_tiny_config(preprocess={"size": [32, 32, 32]}, multiview={"view_size": [16, 16, 16]},
                           vision={"patch_size": [8, 8, 8], "width": 48, "depth": 2, "heads": 2},
                           decoder={"width": 32, "layers": 1, "heads": 2},
                           mae={"decoder_width": 32, "decoder_heads": 2}, embed_dim=32, pool_heads=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    return {"config": cfg, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "batch": global_batch(cfg), "lr": 0.5}


# SGD, so the update is the gradient itself: Adam's first step (+-lr whatever the gradient's size) would
# turn rounding noise in near-zero gradients into full-size differences.
def one_process_step(case: dict, weights: dict) -> tuple[dict, dict]:
    model = build_model(case["config"])
    model.load_state_dict(case["state"])
    model.eval()  # no dropout: the two runs would draw different masks
    optimizer = torch.optim.SGD(model.parameters(), lr=case["lr"])
    losses = training_losses(model, case["batch"], weights)
    losses["total"].backward()
    optimizer.step()
    return model.state_dict(), {k: v.detach() for k, v in losses.items()}


def two_process_step(case: dict, weights: dict, tmp_path: Path) -> tuple[dict, dict]:
    path = tmp_path / "case.pt"
    torch.save({**case, "weights": weights}, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(path), str(tmp_path / "ddp")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = torch.load(tmp_path / "ddp.pt", weights_only=False)
    return result["state"], result["losses"]


def test_two_ddp_processes_make_the_update_of_one_process_on_the_global_batch(case, tmp_path):
    weights = ALL_SIX
    single_state, single_losses = one_process_step(case, weights)
    ddp_state, ddp_losses = two_process_step(case, weights, tmp_path)
    for name in single_losses:
        assert torch.allclose(ddp_losses[name], single_losses[name], rtol=1e-4, atol=1e-5), name
    moved = 0
    for key, before in case["state"].items():
        if not before.is_floating_point():
            continue
        update, ddp_update = single_state[key] - before, ddp_state[key] - before
        assert torch.allclose(ddp_update, update, rtol=1e-3, atol=1e-6), key
        moved += int(not torch.equal(single_state[key], before))
    assert moved > 10  # the step really changed the model (a vacuous equality would pass otherwise)


def test_splitting_the_batch_without_gathering_changes_the_contrastive_update(case, tmp_path):
    """The all-gather matters: per-rank CLIP over half batches is a different (wrong) loss."""
    weights = {"clip": 1.0}
    single_state, _ = one_process_step(case, weights)
    halves = [{k: v[i * 2:(i + 1) * 2] for k, v in case["batch"].items() if not k.startswith("osl_")} for i in range(2)]
    model = build_model(case["config"])
    model.load_state_dict(case["state"])
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=case["lr"])
    (sum(training_losses(model, half, weights)["total"] for half in halves) / 2).backward()
    optimizer.step()
    differs = [k for k, v in model.state_dict().items()
               if v.is_floating_point() and not torch.allclose(v, single_state[k], rtol=1e-3, atol=1e-5)]
    assert differs


def test_outside_a_process_group_the_helpers_are_identities():
    x = torch.randn(3, 4, requires_grad=True)
    assert not distributed.active() and distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.gather_with_grad(x) is x and distributed.gather_local_first(x) is x
    assert distributed.rescale_mean(x.sum(), 7) is not None and float(distributed.global_sum(2.5)) == 2.5
