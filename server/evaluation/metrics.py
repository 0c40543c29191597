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

The functions live in modules named for what they hold; this module re-exports them so callers can keep
importing from ``server.evaluation.metrics``:

* :mod:`.classification`: auroc, bootstrap_auroc_ci, per_finding_auroc, zero_shot_scores, linear_probe,
  fixed_split;
* :mod:`.retrieval`: recall_at_k;
* :mod:`.text_metrics`: tokenize, bleu_scores, rouge_l, clinical_efficacy.

Library choices: AUROC and logistic regression come from scikit-learn, BLEU from nltk's ``corpus_bleu``
and ROUGE-L from rouge-score; what is written here by hand says why where it is.
"""

from __future__ import annotations

from .classification import (
    _fast_auroc,  # noqa: F401  (private; imported by tests/server/test_metrics.py)
    auroc,
    bootstrap_auroc_ci,
    fixed_split,
    linear_probe,
    per_finding_auroc,
    zero_shot_scores,
)
from .retrieval import recall_at_k
from .text_metrics import bleu_scores, clinical_efficacy, rouge_l, tokenize

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
