"""Presets load by name with the seeds' sizes; bad config keys, types and values name the problem."""

from __future__ import annotations

import pytest
import torch

from shared_models import ModelConfig, available_presets, load_config_file, load_preset
from shared_models.vision import build_vision_encoder, count_parameters

SEED_PRESETS = ["colipri", "t3d", "hlip", "supervised_clip"]


def test_all_presets_are_available():
    assert available_presets() == sorted(SEED_PRESETS + ["tiny"])


@pytest.mark.parametrize("name", SEED_PRESETS + ["tiny"])
def test_preset_loads_and_round_trips(name):
    cfg = load_preset(name)
    assert cfg.name == name
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_colipri_has_the_seed_sizes():
    v, p = load_preset("colipri").vision, load_preset("colipri").preprocess
    assert (v.patch_size, v.width, v.depth) == ((8, 8, 8), 864, 16)
    assert p.spacing == (2.0, 2.0, 2.0) and p.size == (192, 192, 192)


def test_hlip_attends_across_the_study_every_third_block():
    cfg = load_preset("hlip")
    with torch.device("meta"):
        encoder = build_vision_encoder(cfg.vision)
    assert [i for i, level in enumerate(encoder.levels) if level == "study"] == [2, 5, 8, 11]
    assert cfg.vision.patch_size == (8, 16, 16) and cfg.preprocess.size == (48, 224, 224)


@pytest.mark.parametrize(
    "name, low, high",
    [("colipri", 140e6, 150e6), ("hlip", 84e6, 88e6), ("t3d", 44e6, 48e6), ("supervised_clip", 32e6, 35e6),
     ("tiny", 2.4e6, 2.7e6)],
)
def test_vision_encoder_parameter_counts(name, low, high):
    with torch.device("meta"):  # sizes only: no memory is allocated
        encoder = build_vision_encoder(load_preset(name).vision)
    assert low <= count_parameters(encoder) <= high


def test_unknown_preset_names_it_and_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'colipro'; available presets: colipri, hlip"):
        load_preset("colipro")


@pytest.mark.parametrize(
    "yaml_text, error, message",
    [
        ("preset: tiny\nvision: {widht: 3}\n", ValueError, "unknown key\\(s\\) vision.widht"),
        ("preset: tiny\nvision: {depth: four}\n", TypeError, "vision.depth should be int, got 'four'"),
        ("preset: tiny\nvision: {patch_size: [8, 8]}\n", TypeError, "vision.patch_size should have 3 entries"),
        ("preset: tiny\nmae: {mask_ratio: 1.5}\n", ValueError, "mae.mask_ratio should be in \\(0, 1\\), got 1.5"),
        ("preset: tiny\nmae: {mask_ratio: 0}\n", ValueError, "mae.mask_ratio should be in \\(0, 1\\), got 0"),
        ("preset: tiny\nobjectives: {clipp: 1}\n", ValueError, "objectives has unknown names \\['clipp'\\]"),
        ("preset: tiny\nobjectives: {clip: -1}\n", ValueError, "objectives.clip should be a finite weight"),
        ("preset: tiny\nvision: {kind: swin}\n", ValueError, "vision.kind should be 'vit' or 'resnet', got 'swin'"),
        ("preset: tiny\nvision: {width: 100, heads: 3}\n", ValueError, "vision.width \\(100\\) should be divisible"),
        ("preset: tiny\npreprocess: {size: [60, 64, 64]}\n", ValueError, "preprocess.size .* divisible"),
        ("- just\n- a list\n", ValueError, "expected a mapping at the top level"),
        ("preset: nope\n", ValueError, "unknown preset 'nope'"),
    ],
)
def test_bad_config_files_name_the_key_and_file(tmp_path, yaml_text, error, message):
    path = tmp_path / "model.yaml"
    path.write_text(yaml_text)
    with pytest.raises(error, match=message) as info:
        load_config_file(path)
    if "unknown key" in message or "should be int" in message:
        assert str(path) in str(info.value)


def test_config_file_overrides_a_preset(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("preset: tiny\nvision: {depth: 2}\nobjectives: {clip: 1.0, mae: 0.5}\n")
    cfg = load_config_file(path)
    assert cfg.vision.depth == 2 and cfg.vision.width == 192
    assert cfg.objectives == {"clip": 1.0, "mae": 0.5}


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model config file not found: .*absent.yaml"):
        load_config_file(tmp_path / "absent.yaml")
