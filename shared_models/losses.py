"""The seed objectives as pure loss functions of named model outputs (open_clip's contract).

Each function takes tensors named as :meth:`FoundationModel.forward` names its outputs and returns a
scalar. :mod:`shared_models.objectives` maps objective names to these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_loss(volume_embeddings: Tensor, text_embeddings: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE over the batch.

    ``logits = scale * v @ t.T``; the mean of volume->text and text->volume cross-entropies with the
    matched pair on the diagonal. Embeddings are L2-normalized ``[B, E]``.
    """
    logits = logit_scale * volume_embeddings @ text_embeddings.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def siglip_loss(
    volume_embeddings: Tensor, text_embeddings: Tensor, logit_scale: Tensor, logit_bias: Tensor
) -> Tensor:
    """SigLIP's pairwise sigmoid loss: ``-sum log sigmoid(z_ij * (scale * v_i.t_j + bias)) / B``.

    ``z_ij`` is +1 on the diagonal (matched pairs) and -1 elsewhere.
    """
    logits = logit_scale * volume_embeddings @ text_embeddings.T + logit_bias
    n = logits.shape[0]
    signs = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / n


def opposite_sentence_loss(
    osl_volume_embeddings: Tensor,
    osl_positive_embeddings: Tensor,
    osl_negative_embeddings: Tensor,
    logit_scale: Tensor,
) -> Tensor:
    """COLIPRI's Opposite Sentence Loss.

    For each (volume, finding) pair k: a 2-way softmax between the true sentence about the finding
    (e.g. "No pleural effusion.") and its opposite ("Pleural effusion is present."), target the true
    one: ``CE([s * v_k.t+_k, s * v_k.t-_k], 0)``, averaged over pairs. The CLIP temperature is
    shared. Our reading: sentences come from the findings the report mentions (present or stated
    absent); unmentioned findings give no pair, since their polarity is unknown. With no pairs in a
    batch the loss is 0 (and still part of the graph).

    Args shapes: ``[K, E]`` each, L2-normalized; row k of the volume embeddings is the volume that
    pair k describes.
    """
    if osl_volume_embeddings.shape[0] == 0:
        return logit_scale * 0.0
    pos = (osl_volume_embeddings * osl_positive_embeddings).sum(-1)
    neg = (osl_volume_embeddings * osl_negative_embeddings).sum(-1)
    logits = logit_scale * torch.stack([pos, neg], dim=1)  # [K, 2]
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def multiview_loss(view_embeddings: Tensor, view_prototypes: Tensor, logit_scale: Tensor) -> Tensor:
    """T3D's text-informed multi-view alignment, as a classification among the batch's pairs.

    Each of the M local views of volume i (refined by cross-attention to report i's tokens, pooled and
    projected) is classified among the B volume-report pairs of the batch: ``CE(s * view @ P.T, i)``.

    Our choice of prototypes ``P [B, E]``: the batch's full-volume embeddings with the gradient
    stopped. They keep their identity across batches (prototype i is always "the embedding of volume
    i"), unlike a linear layer over batch positions, whose class j means a different study in every
    batch. Stopping the gradient makes the views move toward the global view, not the reverse.

    Args shapes: ``view_embeddings [B, M, E]``, ``view_prototypes [B, E]``, both L2-normalized.
    """
    b, m, _ = view_embeddings.shape
    logits = logit_scale * view_embeddings.reshape(b * m, -1) @ view_prototypes.detach().T  # [B*M, B]
    target = torch.arange(b, device=logits.device).repeat_interleave(m)
    return F.cross_entropy(logits, target)


def mae_loss(mae_prediction: Tensor, mae_target: Tensor, mae_mask: Tensor, norm_pix_loss: bool = True) -> Tensor:
    """MAE reconstruction: mean squared error per patch, averaged over masked patches only.

    With ``norm_pix_loss`` the target patches are normalized by their own mean and variance (MAE's
    default). Shapes: prediction and target ``[N, L, P]``, mask ``[N, L]`` with 1 = masked.
    """
    target = mae_target
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((mae_prediction - target) ** 2).mean(dim=-1)  # [N, L]
    return (per_patch * mae_mask).sum() / mae_mask.sum().clamp(min=1.0)


def report_generation_loss(report_logits: Tensor, report_labels: Tensor, per_sample_mean: bool = False) -> Tensor:
    """Teacher-forced next-token cross-entropy: logits at t predict label t+1; -100 labels are ignored.

    Averaged over the batch's tokens, or with ``per_sample_mean`` over each report's tokens and then over
    reports: a mean of per-sample terms, which sample-level DP-SGD needs (with the batch-wide token
    count as divisor, one sample's length would scale every other sample's gradient).
    """
    logits = report_logits[:, :-1]
    labels = report_labels[:, 1:]
    if not per_sample_mean:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
    per_token = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    counts = (labels != -100).sum(dim=1).clamp(min=1)
    return (per_token.sum(dim=1) / counts).mean()


def findings_loss(findings_logits: Tensor, finding_labels: Tensor, finding_mask: Tensor | None = None,
                  per_sample_mean: bool = False) -> Tensor:
    """Multi-label BCE of the findings head ("More performant"), averaged over labelled entries.

    ``finding_mask [B, F]`` (1 = use) lets a site leave out findings a report does not decide. With
    ``per_sample_mean`` each study's labelled entries are averaged first, then the studies (for DP-SGD).
    """
    per_entry = F.binary_cross_entropy_with_logits(findings_logits.float(), finding_labels.float(), reduction="none")
    if finding_mask is None:
        return per_entry.mean()
    mask = finding_mask.float()
    if per_sample_mean:
        return ((per_entry * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    return (per_entry * mask).sum() / mask.sum().clamp(min=1.0)
