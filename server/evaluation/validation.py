"""The per-round evaluation hook: validation losses and the light central metrics on a held-out cohort.

Every ``evaluate_every`` rounds the ServerApp scores the global model on the run's evaluation cohort:
the objectives' losses on a fixed set of batches, and zero-shot AUROC, the findings head, retrieval
and the linear probe (no bootstrap, no report generation: those are in ``fedvlp-server evaluate``).
"""

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
from .evaluate import evaluate_model

log = logging.getLogger(__name__)


def validation_losses(model, settings: RunSettings, batch_size: int = 4) -> dict[str, float]:
    """Mean objective losses over the first ``eval_batches`` batches of the cohort, in a fixed order."""
    cohort = resolve_cohort(settings.eval_cohort)
    model_cfg = model.cfg
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
        model = build_model(load_model_config(settings.preset).replace(objectives=settings.objectives))
        load_arrays(model, arrays)
        scores: dict[str, Any] = validation_losses(model, settings)
        light = evaluate_model(model, settings.eval_cohort, n_boot=0, generate=0, progress=False)
        scores.update({k: v for k, v in light.items()  # None = undefined (e.g. a finding without positives)
                       if (v is None or isinstance(v, (int, float))) and not k.startswith("_")})
        if scores.get("embeddings.collapsed"):
            log.warning("round %d: the global model's embeddings have collapsed (mean pairwise cosine: volumes %s, "
                        "reports %s); nothing tells studies apart. Check the learning rate and objective weights.",
                        server_round, scores.get("embeddings.volume_mean_cosine"), scores.get("embeddings.text_mean_cosine"))
        log.info("round %d evaluation: zero-shot macro AUROC %s, probe %s, validation total %.4f", server_round,
                 scores.get("zero_shot.macro_auroc"), scores.get("probe.macro_auroc"), scores["validation.total"])
        return scores

    return evaluate
