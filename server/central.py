"""The centralized baseline: the same recipe trained on the sites' pooled caches, for comparison.

    fedvlp-server train-central --recipe tiny --sites a/site.yaml b/site.yaml c/site.yaml --run-dir runs/central

Same initial weights (seeded as the federation's), same learning-rate schedule, same objectives and
the same total number of optimizer steps as a federated run of the recipe: each "round" here is
``local_steps x number of sites`` steps on batches drawn from all sites pooled. It writes the
federation's checkpoint format and history, so ``fedvlp-server evaluate`` scores both alike.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from shared_models import build_model, load_arrays, load_model_config, model_to_arrays
from shared_models.training import StepSettings, derive_seed, make_optimizer, run_steps

from .checkpoint import RunFolder
from .evaluation.cohorts import resolve_cohort
from .evaluation.validation import validation_evaluator
from .federation import initial_arrays
from .settings import RunSettings

log = logging.getLogger(__name__)


def train_central(settings: RunSettings, site_configs: list[str | Path], batch_size: int = 4,
                  device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Train on the pooled caches of ``site_configs``; checkpoints and history go to ``settings.run_dir``."""
    folder = RunFolder(settings.run_dir, keep=settings.keep_checkpoints)
    if folder.latest() is not None:
        raise ValueError(f"{folder.root} already holds checkpoints; use a new run folder for a centralized baseline.")
    caches = [resolve_cohort(p) for p in site_configs]
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model = build_model(load_model_config(settings.preset).replace(objectives=settings.objectives))
    arrays = initial_arrays(settings)
    load_arrays(model, arrays)
    model.to(dev)
    folder.save(0, arrays, {}, {"settings": settings.to_dict(), "run_key": "central", "sites": [str(c) for c in caches]})
    evaluate = validation_evaluator(settings)
    steps_per_round = settings.local_steps * len(caches)
    optimizer = None
    bar = tqdm(total=steps_per_round * settings.rounds, desc="train-central", unit=" step", disable=not progress)

    def advance(step: int, running: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{running.get('train-loss', float('nan')):.3f}",
                        vps=f"{running.get('volumes-per-second', 0.0):.1f}")

    for server_round in range(1, settings.rounds + 1):
        started = time.time()
        torch.manual_seed(derive_seed(settings.seed, server_round, "central", "torch"))
        steps = StepSettings(steps=steps_per_round, lr=settings.lr_at(server_round), weights=settings.objectives,
                             batch_size=batch_size, mae_alternate=settings.mae_alternate,
                             weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
                             seed=derive_seed(settings.seed, server_round, "central", "data"))
        optimizer = optimizer or make_optimizer(model, steps, dev)
        metrics = run_steps(model, caches, steps, optimizer, dev, progress=advance)
        arrays = model_to_arrays(model)
        record: dict[str, Any] = {"round": server_round, "lr": steps.lr, "skipped": False, "centralized": True,
                                  "train": metrics, "optimizer_steps": steps_per_round * server_round}
        if evaluate and (server_round % settings.evaluate_every == 0 or server_round == settings.rounds):
            record["evaluation"] = evaluate(server_round, arrays)
        record["wall_seconds"] = round(time.time() - started, 3)
        folder.append_history(record)
        folder.save(server_round, arrays, {}, {"settings": settings.to_dict(), "run_key": "central"})
        log.info("central round %d/%d: %d steps, train loss %.4f", server_round, settings.rounds, steps_per_round,
                 metrics["train-loss"])
    bar.close()
    return {"run_dir": str(folder.root), "optimizer_steps": steps_per_round * settings.rounds}
