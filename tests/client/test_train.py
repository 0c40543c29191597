"""A site's local round: reproducible, FedProx-aware, optimizer state kept, non-finite weights refused."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from client.ingest.pipeline import run_ingest
from client.site_config import load_site_config
from client.train import NonFiniteUpdate, RoundConfig, train_round
from shared_models import build_model, model_to_arrays

TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


@pytest.fixture
def trained_site(tmp_path, ct_series_writer, site_yaml_writer):
    for i in range(3):
        ct_series_writer(tmp_path / "dicom" / f"s{i}", f"1.2.{i}", f"1.2.{i}.1", f"ACC{i}", slices=10, seed=i)
    (tmp_path / "reports.csv").write_text(
        "AccessionNumber,ReportText\n"
        'ACC0,"Small left pleural effusion. The heart is enlarged."\n'
        'ACC1,"No pleural effusion. A 12 mm nodule in the right lower lobe."\n'
        'ACC2,"Emphysema. No nodules."\n'
    )
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(yaml.safe_dump({"preset": "tiny", "text": {"random_init": TINY_TEXT}}))
    cfg = load_site_config(site_yaml_writer(tmp_path, compute={"batch_size": 2, "workers": 0}, model=str(model_yaml)))
    run_ingest(cfg, progress=False)
    model = build_model(cfg.model_config())
    return cfg, str(model_yaml), model_to_arrays(model)


def config(preset, **kw):
    base = dict(server_round=1, preset=preset, local_steps=4, lr=1e-3, run_key="test",
                weights={"clip": 1.0, "osl": 0.5, "mae": 1.0, "findings": 1.0})
    return RoundConfig(**{**base, **kw})


def update_norm(a, b):
    return float(np.sqrt(sum(((a[k] - b[k]).astype(np.float64) ** 2).sum() for k in a)))


def test_a_round_trains_and_is_reproducible(trained_site):
    cfg, preset, start = trained_site
    first = train_round(cfg, start, config(preset))
    assert set(first.arrays) == set(start) and update_norm(first.arrays, start) > 0
    assert first.num_examples == 4 * 2
    assert {"loss.clip", "loss.mae", "train-loss", "volumes-per-second"} <= set(first.metrics)
    again = train_round(cfg, start, config(preset))
    assert all(np.array_equal(first.arrays[k], again.arrays[k]) for k in start)


def test_the_round_flat_config_round_trips():
    rc = config("tiny", proximal_mu=0.1)
    assert RoundConfig.from_flat(rc.to_flat()) == rc


def test_optimizer_state_carries_to_the_next_round(trained_site):
    cfg, preset, start = trained_site
    one = train_round(cfg, start, config(preset))
    assert one.metrics["optimizer-resumed"] == 0.0
    two = train_round(cfg, one.arrays, config(preset, server_round=2))
    assert two.metrics["optimizer-resumed"] == 1.0


def test_fedprox_term_keeps_the_update_closer_to_the_global_model(trained_site):
    cfg, preset, start = trained_site
    free = train_round(cfg, start, config(preset, local_steps=6, run_key="free"))
    held = train_round(cfg, start, config(preset, local_steps=6, run_key="held", proximal_mu=1000.0))
    assert update_norm(held.arrays, start) < update_norm(free.arrays, start)


def test_non_finite_weights_are_never_returned(trained_site):
    cfg, preset, start = trained_site
    with pytest.raises(NonFiniteUpdate, match="non-finite weights"):
        train_round(cfg, start, config(preset, lr=float("inf"), max_grad_norm=0.0))


def test_a_cache_preprocessed_for_another_model_is_named(trained_site):
    cfg, _, start = trained_site
    with pytest.raises(ValueError, match="preprocessed for other settings .* re-run fedvlp-site ingest"):
        train_round(cfg, start, config("colipri"))


def test_a_site_with_two_processes_trains_the_round_as_one_ddp_job(trained_site):
    from client.metrics import read_snapshot

    cfg, preset, start = trained_site
    cfg.compute.processes, cfg.compute.threads = 2, 1
    result = train_round(cfg, start, config(preset, local_steps=2))
    assert set(result.arrays) == set(start) and update_norm(result.arrays, start) > 0
    assert all(result.arrays[k].dtype == start[k].dtype for k in start)
    # 3 studies shared by 2 ranks: 1 study per rank and step, 2 steps; volumes count every rank's
    assert result.num_examples == 2 * 2 and result.metrics["volumes"] == 4.0
    assert {"loss.clip", "loss.mae", "train-loss"} <= set(result.metrics)
    assert "gpu-memory-peak-bytes" not in result.metrics  # kept at the site
    state = cfg.cache_path / "train_state" / "test"
    assert (state / "optimizer_round0001.pt").is_file() and (state / "ddp_round_0001.log").is_file()
    assert not (state / "ddp_round_0001").exists()  # the exchange folder (weights) is removed
    snapshot = read_snapshot(cfg.cache_dir)
    assert snapshot["training"] == 0 and snapshot["totals"]["rounds_completed"] == 1
    assert snapshot["totals"]["volumes"] == 4.0


def test_a_failed_multi_process_round_names_its_log_and_is_counted(trained_site):
    from client.ddp import DistributedRoundError
    from client.metrics import read_snapshot

    cfg, preset, start = trained_site
    cfg.compute.processes, cfg.compute.threads = 2, 1
    broken = dict(start)
    broken.pop(sorted(broken)[0])  # rank 0 cannot load the global model
    with pytest.raises(DistributedRoundError, match="ddp_round_0001.log"):
        train_round(cfg, broken, config(preset, local_steps=1))
    assert read_snapshot(cfg.cache_dir)["totals"]["rounds_failed"] == 1


def test_gpu_compute_options_keep_the_state_dict_layout(trained_site):
    """compile and channels-last change how the model runs, never the names or shapes that travel."""
    import torch

    from client.train import apply_compute_options

    cfg, preset, start = trained_site
    cfg.compute.compile, cfg.compute.channels_last = True, True
    model = build_model(load_site_config(cfg.source).model_config(preset=preset))
    apply_compute_options(model, cfg, torch.device("cpu"))
    assert all(block._compiled_call_impl is not None for block in model.vision.blocks)
    assert model.vision.patch_embed.weight.is_contiguous(memory_format=torch.channels_last_3d)
    arrays = model_to_arrays(model)
    assert list(arrays) == list(start) and all(arrays[k].shape == start[k].shape for k in start)


def test_a_site_completes_the_frozen_part_itself_and_refuses_one_that_differs(trained_site):
    from client.train import FrozenPartMismatch, with_frozen_part
    from shared_models import arrays_digest

    cfg, _, _ = trained_site
    model = build_model(cfg.model_config())
    model.text.requires_grad_(False)  # a locked tower (frozen_keys reads requires_grad)
    arrays = model_to_arrays(model)
    frozen = [k for k in arrays if k.startswith("text.")]
    sent = {k: v for k, v in arrays.items() if k not in frozen}
    digest = arrays_digest(arrays, frozen)
    completed = with_frozen_part(model, sent, digest, cfg)
    assert set(completed) == set(arrays) and all(np.array_equal(completed[k], arrays[k]) for k in arrays)
    assert with_frozen_part(model, arrays, digest, cfg) is arrays  # everything sent: nothing to complete
    other = build_model(cfg.model_config())  # another random text tower: not the federation's
    other.text.requires_grad_(False)
    with pytest.raises(FrozenPartMismatch, match=r"site test-site: the frozen part .* text\.model_dir .*site\.yaml"):
        with_frozen_part(other, sent, digest, cfg)
