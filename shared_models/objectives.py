"""Training objectives as small tasks over the model's named outputs, and their weighted sum.

``training_losses(model, batch, weights)`` runs the model once for the objectives with a non-zero
weight and returns ``{objective: loss, ..., "total": sum(weight * loss)}`` (open_clip's contract).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import distributed, losses
from .config import OBJECTIVES
from .reports import opposite_sentence_pairs
from .state import unwrap_model


def _clip(out: dict[str, Tensor], model) -> Tensor:
    # batch-coupled: every rank computes the loss over the global batch (see shared_models.distributed)
    volumes = distributed.gather_with_grad(out["volume_embeddings"])
    texts = distributed.gather_with_grad(out["text_embeddings"])
    if model.cfg.clip_loss == "sigmoid":
        return losses.siglip_loss(volumes, texts, out["logit_scale"], out["logit_bias"])
    return losses.clip_loss(volumes, texts, out["logit_scale"])


def _osl(out: dict[str, Tensor], model) -> Tensor:
    loss = losses.opposite_sentence_loss(
        out["osl_volume_embeddings"], out["osl_positive_embeddings"], out["osl_negative_embeddings"], out["logit_scale"]
    )
    return distributed.rescale_mean(loss, out["osl_volume_embeddings"].shape[0])


def _multiview(out: dict[str, Tensor], model) -> Tensor:
    views = out["view_embeddings"]
    prototypes = distributed.gather_local_first(out["view_prototypes"])  # this rank's volumes first
    loss = losses.multiview_loss(views, prototypes, out["logit_scale"])
    return distributed.rescale_mean(loss, views.shape[0] * views.shape[1])


def _mae(out: dict[str, Tensor], model) -> Tensor:
    loss = losses.mae_loss(out["mae_prediction"], out["mae_target"], out["mae_mask"], model.cfg.mae.norm_pix_loss)
    return distributed.rescale_mean(loss, out["mae_mask"].sum().clamp(min=1.0).detach())


def _report(out: dict[str, Tensor], model) -> Tensor:
    per_sample = out.get("per_sample_mean", False)
    labels = out["report_labels"]
    loss = losses.report_generation_loss(out["report_logits"], labels, per_sample)
    return distributed.rescale_mean(loss, labels.shape[0] if per_sample else (labels[:, 1:] != -100).sum().detach())


def _findings(out: dict[str, Tensor], model) -> Tensor:
    per_sample, mask = out.get("per_sample_mean", False), out.get("finding_mask")
    loss = losses.findings_loss(out["findings_logits"], out["finding_labels"], mask, per_sample)
    if per_sample or mask is None:
        count = out["finding_labels"].shape[0] if per_sample else out["finding_labels"].numel()
    else:
        count = mask.float().sum().clamp(min=1.0)
    return distributed.rescale_mean(loss, count)


OBJECTIVE_TASKS: dict[str, Callable[[dict[str, Tensor], Any], Tensor]] = {
    "clip": _clip, "osl": _osl, "multiview": _multiview, "mae": _mae, "report": _report, "findings": _findings,
}
assert tuple(OBJECTIVE_TASKS) == OBJECTIVES

BATCH_COUPLED = ("clip", "osl", "multiview")
"""Objectives whose loss couples the samples of a batch (not a sum of per-sample terms)."""


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Validated float weights; unknown names and negative or non-finite weights are errors."""
    unknown = sorted(set(weights) - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"unknown objective(s) {unknown}; known objectives: {list(OBJECTIVES)}.")
    checked = {}
    for name, weight in weights.items():
        weight = float(weight)
        if not (weight >= 0.0 and weight != float("inf")):
            raise ValueError(f"objective weight {name}={weight} should be finite and >= 0.")
        checked[name] = weight
    return checked


def training_losses(model, batch: dict[str, Any], weights: Mapping[str, float] | None = None,
                    per_sample_mean: bool = False) -> dict[str, Tensor]:
    """Losses of every objective with a non-zero weight, plus ``total`` (their weighted sum).

    Under torch.distributed (a site's GPUs in DDP) the losses are those of the global batch; see
    :mod:`shared_models.distributed`.

    Args:
        model: a :class:`~shared_models.model.FoundationModel`, possibly wrapped (DDP, opacus).
        batch: see the batch keys in :mod:`shared_models.model`. For OSL, ``osl_*`` keys may be left
            out when the batch has ``findings`` (a list of per-study ``{finding: present}`` dicts).
        weights: objective name -> weight; ``None`` uses the model config's ``objectives``.
        per_sample_mean: normalize each decomposable loss per sample, then average the samples (DP-SGD).
    """
    core = unwrap_model(model)  # DDP, opacus and compile wrappers forward; the config lives on the bare model
    active = {k: w for k, w in check_weights(core.cfg.objectives if weights is None else weights).items() if w > 0}
    if not active:
        raise ValueError("no objective has a non-zero weight; nothing to train.")
    if "osl" in active and "osl_index" not in batch and "findings" in batch:
        batch = {**batch, **osl_inputs(batch["findings"])}
    out = model(batch, active)
    out["per_sample_mean"] = per_sample_mean
    result = {name: OBJECTIVE_TASKS[name](out, core) for name in active}
    result["total"] = sum(active[name] * loss for name, loss in result.items())
    return result


def osl_inputs(
    findings: Sequence[Mapping[str, bool]], rng: random.Random | None = None, max_pairs_per_study: int | None = None
) -> dict[str, Any]:
    """Flatten per-study findings into the OSL batch keys ``osl_index``, ``osl_positive``, ``osl_negative``.

    Each mentioned finding of study i gives one (true sentence, opposite) pair about volume i; with
    ``rng``, phrasing varies and at most ``max_pairs_per_study`` pairs are drawn per study.
    """
    index: list[int] = []
    positive: list[str] = []
    negative: list[str] = []
    for i, study_findings in enumerate(findings):
        pairs = opposite_sentence_pairs(dict(study_findings), rng)
        if max_pairs_per_study is not None and len(pairs) > max_pairs_per_study:
            pairs = (rng or random.Random(0)).sample(pairs, max_pairs_per_study)
        for true_sentence, opposite in pairs:
            index.append(i)
            positive.append(true_sentence)
            negative.append(opposite)
    return {"osl_index": torch.tensor(index, dtype=torch.long), "osl_positive": positive, "osl_negative": negative}
