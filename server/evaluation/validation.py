"""Validation losses of the global model on a held-out cohort (the per-round evaluation hook)."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from shared_models import build_model, load_arrays, load_model_config, training_losses
from shared_models.cohort import Collate, SiteDataset

from ..settings import RunSettings
from .cohorts import resolve_cohort

log = logging.getLogger(__name__)


def validation_losses(settings: RunSettings, arrays: dict[str, np.ndarray], batch_size: int = 4) -> dict[str, float]:
    """Mean objective losses over the first ``eval_batches`` batches of the cohort, in a fixed order."""
    cohort = resolve_cohort(settings.eval_cohort)
    model_cfg = load_model_config(settings.preset).replace(objectives=settings.objectives)
    model = build_model(model_cfg)
    load_arrays(model, arrays)
    model.eval()
    data = SiteDataset(cohort, model_cfg, augment=False)
    loader = DataLoader(data, batch_size=min(batch_size, len(data)), shuffle=False, collate_fn=Collate(model_cfg))
    torch.manual_seed(0)  # MAE masks and views: the same for every round
    sums: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for batch in itertools.islice(loader, settings.eval_batches):
            for name, value in training_losses(model, batch).items():
                sums[name] = sums.get(name, 0.0) + float(value)
            n += 1
    return {f"validation.{name}": total / n for name, total in sums.items()}


def validation_evaluator(settings: RunSettings):
    """The per-round hook, or None when the run has no evaluation cohort."""
    if not settings.eval_cohort:
        return None

    def evaluate(server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        scores = validation_losses(settings, arrays)
        log.info("round %d validation: %s", server_round, {k: round(v, 4) for k, v in scores.items()})
        return scores

    return evaluate
