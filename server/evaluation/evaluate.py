"""Central evaluation of a global model on a held-out cohort: ``metrics.json`` with stable dotted keys.

    fedvlp-server evaluate --checkpoint RUN/checkpoints/round_0003/global.safetensors \\
        --data runs/demo/data/central/site.yaml --out runs/demo/evaluation

What is computed (the seeds' protocols, ../shared/FACTS.md):
- zero-shot classification per finding from prompt pairs (CT-CLIP's "X is present." / "X is not
  present." is the headline; the other published pairs and COLIPRI's short form are reported too):
  score = softmax over the pair, AUROC per finding, macro AUROC with bootstrap 95% intervals;
- the supervised findings head's AUROC ("More performant");
- retrieval report->volume and volume->report, Recall@{1,5,10,50,100} beside chance k/N;
- report generation (greedy): BLEU-1..4, ROUGE-L, clinical efficacy of the labeler's findings;
- a linear probe (logistic regression) on frozen volume embeddings, fixed split by study;
- with masks, a segmentation probe (a light UNETR-style decoder on the frozen encoder), Dice per label.
Labels are the shared labeler's findings of each study's report (unmentioned = absent, as CT-RATE).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from shared_models import build_model, load_arrays, load_model_config
from shared_models.cohort import Collate, SiteDataset
from shared_models.reports import PROMPT_STYLES, get_vocabulary, report_body, zero_shot_prompts

from . import metrics as M
from .cohorts import resolve_cohort
from .embeddings import embedding_spread

log = logging.getLogger(__name__)
HEADLINE_STYLE = "ct_clip"


@torch.no_grad()
def cohort_outputs(model, cohort: Path, batch_size: int = 8, generate: int = 32, max_new_tokens: int = 96,
                   progress: bool = True) -> dict[str, Any]:
    """Embeddings, findings-head probabilities and generated reports for every study with a report."""
    from tqdm import tqdm

    cfg = model.cfg
    data = SiteDataset(cohort, cfg, augment=False)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=Collate(cfg.replace(objectives={"clip": 1.0})))
    volumes, texts, head, generated = [], [], [], []
    for batch in tqdm(loader, desc="evaluate", unit=" batch", disable=not progress):
        x = batch["volume"].to(model.device)
        scan_mask = batch.get("study_mask")
        if "study" in batch:
            x = batch["study"].to(model.device)
        volumes.append(model.encode_volume(x, scan_mask).float().cpu())
        texts.append(model.encode_text(batch["report"]).float().cpu())  # the report body (augment=False)
        head.append(model.predict_findings(x, scan_mask).float().cpu())
        if len(generated) < generate:
            take = min(generate - len(generated), x.shape[0])
            generated += model.generate_report(x[:take], max_new_tokens=max_new_tokens,
                                               scan_mask=None if scan_mask is None else scan_mask[:take])
    return {
        "study_uid": [s["study_uid"] for s in data.studies],
        "reports": [report_body(s["report"]) for s in data.studies],
        "findings": [s["findings"] for s in data.studies],
        "volume": torch.cat(volumes).numpy(), "text": torch.cat(texts).numpy(), "head": torch.cat(head).numpy(),
        "generated": generated,
    }


def evaluate_model(model, cohort: str | Path, n_boot: int = 1000, generate: int = 32, progress: bool = True,
                   masks: str | Path | None = None, mask_labels: list[str] | None = None,
                   segmentation_steps: int = 60) -> dict[str, Any]:
    """All metrics of ``model`` on the cohort, as a flat dict with dotted keys.

    With ``masks`` (a folder of ``<AccessionNumber>/findings.nii.gz``), also the segmentation probe;
    ``mask_labels`` names the label ids (default: the synthetic cohort's ``MASK_LABELS``).
    """
    started = time.time()
    model.eval()
    cohort = resolve_cohort(cohort)
    out = cohort_outputs(model, cohort, generate=generate, progress=progress)
    vocabulary = get_vocabulary(model.cfg.vocabulary)
    labels = {f: np.array([1 if s.get(f) else 0 for s in out["findings"]]) for f in vocabulary}
    scale = float(model.scale().detach())
    result: dict[str, Any] = {"cohort.studies": len(out["study_uid"])}

    with torch.no_grad():
        for style in PROMPT_STYLES:
            prompts = [zero_shot_prompts(f, style) for f in vocabulary]
            emb = model.encode_text([p for pair in prompts for p in pair]).float().cpu().numpy()
            scores = {f: M.zero_shot_scores(out["volume"], emb[2 * i], emb[2 * i + 1], scale)
                      for i, f in enumerate(vocabulary)}
            summary = M.per_finding_auroc(labels, scores, n_boot=n_boot if style == HEADLINE_STYLE else 0)
            prefix = "zero_shot" if style == HEADLINE_STYLE else f"zero_shot_styles.{style}"
            result[f"{prefix}.macro_auroc"] = summary["macro_auroc"]
            if style == HEADLINE_STYLE:
                result["zero_shot.macro_ci"] = summary["macro_ci"]
                result["zero_shot.per_finding"] = summary["per_finding"]
                result["zero_shot.undefined"] = summary["undefined"]
                result["zero_shot.prompt_style"] = style
                result["_roc"] = {f: (labels[f].tolist(), scores[f].tolist()) for f in vocabulary}
    head = M.per_finding_auroc(labels, {f: out["head"][:, i] for i, f in enumerate(vocabulary)}, n_boot=0)
    result["findings_head.macro_auroc"] = head["macro_auroc"]
    result["findings_head.per_finding"] = {f: v["auroc"] for f, v in head["per_finding"].items()}

    result.update(embedding_spread(out["volume"], out["text"]))
    for name, sim in (("report_to_volume", out["text"] @ out["volume"].T), ("volume_to_report", out["volume"] @ out["text"].T)):
        for key, value in M.recall_at_k(sim).items():
            result[f"retrieval.{name}.{key}"] = value

    refs = out["reports"][: len(out["generated"])]
    if refs:
        result.update(_generation_metrics(refs, out["generated"], vocabulary))
    train, test = M.fixed_split(out["study_uid"])
    probe = M.linear_probe(out["volume"][train], {f: y[train] for f, y in labels.items()},
                           out["volume"][test], {f: y[test] for f, y in labels.items()})
    result["probe.macro_auroc"] = probe["macro_auroc"]
    result["probe.per_finding"] = probe["per_finding"]
    if masks:  # label names default to the synthetic cohort's tables
        from shared_models.phantoms import BRAIN_ORGANS, CHEST_ORGANS, MASK_LABELS

        from .segmentation import segmentation_probe

        result.update(segmentation_probe(model, cohort, masks, list(mask_labels or MASK_LABELS), steps=segmentation_steps))
        organs = CHEST_ORGANS if model.cfg.vocabulary == "ct_rate" else BRAIN_ORGANS
        result.update(segmentation_probe(model, cohort, masks, sorted(organs, key=organs.get), steps=segmentation_steps,
                                         mask_file="organs.nii.gz", prefix="segmentation_organs"))
    result["seconds"] = round(time.time() - started, 2)
    return result


def _generation_metrics(refs: list[str], generated: list[str], vocabulary: list[str]) -> dict[str, Any]:
    result = {f"generation.{k}": v for k, v in M.bleu_scores(refs, generated).items()}
    result["generation.rougeL"] = M.rouge_l(refs, generated)
    ce = M.clinical_efficacy(refs, generated, vocabulary)
    result.update({f"generation.clinical_{k}": ce[k] for k in ("precision", "recall", "f1")})
    result["generation.examples"] = [{"reference": r, "generated": g} for r, g in list(zip(refs, generated))[:8]]
    return result


def evaluate_checkpoint(checkpoint: str | Path, cohort: str | Path, out_dir: str | Path, preset: str | None = None,
                        device: str = "auto", n_boot: int = 1000, generate: int = 32,
                        masks: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a ``global.safetensors`` (its run's preset from the checkpoint's ``state.json`` unless given)."""
    from ..checkpoint import load_arrays_file

    checkpoint = Path(checkpoint)
    if preset is None:
        state = checkpoint.parent / "state.json"
        if not state.is_file():
            raise ValueError(f"{checkpoint}: no state.json beside it to name the preset; pass --preset.")
        preset = json.loads(state.read_text())["settings"]["preset"]
    model = build_model(load_model_config(preset))
    load_arrays(model, load_arrays_file(checkpoint))
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model.to(dev)
    result = evaluate_model(model, cohort, n_boot=n_boot, generate=generate, masks=masks)
    result["checkpoint"] = str(checkpoint)
    write_metrics(result, out_dir)
    return result


def write_metrics(result: dict[str, Any], out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    (out_dir / "metrics.json").write_text(json.dumps(public, indent=2, sort_keys=True))
    if "_roc" in result:
        (out_dir / "roc.json").write_text(json.dumps(result["_roc"]))
    return out_dir / "metrics.json"
