"""Metrics of the central evaluator: AUROC with bootstrap CIs, zero-shot scores, retrieval, report text
metrics, clinical efficacy and linear probing.

Pure functions on numpy arrays and strings (no torch, no flwr, no ``client``); every value returned is a
plain Python float / int / None / list / dict, so results go straight into JSON and the run report.

Protocols follow the seeds (``/work/shared/FACTS.md``, "The seeds' evaluation protocols"):

* Zero-shot classification as in CT-CLIP: per finding a (positive, negative) prompt pair, a softmax over
  the pair, score = P(present), AUROC per finding with percentile-bootstrap confidence intervals.
* Retrieval: Recall@{1,5,10,50,100} from a similarity matrix with the chance level k/N beside it. Each
  k is computed on its own (CT-CLIP's volume-to-volume code accumulates ratios across k: not copied).
* Report generation: corpus BLEU-1..4 (nltk), mean ROUGE-L F1 (rouge-score), and clinical efficacy
  (precision/recall/F1 of the findings that :func:`shared_models.reports.extract_findings` reads off
  the generated vs the reference report).

Library choices: AUROC and logistic regression come from scikit-learn, BLEU from nltk's ``corpus_bleu``
and ROUGE-L from rouge-score; what is written here by hand says why where it is.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import sklearn
from numpy.typing import ArrayLike
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from rouge_score import rouge_scorer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import auc as _sk_auc
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from shared_models.reports import extract_findings, get_vocabulary

__all__ = [
    "auroc",
    "bleu_scores",
    "bootstrap_auroc_ci",
    "clinical_efficacy",
    "fixed_split",
    "linear_probe",
    "per_finding_auroc",
    "recall_at_k",
    "rouge_l",
    "tokenize",
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
# Zero-shot and retrieval
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


# --------------------------------------------------------------------------------------------------
# Report text metrics
# --------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\w\s]")
_BLEU_WEIGHTS = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]


def tokenize(text: str) -> list[str]:
    """BLEU tokens: lowercase, then runs of word characters (``\\w+``: letters, digits, underscore) and
    single punctuation marks (``[^\\w\\s]``) as separate tokens; whitespace is dropped.
    "Left 3.5 mm nodule." -> ["left", "3", ".", "5", "mm", "nodule", "."].

    A regex rather than nltk's ``word_tokenize``, which needs the punkt data files (not available offline).
    """
    return _TOKEN.findall(text.lower())


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("references and hypotheses must be lists of strings, not a single string.")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references vs {len(hypotheses)} hypotheses: they must pair up.")
    if not references:
        raise ValueError("need at least one (reference, hypothesis) pair.")


def bleu_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 of generated reports against one reference each (nltk ``corpus_bleu``).

    * Cumulative weights: BLEU-n is the geometric mean of the 1..n-gram precisions with uniform weights
      1/n, times the corpus brevity penalty; n-gram counts are pooled over the corpus (not an average of
      sentence BLEUs).
    * Smoothing: ``SmoothingFunction().method1`` (an n-gram order with zero matches gets numerator
      epsilon = 0.1 instead of 0), so one missing higher-order match does not zero the score. A corpus
      whose hypotheses share no unigram with the references scores 0 (nltk's rule).
    * Tokens: :func:`tokenize` (lowercase, regex word / punctuation split).

    Identical texts give 1.0 for every n as long as the corpus holds n-grams of that order (texts of fewer
    than 4 tokens have no 4-grams; their BLEU-4 is the smoothed, near-zero value).

    Returns:
        ``{"bleu1", "bleu2", "bleu3", "bleu4"}``.
    """
    _check_pairs(references, hypotheses)
    refs = [[tokenize(r)] for r in references]
    hyps = [tokenize(h) for h in hypotheses]
    values = corpus_bleu(refs, hyps, weights=_BLEU_WEIGHTS, smoothing_function=SmoothingFunction().method1)
    return {f"bleu{n}": float(v) for n, v in enumerate(values, start=1)}


def rouge_l(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Mean over pairs of the ROUGE-L F1 (longest common subsequence) from rouge-score.

    rouge-score's default tokenizer (lowercase, non-alphanumerics to spaces), no stemming, ``rougeL``
    (whole text as one sequence, not the sentence-split ``rougeLsum``). A pair with an empty side scores 0.
    """
    _check_pairs(references, hypotheses)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(np.mean([scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(references, hypotheses)]))


def _f1(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def clinical_efficacy(
    references: Sequence[str], hypotheses: Sequence[str], vocabulary: str | Sequence[str] | None = None
) -> dict:
    """Clinical efficacy of generated reports: do they state the same findings as the references?

    Both texts go through :func:`shared_models.reports.extract_findings` (default policies: hedged
    mentions count present). A finding labeled present (True) is positive; stated absent (False) or not
    mentioned is negative. Over all (study, finding) pairs of the vocabulary:

    * micro ``precision`` = TP / (TP + FP), ``recall`` = TP / (TP + FN), ``f1`` = 2TP / (2TP + FP + FN);
    * ``macro_f1``: mean per-finding F1 over the findings with at least one positive in the references or
      the hypotheses (a finding nobody calls present is left out, not scored 0 or 1);
    * zero division gives 0.0 (sklearn's ``zero_division=0``): no predicted positives -> precision 0.0,
      no reference positives -> recall 0.0, no finding with a positive -> macro_f1 0.0.

    Counted by hand from the per-finding confusion counts, which are returned anyway, because sklearn's
    macro average would include the never-positive findings; the tests check the micro numbers against
    sklearn's ``precision_recall_fscore_support``.

    Returns:
        ``{"precision", "recall", "f1", "macro_f1", "n_studies", "macro_findings": [names],
        "per_finding": {name: {"tp", "fp", "fn", "tn", "f1"}}}``; a per-finding ``f1`` is None for a finding
        left out of the macro mean.
    """
    _check_pairs(references, hypotheses)
    names = get_vocabulary(vocabulary)
    counts = {name: {"tp": 0, "fp": 0, "fn": 0, "tn": 0} for name in names}
    for ref_text, hyp_text in zip(references, hypotheses):
        ref = extract_findings(ref_text, names)
        hyp = extract_findings(hyp_text, names)
        for name in names:
            r, h = ref.get(name) is True, hyp.get(name) is True
            key = ("tp" if h else "fn") if r else ("fp" if h else "tn")
            counts[name][key] += 1
    tp = sum(c["tp"] for c in counts.values())
    fp = sum(c["fp"] for c in counts.values())
    fn = sum(c["fn"] for c in counts.values())
    macro_findings = [name for name in names if counts[name]["tp"] + counts[name]["fp"] + counts[name]["fn"] > 0]
    per_finding = {
        name: {**c, "f1": _f1(c["tp"], c["fp"], c["fn"]) if name in macro_findings else None}
        for name, c in counts.items()
    }
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": _f1(tp, fp, fn),
        "macro_f1": float(np.mean([per_finding[n]["f1"] for n in macro_findings])) if macro_findings else 0.0,
        "n_studies": len(references),
        "macro_findings": macro_findings,
        "per_finding": per_finding,
    }


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
