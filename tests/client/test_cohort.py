"""The cohort dataset over an ingested site cache yields what every objective needs."""

from __future__ import annotations

import pytest
import torch

from shared_models.cohort import Collate, SiteDataset
from client.ingest.pipeline import run_ingest
from client.site_config import load_site_config
from shared_models import OBJECTIVES, build_model, training_losses
from shared_models.reports import report_body, structured_findings_report


@pytest.fixture
def site(tmp_path, ct_series_writer, site_yaml_writer):
    for i in range(3):
        ct_series_writer(tmp_path / "dicom" / f"s{i}", f"1.2.{i}", f"1.2.{i}.1", f"ACC{i}", slices=10, seed=i)
    ct_series_writer(tmp_path / "dicom" / "s0b", "1.2.0", "1.2.0.2", "ACC0", slices=12, seed=9)  # a second scan
    ct_series_writer(tmp_path / "dicom" / "img_only", "1.2.9", "1.2.9.1", "ACC9", slices=10)
    (tmp_path / "reports.csv").write_text(
        "AccessionNumber,ReportText\n"
        'ACC0,"FINDINGS: Small left pleural effusion. The heart is enlarged. IMPRESSION: Effusion."\n'
        'ACC1,"FINDINGS: No pleural effusion. A 12 mm nodule in the right lower lobe."\n'
        'ACC2,"FINDINGS: Emphysema. No nodules. IMPRESSION: Emphysema."\n'
    )
    cfg = load_site_config(site_yaml_writer(tmp_path, data={"require_report": False}))
    run_ingest(cfg, progress=False)
    return cfg


def test_vision_language_items_and_batches(site, make_tiny_config):
    model_cfg = make_tiny_config()
    data = SiteDataset(site.cache_dir, model_cfg)
    assert len(data) == 3  # the image-only study is left out of vision-language batches
    batch = Collate(model_cfg)([data[i] for i in range(3)])
    assert batch["volume"].shape == (3, 1, 64, 64, 64) and batch["volume"].dtype == torch.float32
    assert len(batch["report"]) == 3
    # studies sorted by UID: ACC0 first; the decoder's target is its findings as a structured report by default
    assert batch["report_target"][0] == structured_findings_report(data.studies[0]["findings"], "ct_rate")
    assert "Pleural effusion is present." in batch["report_target"][0]
    assert batch["finding_labels"].shape == (3, 18) and batch["finding_labels"].sum() > 0
    assert batch["osl_index"].numel() == len(batch["osl_positive"]) > 0
    assert batch["views"].shape == (3, 2, 1, 32, 32, 32)
    model = build_model(model_cfg)
    losses = training_losses(model, batch, {name: 1.0 for name in OBJECTIVES})
    assert all(torch.isfinite(v) for v in losses.values())


def test_vision_only_items_for_mae(site, make_tiny_config):
    model_cfg = make_tiny_config()
    data = SiteDataset(site.cache_dir, model_cfg, with_reports=False)
    assert len(data) == 4
    batch = Collate(model_cfg)([data[i] for i in range(4)])
    assert "report" not in batch and batch["volume"].shape[0] == 4


def test_hierarchical_models_get_padded_studies(site, make_tiny_config):
    model_cfg = make_tiny_config(vision={"study_attention_every": 2})
    data = SiteDataset(site.cache_dir, model_cfg, augment=False)
    batch = Collate(model_cfg)([data[i] for i in range(3)])
    assert batch["study"].shape[:2] == (3, 2)
    assert batch["study_mask"].tolist() == [[True, True], [True, False], [True, False]]


def test_augmentation_is_deterministic_per_seed_and_epoch(site, make_tiny_config):
    model_cfg = make_tiny_config()
    a, b = SiteDataset(site.cache_dir, model_cfg, seed=3), SiteDataset(site.cache_dir, model_cfg, seed=3)
    assert [a[i]["report"] for i in range(3)] == [b[i]["report"] for i in range(3)]
    texts = set()
    for epoch in range(30):
        a.set_epoch(epoch)
        texts.add(a[0]["report"])
    assert len(texts) > 1  # COLIPRI's augmentation varies the report between epochs


def test_an_empty_cache_is_a_clear_error(tmp_path, make_tiny_config):
    with pytest.raises(ValueError, match="no studies with a report in .*run fedvlp-site ingest"):
        SiteDataset(tmp_path, make_tiny_config())


def test_dataloader_workers_draw_different_views(site, make_tiny_config):
    from torch.utils.data import DataLoader

    model_cfg = make_tiny_config()
    data = SiteDataset(site.cache_dir, model_cfg)
    loader = DataLoader([data[0], data[0]], batch_size=1, num_workers=2, collate_fn=Collate(model_cfg, seed=1))
    first, second = list(loader)
    assert not torch.equal(first["views"], second["views"])  # same item, different worker: other crops


AUGMENT = {"intensity_shift": 0.1, "intensity_scale": 0.2, "noise_std": 0.05, "max_translation": 2}


def volume_items(n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"volume": torch.randn(1, 32, 32, 32, generator=g), "findings": {"Cardiomegaly": bool(i % 2)}}
            for i in range(n)]


@pytest.mark.parametrize("augment, section, changed", [
    (None, AUGMENT, False),  # the default: evaluation and validation batches are never augmented
    (False, AUGMENT, False),
    (True, AUGMENT, True),
    (True, {}, False),  # an all-zero augment section changes nothing
])
def test_collate_augments_volumes_only_when_asked(make_tiny_config, augment, section, changed):
    model_cfg = make_tiny_config(augment=section)
    items = volume_items()
    kwargs = {} if augment is None else {"augment": augment}
    batch = Collate(model_cfg, seed=1, **kwargs)(items)
    stacked = torch.stack([item["volume"] for item in items])
    assert batch["volume"].shape == stacked.shape
    assert torch.equal(batch["volume"], stacked) != changed
    assert all(torch.equal(a["volume"], b["volume"]) for a, b in zip(items, volume_items()))  # items untouched


def test_collate_augmentation_is_seeded_and_new_every_batch(make_tiny_config):
    model_cfg = make_tiny_config(augment=AUGMENT)
    a, b, c = (Collate(model_cfg, seed=s, augment=True) for s in (1, 1, 2))
    items = volume_items()
    first = a(items)["volume"]
    assert torch.equal(first, b(items)["volume"])
    assert not torch.allclose(first, c(items)["volume"])
    assert not torch.allclose(first, a(items)["volume"])  # the next batch draws again


@pytest.mark.parametrize("variants", [0, 1, 2, 3])
def test_report_variants_bound_the_distinct_reports_per_study(site, make_tiny_config, variants):
    data = SiteDataset(site.cache_dir, make_tiny_config(augment={"report_variants": variants}), seed=3)
    seen: list[set[str]] = [set() for _ in range(len(data))]
    for epoch in range(40):
        data.set_epoch(epoch)
        for i in range(len(data)):
            seen[i].add(data[i]["report"])
    most = max(len(s) for s in seen)
    if variants == 0:  # a fresh draw every epoch
        assert most > 3
    else:
        assert most <= variants
        assert most > 1 or variants == 1  # still augmented, within the bound


@pytest.mark.parametrize("target", ["findings", "report"])
@pytest.mark.parametrize("augment", [True, False])
def test_report_target_follows_the_decoder_target(site, make_tiny_config, target, augment):
    data = SiteDataset(site.cache_dir, make_tiny_config(decoder={"target": target}), augment=augment)
    for i, study in enumerate(data.studies):
        expected = (structured_findings_report(study["findings"], "ct_rate") if target == "findings"
                    else report_body(study["report"]))
        assert data[i]["report_target"] == expected  # never augmented
        if not augment:
            assert data[i]["report"] == report_body(study["report"])


def test_osl_pairs_per_study_come_from_the_config_and_zero_takes_every_mentioned_finding(site, make_tiny_config):
    def pairs_per_study(cfg, **kwargs):
        data = SiteDataset(site.cache_dir, cfg)
        batch = Collate(cfg, seed=3, **kwargs)([data[i] for i in range(3)])
        return torch.bincount(batch["osl_index"], minlength=3).tolist()

    every = pairs_per_study(make_tiny_config(osl_pairs=0))
    assert max(every) > 1  # the first report mentions two findings (effusion, cardiomegaly)
    assert pairs_per_study(make_tiny_config(osl_pairs=1)) == [min(n, 1) for n in every]
    assert pairs_per_study(make_tiny_config(osl_pairs=1), max_osl_pairs=0) == every  # an explicit argument wins
