"""Retrieval metric of the central evaluator: Recall@k from a similarity matrix, with the chance level.

Pure numpy (no torch, no flwr, no ``client``). Each k is computed on its own (CT-CLIP's volume-to-volume
code accumulates ratios across k: not copied). Re-exported by :mod:`server.evaluation.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["recall_at_k"]


def recall_at_k(similarity: np.ndarray, ks: Sequence[int] = (1, 5, 10, 50, 100)) -> dict[str, float]:
    """Recall@k of a retrieval where query i's only correct candidate is candidate i.

    Query i is a hit at k when fewer than k *other* candidates score ``>=`` its correct candidate. Ties are
    broken pessimistically: a candidate tying with the correct one is ranked before it (an all-equal row
    is a hit only when k >= Nc). Each k is computed independently from the ranks (no accumulation across
    k as in CT-CLIP's volume-to-volume code).

    Hand-written because sklearn's ``top_k_accuracy_score`` breaks ties in index order rather than
    pessimistically and needs one column per class; the rank count below is the whole computation.

    Args:
        similarity: [Nq, Nc] scores, higher is more similar, Nq <= Nc (candidate i belongs to query i).
        ks: cut-offs; a k larger than Nc is clipped to Nc but reported under its original name.

    Returns:
        ``{"recall@k": fraction of queries hit, "chance@k": min(k, Nc) / Nc}`` for each k.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[0] > sim.shape[1]:
        raise ValueError(f"similarity must be [Nq, Nc] with 0 < Nq <= Nc, got shape {sim.shape}.")
    if not np.isfinite(sim).all():
        raise ValueError("similarity must be finite (no NaN/inf).")
    nq, nc = sim.shape
    correct = sim[np.arange(nq), np.arange(nq)]
    # rank = number of other candidates scoring >= the correct one (the correct one itself is subtracted).
    ranks = (sim >= correct[:, None]).sum(axis=1) - 1
    out: dict[str, float] = {}
    for k in ks:
        if int(k) != k or k < 1:
            raise ValueError(f"every k must be a positive integer, got {k!r}.")
        kk = min(int(k), nc)
        out[f"recall@{k}"] = float(np.mean(ranks < kk))
        out[f"chance@{k}"] = kk / nc
    return out

