"""Sample-level DP-SGD at a site (opacus): decomposable objectives train, coupled ones are refused,
the site's accountant spans the run, and the epsilon matches opacus's own accounting."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from opacus.accountants import RDPAccountant

from client.dp_sgd import SampleDPError, accountant_file
from client.ingest.pipeline import run_ingest
from client.site_config import load_site_config
from client.train import RoundConfig, train_round
from shared_models import build_model, model_to_arrays
from shared_models.losses import findings_loss, report_generation_loss

TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
SMALL = {"preprocess": {"size": [32, 32, 32]}, "vision": {"width": 96, "depth": 2, "heads": 2},
         "decoder": {"width": 64, "layers": 1, "heads": 2}, "mae": {"decoder_width": 64, "decoder_heads": 2}}
DECOMPOSABLE = {"mae": 1.0, "report": 0.5, "findings": 1.0}


@pytest.fixture(scope="module")
def dp_site(tmp_path_factory):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_client_fixtures", Path(__file__).with_name("conftest.py"))
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    root = tmp_path_factory.mktemp("dpsite")
    reports = ["Small left pleural effusion. The heart is enlarged.", "No pleural effusion. A 12 mm nodule.",
               "Emphysema. No nodules.", "Cardiomegaly. No effusion."]
    for i in range(len(reports)):
        fixtures.write_ct_series(root / "dicom" / f"s{i}", f"1.2.{i}", f"1.2.{i}.1", f"ACC{i}", slices=10, seed=i)
    (root / "reports.csv").write_text("AccessionNumber,ReportText\n" + "".join(f'ACC{i},"{r}"\n' for i, r in enumerate(reports)))
    model_yaml = root / "model.yaml"
    model_yaml.write_text(yaml.safe_dump({"preset": "tiny", "text": {"random_init": TINY_TEXT}, **SMALL}))
    path = fixtures.write_site_yaml(root, compute={"batch_size": 2, "workers": 0, "device": "cpu"}, model=str(model_yaml),
                                    privacy={"sample_dp": True, "noise_multiplier": 1.3, "max_grad_norm": 1.0})
    cfg = load_site_config(path)
    run_ingest(cfg, progress=False)
    torch.manual_seed(0)
    return cfg, str(model_yaml), model_to_arrays(build_model(cfg.model_config()))


def round_config(preset, **kw):
    base = dict(server_round=1, preset=preset, local_steps=3, lr=1e-3, run_key="dp", weights=dict(DECOMPOSABLE))
    return RoundConfig(**{**base, **kw})


def test_decomposable_objectives_train_under_dp_sgd_and_the_epsilon_is_opacus_accounting(dp_site):
    cfg, preset, start = dp_site
    result = train_round(cfg, start, round_config(preset, run_key="a"))
    changed = [k for k in start if not np.array_equal(start[k], result.arrays[k])]
    assert any(k.startswith("vision.") for k in changed) and any(k.startswith("mae_decoder.") for k in changed)
    assert any(k.startswith("findings_head.") for k in changed) and any(k.startswith("report_decoder.") for k in changed)
    assert not any(k.startswith("text.") for k in changed)  # no decomposable objective reaches the text encoder
    assert {"loss.mae", "loss.report", "loss.findings", "dp-epsilon", "dp-delta"} <= set(result.metrics)
    independent = RDPAccountant()
    independent.history = [(1.3, 2 / 4, 3)]  # 3 steps, Poisson rate batch/studies
    assert result.metrics["dp-epsilon"] == pytest.approx(independent.get_epsilon(1e-5), abs=1e-6)
    assert result.metrics["dp-epsilon"] > 0 and all(np.isfinite(v).all() for v in result.arrays.values())


def test_the_sites_accountant_spans_the_run(dp_site):
    cfg, preset, start = dp_site
    first = train_round(cfg, start, round_config(preset, run_key="b"))
    second = train_round(cfg, first.arrays, round_config(preset, run_key="b", server_round=2))
    reference = RDPAccountant()
    reference.history = [(1.3, 0.5, 3), (1.3, 0.5, 3)]
    assert second.metrics["dp-epsilon"] == pytest.approx(reference.get_epsilon(1e-5), abs=1e-6)
    assert second.metrics["dp-epsilon"] > first.metrics["dp-epsilon"]
    rerun = train_round(cfg, first.arrays, round_config(preset, run_key="b", server_round=2))  # a re-run round
    assert rerun.metrics["dp-epsilon"] == pytest.approx(second.metrics["dp-epsilon"], abs=1e-9)
    ledger = json.loads(accountant_file(cfg.cache_path / "train_state" / "b", 2).read_text())
    assert sum(h[2] for h in ledger["history"]) == 6  # opacus merges equal (noise, rate) entries


def test_a_spent_site_budget_refuses_further_rounds(dp_site):
    cfg, preset, start = dp_site
    first = train_round(cfg, start, round_config(preset, run_key="c"))
    capped = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, max_epsilon=first.metrics["dp-epsilon"]))
    with pytest.raises(SampleDPError, match="budget is spent"):
        train_round(capped, first.arrays, round_config(preset, run_key="c", server_round=2))


@pytest.mark.parametrize("coupled", ["clip", "osl", "multiview"])
def test_batch_coupled_objectives_are_refused_with_the_way_out(dp_site, coupled):
    cfg, preset, start = dp_site
    with pytest.raises(SampleDPError) as err:
        train_round(cfg, start, round_config(preset, weights={**DECOMPOSABLE, coupled: 1.0}))
    message = str(err.value)
    assert coupled in message and "client-level DP" in message and cfg.source in message


def test_per_sample_normalisation_makes_the_losses_means_of_per_sample_terms():
    """DP-SGD needs loss = mean_i l_i: each sample's term may not depend on the others (its length, its mask)."""
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 6, 11), torch.randint(0, 11, (3, 6))
    labels[0, 3:] = -100  # a short report
    joint = report_generation_loss(logits, labels, per_sample_mean=True)
    alone = torch.stack([report_generation_loss(logits[i:i + 1], labels[i:i + 1], per_sample_mean=True) for i in range(3)])
    assert joint == pytest.approx(float(alone.mean()), abs=1e-6)
    assert report_generation_loss(logits, labels) != pytest.approx(float(joint), abs=1e-4)  # the token mean differs
    f_logits, f_labels = torch.randn(3, 5), torch.randint(0, 2, (3, 5)).float()
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]]).float()
    joint = findings_loss(f_logits, f_labels, mask, per_sample_mean=True)
    alone = torch.stack([findings_loss(f_logits[i:i + 1], f_labels[i:i + 1], mask[i:i + 1], per_sample_mean=True)
                         for i in range(3)])
    assert joint == pytest.approx(float(alone.mean()), abs=1e-6)
