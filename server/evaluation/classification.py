"""Classification metrics of the central evaluator: AUROC with percentile-bootstrap CIs (per finding and
macro), CT-CLIP zero-shot scores, linear probing of frozen embeddings and a fixed hashed train/test split.

Pure functions on numpy arrays (no torch, no flwr, no ``client``); every value returned is a plain Python
float / int / None / list / dict. Re-exported by :mod:`server.evaluation.metrics`, which documents the
protocols (``/work/shared/FACTS.md``, "The seeds' evaluation protocols").

Library choices: AUROC and logistic regression come from scikit-learn; what is written here by hand says
why where it is.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import sklearn
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import auc as _sk_auc
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = [
    "auroc",
    "bootstrap_auroc_ci",
    "fixed_split",
    "linear_probe",
    "per_finding_auroc",
    "zero_shot_scores",
]

# --------------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------------


def _binary_labels(labels: object, name: str = "labels") -> np.ndarray:
    """``labels`` as a 1-D int array of 0/1; ValueError for anything else (NaN, 2, -1, 2-D)."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}.")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be binary (0/1 or bool), got values {np.unique(arr)[:10].tolist()}.")
    return arr.astype(np.int64)


def _finite_scores(scores: object, n: int, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per label), got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite (no NaN/inf).")
    return arr


def _has_both_classes(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < int(y.sum()) < y.size


def auroc(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (sklearn's ``roc_auc_score``).

    Ties count one half (sklearn's trapezoidal ROC), so all-equal scores give 0.5.

    Returns:
        The AUROC, or None when it is undefined: ``labels`` has no positives or no negatives.

    Raises:
        ValueError: labels not 1-D binary, or scores not finite / of another length.
    """
    y = _binary_labels(labels)
    s = _finite_scores(scores, y.shape[0])
    if not _has_both_classes(y):
        return None
    return float(roc_auc_score(y, s))


def _fast_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """sklearn's binary AUROC for already validated inputs inside a bootstrap loop.

    ``roc_auc_score`` on binary labels is ``auc(*roc_curve(y, s)[:2])``; calling those two directly under
    ``assume_finite``/``skip_parameter_validation`` gives the same value about 2.5x faster (~0.8 ms
    instead of ~2-3 ms per call at 200 studies), which matters for 18 findings x 1000 resamples.
    """
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        fpr, tpr, _ = roc_curve(y, s)
        return float(_sk_auc(fpr, tpr))


def _bootstrap_indices(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """``n_boot`` resamples (with replacement) of ``range(n)``; the same stream for the same (n, seed), so
    :func:`bootstrap_auroc_ci` and :func:`per_finding_auroc` see identical resamples."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield rng.integers(0, n, size=n)


def _check_bootstrap_args(n_boot: int, alpha: float) -> None:
    if int(n_boot) != n_boot or n_boot < 0:
        raise ValueError(f"n_boot must be an integer >= 0 (0: no bootstrap), got {n_boot!r}.")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}.")


def _percentile_ci(values: Sequence[float], alpha: float) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    low, high = np.percentile(np.asarray(values, dtype=np.float64), [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_auroc_ci(
    labels: ArrayLike, scores: ArrayLike, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float | None, float | None]:
    """Percentile-bootstrap ``1 - alpha`` confidence interval of the AUROC, resampling studies.

    ``n_boot`` resamples of the studies with replacement (numpy ``default_rng(seed)``); a resample that
    lacks positives or negatives has no AUROC and is skipped (not redrawn), so fewer than ``n_boot``
    values may enter the percentiles. The interval is the (alpha/2, 1 - alpha/2) percentiles of the
    resampled AUROCs (numpy's linear interpolation).

    Returns:
        (low, high), or (None, None) when the AUROC is undefined on the data or on every resample, or
        when ``n_boot`` is 0 (no bootstrap: point estimates only).
    """
    _check_bootstrap_args(n_boot, alpha)
    y = _binary_labels(labels)
    s = _finite_scores(scores, y.shape[0])
    if not _has_both_classes(y):
        return None, None
    values = []
    for idx in _bootstrap_indices(y.shape[0], n_boot, seed):
        yb = y[idx]
        if _has_both_classes(yb):
            values.append(_fast_auroc(yb, s[idx]))
    return _percentile_ci(values, alpha)


def per_finding_auroc(
    labels: Mapping[str, ArrayLike],
    scores: Mapping[str, ArrayLike],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """AUROC per finding with bootstrap CIs, and the macro AUROC with its own bootstrap CI.

    Args:
        labels: finding name -> binary labels over the same N studies (same order for every finding).
        scores: finding name -> scores over those studies; must have exactly the keys of ``labels``.
        n_boot, seed, alpha: bootstrap settings (see :func:`bootstrap_auroc_ci`); ``n_boot=0`` skips the
            bootstrap (every CI is None, ``macro_ci`` is [None, None]).

    Returns:
        ``{"per_finding": {name: {"auroc", "ci_low", "ci_high", "positives", "negatives"}},
        "macro_auroc": float | None, "macro_ci": [low, high], "undefined": [names]}``, findings in
        ``labels`` order.

        * A finding without positives (or without negatives) has ``auroc``/``ci_*`` None, is listed in
          ``undefined`` and is never averaged into the macro mean.
        * ``macro_auroc`` is the mean over findings with a defined AUROC (None if there are none).
        * ``macro_ci`` bootstraps the macro mean by resampling *studies jointly* across findings (one set
          of indices per resample for all findings). A resample in which any of the defined findings
          lacks a class is skipped, so each macro value averages the same findings as ``macro_auroc``.
        * Per-finding CIs use the same resamples, so they equal :func:`bootstrap_auroc_ci` with the same
          ``n_boot``/``seed``/``alpha``.

    Raises:
        ValueError: mismatched keys, lengths, or non-binary labels.
    """
    _check_bootstrap_args(n_boot, alpha)
    if set(labels) != set(scores):
        raise ValueError(f"labels and scores must have the same findings; got {sorted(labels)} vs {sorted(scores)}.")
    names = list(labels)
    ys = {name: _binary_labels(labels[name], f"labels[{name!r}]") for name in names}
    lengths = {y.shape[0] for y in ys.values()}
    if len(lengths) > 1:
        raise ValueError(f"every finding must label the same studies; got lengths {sorted(lengths)}.")
    n = lengths.pop() if lengths else 0
    ss = {name: _finite_scores(scores[name], n, f"scores[{name!r}]") for name in names}

    defined = [name for name in names if _has_both_classes(ys[name])]
    per_values: dict[str, list[float]] = {name: [] for name in defined}
    macro_values: list[float] = []
    if defined:
        for idx in _bootstrap_indices(n, n_boot, seed):
            values = []
            for name in defined:
                yb = ys[name][idx]
                if _has_both_classes(yb):
                    value = _fast_auroc(yb, ss[name][idx])
                    per_values[name].append(value)
                    values.append(value)
            if len(values) == len(defined):
                macro_values.append(float(np.mean(values)))

    per_finding: dict[str, dict] = {}
    for name in names:
        y = ys[name]
        positives = int(y.sum())
        entry: dict = {"auroc": None, "ci_low": None, "ci_high": None, "positives": positives,
                       "negatives": int(y.shape[0] - positives)}
        if name in per_values:
            entry["auroc"] = auroc(y, ss[name])
            entry["ci_low"], entry["ci_high"] = _percentile_ci(per_values[name], alpha)
        per_finding[name] = entry
    point = [per_finding[name]["auroc"] for name in defined]
    return {
        "per_finding": per_finding,
        "macro_auroc": float(np.mean(point)) if point else None,
        "macro_ci": list(_percentile_ci(macro_values, alpha)),
        "undefined": [name for name in names if name not in per_values],
    }


# --------------------------------------------------------------------------------------------------
# Zero-shot
# --------------------------------------------------------------------------------------------------


def zero_shot_scores(volume_emb: np.ndarray, pos_emb: np.ndarray, neg_emb: np.ndarray, logit_scale: float) -> np.ndarray:
    """CT-CLIP zero-shot score P(present) of one finding for each volume.

    For volume v the logits are ``[logit_scale * v.pos, logit_scale * v.neg]`` and the score is the
    softmax probability of the first, i.e. ``1 / (1 + exp(-logit_scale * v.(pos - neg)))``.

    Embeddings are used as given (dot products): pass L2-normalised embeddings for cosine similarity, as
    CT-CLIP does. ``logit_scale`` is the multiplier itself (CLIP's ``exp(log_scale)``), not its log.

    Args:
        volume_emb: [N, E] volume embeddings.
        pos_emb, neg_emb: [E] embeddings of the positive / negative prompt of one finding.
        logit_scale: temperature multiplier (> 0).

    Returns:
        [N] float64 array of P(present) in [0, 1].
    """
    v = np.asarray(volume_emb, dtype=np.float64)
    pos = np.asarray(pos_emb, dtype=np.float64)
    neg = np.asarray(neg_emb, dtype=np.float64)
    if v.ndim != 2 or pos.shape != (v.shape[1],) or neg.shape != (v.shape[1],):
        raise ValueError(f"need volume_emb [N, E] and pos/neg [E]; got {v.shape}, {pos.shape}, {neg.shape}.")
    logits = float(logit_scale) * np.stack([v @ pos, v @ neg], axis=1)  # [N, 2]
    # A two-way softmax, written out with the usual max shift for stability (no library call needed).
    logits -= logits.max(axis=1, keepdims=True)
    expd = np.exp(logits)
    return expd[:, 0] / expd.sum(axis=1)


# --------------------------------------------------------------------------------------------------
# Linear probe and a fixed split
# --------------------------------------------------------------------------------------------------


def linear_probe(
    train_x: np.ndarray,
    train_y: Mapping[str, ArrayLike],
    test_x: np.ndarray,
    test_y: Mapping[str, ArrayLike],
    seed: int = 0,
) -> dict:
    """Linear probe of frozen embeddings: one logistic regression per finding, AUROC on the test set.

    Per finding: ``StandardScaler`` (fit on train) then ``LogisticRegression(max_iter=1000,
    class_weight="balanced", random_state=seed)`` with sklearn's defaults otherwise (L2, C=1, lbfgs);
    the test score is ``predict_proba[:, 1]``. A finding whose train or test labels lack a class is
    undefined (auroc None, not fit, never averaged).

    Args:
        train_x: [N, E] train embeddings; train_y: finding -> [N] binary labels.
        test_x: [M, E] test embeddings; test_y: finding -> [M] binary labels, same findings as train_y.

    Returns:
        ``{"per_finding": {name: {"auroc", "train_positives", "train_negatives", "test_positives",
        "test_negatives"}}, "macro_auroc": float | None, "undefined": [names]}`` in ``train_y`` order.
    """
    if set(train_y) != set(test_y):
        raise ValueError(f"train_y and test_y must name the same findings; got {sorted(train_y)} vs {sorted(test_y)}.")
    xtr = np.asarray(train_x, dtype=np.float64)
    xte = np.asarray(test_x, dtype=np.float64)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train_x and test_x must be [N, E] and [M, E]; got {xtr.shape} and {xte.shape}.")
    if not (np.isfinite(xtr).all() and np.isfinite(xte).all()):
        raise ValueError("train_x and test_x must be finite.")
    per_finding: dict[str, dict] = {}
    undefined: list[str] = []
    for name in train_y:
        ytr = _binary_labels(train_y[name], f"train_y[{name!r}]")
        yte = _binary_labels(test_y[name], f"test_y[{name!r}]")
        if ytr.shape[0] != xtr.shape[0] or yte.shape[0] != xte.shape[0]:
            raise ValueError(f"{name}: labels must have one entry per row of train_x / test_x.")
        entry: dict = {"auroc": None, "train_positives": int(ytr.sum()), "train_negatives": int((1 - ytr).sum()),
                       "test_positives": int(yte.sum()), "test_negatives": int((1 - yte).sum())}
        if _has_both_classes(ytr) and _has_both_classes(yte):
            model = make_pipeline(
                StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced", random_state=seed)
            )
            model.fit(xtr, ytr)
            entry["auroc"] = auroc(yte, model.predict_proba(xte)[:, 1])
        else:
            undefined.append(name)
        per_finding[name] = entry
    defined = [e["auroc"] for e in per_finding.values() if e["auroc"] is not None]
    return {
        "per_finding": per_finding,
        "macro_auroc": float(np.mean(defined)) if defined else None,
        "undefined": undefined,
    }


def fixed_split(ids: Sequence[str], test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic train/test split by hashing study ids.

    Each id is placed on its own: ``u = int(sha256(f"{seed}:{id}")[:8 bytes]) / 2**64`` and the id is in
    test when ``u < test_fraction``. So a study falls in the same split whatever the order of ``ids``,
    whatever other studies are in the cohort, and across processes (no Python ``hash`` randomisation).
    The test share is ``test_fraction`` in expectation, not exactly; a tiny cohort may get an empty side.
    Repeated ids land on the same side.

    Returns:
        (train_idx, test_idx): int64 positions into ``ids``, each ascending.
    """
    if isinstance(ids, str):
        raise TypeError("ids must be a list of study ids, not a single string.")
    if not 0.0 <= test_fraction <= 1.0 or math.isnan(test_fraction):
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction!r}.")
    in_test = np.array(
        [int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") / 2**64 < test_fraction
         for i in ids],
        dtype=bool,
    )
    positions = np.arange(len(in_test), dtype=np.int64)
    return positions[~in_test], positions[in_test]
