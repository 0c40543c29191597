"""Report text metrics of the central evaluator: corpus BLEU-1..4 (nltk), mean ROUGE-L F1 (rouge-score)
and clinical efficacy (precision/recall/F1 of the findings that
:func:`shared_models.reports.extract_findings` reads off the generated vs the reference report).

Pure functions on strings (no torch, no flwr, no ``client``); every value returned is a plain Python
float / int / list / dict. Re-exported by :mod:`server.evaluation.metrics`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from rouge_score import rouge_scorer

from shared_models.reports import extract_findings, get_vocabulary

__all__ = [
    "bleu_scores",
    "clinical_efficacy",
    "rouge_l",
    "tokenize",
]


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
