"""The central evaluator end to end on a small ingested cohort: metrics.json keys and the HTML report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from server.checkpoint import RunFolder, load_arrays_file
from server.cli import main as server_cli
from server.evaluation.embeddings import COLLAPSE_COSINE
from server.evaluation.evaluate import evaluate_model, write_metrics
from server.evaluation.html_report import write_html_report
from server.federation import initial_arrays
from server.settings import RunSettings
from shared_models import build_model, load_model_config, model_to_arrays

KEYS = ["zero_shot.macro_auroc", "zero_shot.per_finding", "zero_shot.macro_ci", "findings_head.macro_auroc",
        "retrieval.report_to_volume.recall@5", "retrieval.volume_to_report.recall@1",
        "retrieval.report_to_volume.chance@5", "generation.bleu1", "generation.bleu4", "generation.rougeL",
        "generation.clinical_f1", "probe.macro_auroc", "embeddings.volume_mean_cosine",
        "embeddings.text_mean_cosine", "embeddings.collapsed"]


def test_metrics_json_has_the_stable_keys_and_sane_values(tiny_sites, tmp_path):
    sites, model_yaml = tiny_sites(1)
    torch.manual_seed(0)
    model = build_model(load_model_config(model_yaml))
    result = evaluate_model(model, sites[0], n_boot=20, generate=2, progress=False)
    assert all(key in result for key in KEYS), sorted(set(KEYS) - set(result))
    assert result["cohort.studies"] == 3
    assert result["retrieval.report_to_volume.chance@5"] == 1.0  # 3 studies: k=5 is clipped to N
    assert 0.0 <= result["retrieval.report_to_volume.recall@1"] <= 1.0
    per = result["zero_shot.per_finding"]
    assert per["Pleural effusion"]["positives"] == 1 and per["Medical material"]["auroc"] is None  # no positives
    assert "Medical material" in result["zero_shot.undefined"]
    assert len(result["generation.examples"]) == 2
    cosines = [result["embeddings.volume_mean_cosine"], result["embeddings.text_mean_cosine"]]
    assert all(-0.5 - 1e-6 <= c <= 1.0 + 1e-6 for c in cosines)  # 3 unit vectors: the mean cosine is >= -1/2
    assert result["embeddings.collapsed"] == float(max(cosines) > COLLAPSE_COSINE)
    path = write_metrics(result, tmp_path / "eval")
    saved = json.loads(path.read_text())
    assert set(KEYS) <= set(saved) and not any(k.startswith("_") for k in saved)
    html = write_html_report(result, tmp_path / "eval" / "report.html", result["_roc"], []).read_text()
    assert "<img src='data:image/png;base64," in html and "Zero-shot per finding" in html and "Generated reports" in html


def test_the_cli_evaluates_a_run_checkpoint(tiny_sites, tmp_path, capsys):
    sites, model_yaml = tiny_sites(1)
    torch.manual_seed(0)
    arrays = model_to_arrays(build_model(load_model_config(model_yaml)))
    RunFolder(tmp_path / "run").save(1, dict(arrays), {}, {"settings": {"preset": str(model_yaml)}, "run_key": "k"})
    (tmp_path / "run" / "history.jsonl").write_text(json.dumps(
        {"round": 1, "train": {"loss.clip": 1.0}, "evaluation": {"zero_shot.macro_auroc": 0.5}}) + "\n")
    checkpoint = tmp_path / "run" / "checkpoints" / "round_0001" / "global.safetensors"
    assert server_cli(["evaluate", "--checkpoint", str(checkpoint), "--data", str(sites[0]), "--out",
                       str(tmp_path / "eval"), "--bootstrap", "10", "--generate", "1"]) == 0
    assert "zero_shot.macro_auroc" in json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "Metrics by round" in (tmp_path / "eval" / "report.html").read_text()


def test_the_per_round_hook_scores_the_global_model_on_the_evaluation_cohort(tiny_sites, inprocess_grid, tmp_path):
    from server.evaluation.validation import validation_evaluator
    from server.federation import run_federation
    from server.settings import RunSettings

    sites, model_yaml = tiny_sites(3)
    grid = inprocess_grid({n: None for n in (11, 12)}, {n: {"site-config": str(p)} for n, p in zip((11, 12), sites)})
    settings = RunSettings(preset=str(model_yaml), rounds=2, local_steps=1, min_replies=2, min_available=2,
                           run_dir=str(tmp_path / "run"), objectives={"clip": 1.0, "findings": 1.0},
                           max_update_norm=1e6, evaluate_every=2, eval_cohort=str(sites[2]), eval_batches=1)
    run_federation(grid, settings, validation_evaluator(settings))
    history = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert "evaluation" not in history[0]  # every 2nd round
    scores = history[1]["evaluation"]
    assert {"validation.clip", "validation.findings", "validation.total", "zero_shot.macro_auroc",
            "retrieval.report_to_volume.recall@1", "probe.macro_auroc"} <= set(scores)
    assert scores["validation.total"] == pytest.approx(scores["validation.clip"] + scores["validation.findings"], rel=1e-6)
    assert history[1]["evaluation_seconds"] > 0


def test_the_centralized_baseline_matches_the_federated_step_count_and_format(tiny_sites, tmp_path):
    sites, model_yaml = tiny_sites(2)
    run_dir = tmp_path / "central"
    assert server_cli(["train-central", "--recipe", "tiny", "--sites", *map(str, sites), "--run-dir", str(run_dir),
                       "--batch-size", "2", "--set", f"preset={model_yaml}", "num-rounds=2", "local-steps=1",
                       "weight-report=0", "weight-multiview=0"]) == 0
    history = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["optimizer_steps"] for h in history] == [2, 4]  # local_steps x sites per round, as a federation
    assert history[0]["lr"] > history[1]["lr"]  # the recipe's schedule
    latest = RunFolder(run_dir).latest()
    assert latest.round == 2 and latest.state["run_key"] == "central"
    fresh = initial_arrays(RunSettings(preset=str(model_yaml)))
    start = load_arrays_file(run_dir / "checkpoints" / "round_0000" / "global.safetensors")
    assert all(np.array_equal(start[k], fresh[k]) for k in fresh)  # the same start as a federated run


def test_segmentation_probe_on_a_synthetic_cohort_with_masks(tmp_path):
    import yaml

    from client.cli import main as site_cli
    from server.evaluation.segmentation import segmentation_probe
    from shared_models.phantoms import CHEST_ORGANS, MASK_LABELS

    root = tmp_path / "cohort"
    assert site_cli(["synth", "--out", str(root), "--profile", "general", "--studies", "6", "--seed", "3"]) == 0
    (root / "site.yaml").write_text(yaml.safe_dump({
        "site_id": "c", "cache_dir": "cache", "model": "tiny",
        "data": {"dicom_root": "dicom", "nifti_manifest": "nifti_manifest.csv", "reports": {"path": "reports.csv"}}}))
    assert site_cli(["ingest", "--config", str(root / "site.yaml"), "--quiet", "--workers", "0"]) == 0
    torch.manual_seed(0)
    model = build_model(load_model_config("tiny").replace(text={"random_init": {
        "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}}))
    result = segmentation_probe(model, root / "site.yaml", root / "masks", list(MASK_LABELS), steps=2)
    assert result["segmentation.studies"] >= 4 and result["segmentation.test_studies"] >= 1
    assert set(result["segmentation.per_label"]) <= set(MASK_LABELS)
    assert 0.0 <= result["segmentation.mean_dice"] <= 1.0
    # organs are large: even on an untrained encoder the probe learns the body outline in a few
    # steps, which shows masks, volumes and predictions are on one grid
    organs = segmentation_probe(model, root / "site.yaml", root / "masks", sorted(CHEST_ORGANS, key=CHEST_ORGANS.get),
                                steps=20, mask_file="organs.nii.gz", prefix="organs")
    assert organs["organs.per_label"]["body"] > 0.5, organs["organs.per_label"]
