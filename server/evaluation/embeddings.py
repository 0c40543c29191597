"""Embedding geometry: is the shared space spread out, or has it collapsed to one direction?

A contrastive model that learns nothing often shows it here first: every volume (or report) maps to
nearly the same embedding, the mean pairwise cosine similarity goes to 1, and the losses sit at their
chance values. The per-round evaluation records these figures so an operator sees a collapse the round
it happens (history, Prometheus, the HTML report).
"""

from __future__ import annotations

import numpy as np

COLLAPSE_COSINE = 0.99
"""A mean pairwise cosine above this means the embeddings have collapsed (nothing tells studies apart)."""


def mean_pairwise_cosine(embeddings: np.ndarray) -> float | None:
    """Mean cosine similarity over all pairs of distinct rows of ``embeddings [N, E]`` (None for N < 2)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings should be [N, E], got shape {x.shape}.")
    n = x.shape[0]
    if n < 2:
        return None
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)  # a zero row stays zero (cosine 0)
    total = x.sum(axis=0)
    return float((total @ total - (x * x).sum()) / (n * (n - 1)))  # sum over i != j of x_i . x_j


def embedding_spread(volume: np.ndarray, text: np.ndarray) -> dict[str, float | None]:
    """``embeddings.*`` keys: mean pairwise cosine of the volume and of the text embeddings, and
    ``embeddings.collapsed`` (1.0 when either is above :data:`COLLAPSE_COSINE`)."""
    volume_cos, text_cos = mean_pairwise_cosine(volume), mean_pairwise_cosine(text)
    collapsed = any(c is not None and c > COLLAPSE_COSINE for c in (volume_cos, text_cos))
    return {"embeddings.volume_mean_cosine": volume_cos, "embeddings.text_mean_cosine": text_cos,
            "embeddings.collapsed": float(collapsed)}
