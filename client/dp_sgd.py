"""Sample-level DP-SGD at a site (opacus), for the objectives whose loss is a mean of per-sample terms.

With ``privacy.sample_dp: true`` in the site YAML, a round trains MAE, report generation and the
supervised findings head with per-sample gradient clipping (``max_grad_norm``) and Gaussian noise
(``noise_multiplier``), on batches drawn by Poisson sampling (rate ``batch_size / studies``), and an RDP
accountant composes every step. The accountant's ledger is kept on the site's disk per run and round,
so the whole run is one accountant (a re-run round starts from the previous round's ledger); the
site's cumulative epsilon at ``target_delta`` is reported each round (``dp-epsilon``).

Batch-coupled objectives (CLIP, OSL, multi-view) are refused: a contrastive loss couples every sample of
the batch, so clipping "per-sample" gradients bounds nothing. Client-level DP (the run recipe's ``dp``)
covers them.

Built from opacus's parts (GradSampleModule, DPOptimizer, RDPAccountant, the Poisson batch sampler)
rather than ``PrivacyEngine.make_private``, whose data-loader wrapper expects tuple samples and cannot
build the empty batches of Poisson sampling for our dict batches; an empty batch here is a noise-only
step, as opacus's own empty batches are.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from shared_models.cohort import Collate
from shared_models.objectives import BATCH_COUPLED, training_losses
from shared_models.training import StepSettings, cohort_dataset

log = logging.getLogger(__name__)


class SampleDPError(ValueError):
    """Sample-level DP cannot run as asked (objectives, budget); nothing was trained."""


def check_objectives(weights: dict[str, float], source: str) -> dict[str, float]:
    """The active objectives, if all of them decompose into per-sample terms."""
    active = {k: w for k, w in weights.items() if w > 0}
    coupled = sorted(set(active) & set(BATCH_COUPLED))
    if coupled:
        raise SampleDPError(
            f"{source}: privacy.sample_dp (DP-SGD) cannot protect the batch-coupled objective(s) {', '.join(coupled)}: "
            f"their loss couples every study in a batch, so per-sample clipping bounds nothing. Ask the federation "
            f"to set their weights to 0 (mae, report and findings decompose), or turn sample_dp off and rely on "
            f"client-level DP (the run recipe's dp: server or client).")
    if not active:
        raise SampleDPError(f"{source}: no objective to train under DP-SGD.")
    return active


class _PoissonCollate:
    """The model collate, or None for an empty Poisson batch."""

    def __init__(self, collate: Collate) -> None:
        self.collate = collate

    def __call__(self, items):
        return self.collate(items) if items else None


def accountant_file(state_dir: Path, server_round: int) -> Path:
    return state_dir / f"dp_accountant_round{server_round:04d}.json"


def load_accountant(state_dir: Path, server_round: int) -> RDPAccountant:
    """The ledger after round ``server_round - 1`` (empty for a run's first round)."""
    accountant = RDPAccountant()
    path = accountant_file(state_dir, server_round - 1)
    if path.is_file():
        accountant.history = [tuple(entry) for entry in json.loads(path.read_text())["history"]]
    elif server_round > 1 and any(state_dir.glob("dp_accountant_round*.json")):
        raise SampleDPError(f"no DP-SGD ledger for round {server_round - 1} in {state_dir}, but later or earlier "
                            "ones exist: the site's budget cannot be continued; start a new run.")
    return accountant


def save_accountant(accountant: RDPAccountant, state_dir: Path, server_round: int) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = accountant_file(state_dir, server_round)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"history": [list(h) for h in accountant.history]}))
    tmp.replace(path)


def trainable_for(model, batch: dict[str, Any], weights: dict[str, float]) -> list[str]:
    """Freeze every parameter the objectives do not reach; returns the names left trainable.

    One backward pass, never applied or sent, tells which parameters get a gradient: that depends on
    the objectives and the model, not on the data. Opacus needs every trainable parameter to get a
    per-sample gradient in every step.
    """
    model.zero_grad(set_to_none=True)
    training_losses(model, batch, weights, per_sample_mean=True)["total"].backward()
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(p.grad is not None)
        if p.grad is not None:
            names.append(name)
        p.grad = None
    return names


def run_dp_steps(model, cache_dir: str | Path, s: StepSettings, optimizer: torch.optim.Optimizer,
                 device: torch.device, privacy, state_dir: Path, server_round: int, source: str) -> dict[str, float]:
    """``s.steps`` DP-SGD steps on one site's cache; returns the loss and privacy metrics.

    ``model`` must already be frozen by :func:`trainable_for` and ``optimizer`` built over the rest.
    """
    weights = check_objectives(s.weights, source)
    accountant = load_accountant(state_dir, server_round)
    dataset = cohort_dataset([cache_dir], model.cfg, bool(set(weights) & {"report", "findings"}), s.seed)
    rate = min(1.0, s.batch_size / len(dataset))
    spent = accountant.get_epsilon(privacy.target_delta) if accountant.history else 0.0
    if privacy.max_epsilon and spent >= privacy.max_epsilon:
        raise SampleDPError(f"{source}: this site's DP-SGD budget is spent (epsilon {spent:.3f} >= privacy.max_epsilon "
                            f"{privacy.max_epsilon}); it trains no further rounds of this run.")
    sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=rate,
                                            generator=torch.Generator().manual_seed(s.seed))
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_PoissonCollate(Collate(model.cfg, seed=s.seed, augment=True)))
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    dp_opt = DPOptimizer(optimizer, noise_multiplier=privacy.noise_multiplier, max_grad_norm=privacy.max_grad_norm,
                         expected_batch_size=s.batch_size, loss_reduction="mean",
                         generator=torch.Generator(device=device).manual_seed(s.seed + 7))
    dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=rate))
    for group in dp_opt.param_groups:
        group["lr"] = s.lr
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and s.amp else contextlib.nullcontext()
    trainable = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    batches, volumes, empty = 0, 0, 0
    started = time.perf_counter()
    stream = (batch for epoch in itertools.count() if dataset.set_epoch(epoch) is None for batch in loader)
    model.train()
    try:
        for _ in range(s.steps):
            batch = next(stream)
            dp_opt.zero_grad(set_to_none=True)
            if batch is None:  # an empty Poisson batch: the step adds noise only
                empty += 1
                for p in trainable:
                    p.grad_sample = torch.zeros(1, *p.shape, device=p.device, dtype=p.dtype)
            else:
                with amp:
                    losses = training_losses(model, batch, weights, per_sample_mean=True)
                losses["total"].backward()
                batches += 1
                volumes += batch["volume"].shape[0]
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
            dp_opt.step()
    finally:
        gsm._close()  # remove opacus's hooks; the plain model goes back to the caller
    save_accountant(accountant, state_dir, server_round)
    epsilon = accountant.get_epsilon(privacy.target_delta)
    seconds = time.perf_counter() - started
    metrics = {f"loss.{k}": v / max(batches, 1) for k, v in sums.items() if k != "total"}
    metrics.update({
        "train-loss": sums.get("total", 0.0) / max(batches, 1), "local-steps": float(s.steps),
        "train-seconds": seconds, "volumes-per-second": volumes / seconds, "volumes": float(volumes),
        "dp-epsilon": float(epsilon), "dp-delta": float(privacy.target_delta),
        "dp-noise-multiplier": float(privacy.noise_multiplier), "dp-max-grad-norm": float(privacy.max_grad_norm),
    })
    log.info("DP-SGD round %d: %d steps (%d empty Poisson batches), site epsilon %.3f at delta %g", server_round,
             s.steps, empty, epsilon, privacy.target_delta)
    return metrics
