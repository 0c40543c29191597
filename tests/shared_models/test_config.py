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
     ("tiny", 2.3e6, 2.6e6)],
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


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("text: {trainable_layers: -2}\n", "text.trainable_layers should be >= -1 and text.cache_size >= 0, got -2 and"),
        ("text: {cache_size: -1}\n", "text.trainable_layers should be >= -1 and text.cache_size >= 0, got 0 and -1"),
        ("text: {lr_scale: -0.1}\n", "text.lr_scale should be a finite number >= 0, got -0.1"),
        ("text: {lr_scale: .inf}\n", "text.lr_scale should be a finite number >= 0, got inf"),
        ("text: {lr_scale: .nan}\n", "text.lr_scale should be a finite number >= 0, got nan"),
        ("augment: {intensity_shift: -0.1}\n", "augment.intensity_shift should be >= 0, got -0.1"),
        ("augment: {intensity_scale: -0.5}\n", "augment.intensity_scale should be >= 0, got -0.5"),
        ("augment: {intensity_scale: 1.0}\n", "augment.intensity_scale should be below 1, got 1.0"),
        ("augment: {intensity_scale: 1.5}\n", "augment.intensity_scale should be below 1, got 1.5"),
        ("augment: {noise_std: -0.01}\n", "augment.noise_std should be >= 0, got -0.01"),
        ("augment: {noise_std: .nan}\n", "augment.noise_std should be >= 0, got nan"),
        ("augment: {max_translation: -1}\n", "augment.max_translation should be >= 0, got -1"),
        ("augment: {report_variants: -3}\n", "augment.report_variants should be >= 0, got -3"),
        ("vision: {conv_stem: [8, 0]}\n", "vision.conv_stem should list positive channel counts"),
        ("vision: {conv_stem: [8], conv_stem_kernel: 3}\n", "vision.patch_size \\(16, 16, 16\\) should be divisible "
         "by vision.conv_stem_kernel \\*\\* len\\(vision.conv_stem\\) = 3"),
        ("vision: {conv_stem: [4, 4, 4], conv_stem_kernel: 4}\n", "should be divisible .* = 64"),
        ("vision: {conv_stem: [4], conv_stem_kernel: 0}\n", "vision.patch_size .* should be divisible"),
        ("vision: {input_windows: [[0.5, 0.5, 0.0, 1.0]]}\n", "vision.input_windows: each window should be "
         "\\[low, high, mean, std\\] with 0 <= low < high <= 1 and std > 0, got \\[0.5, 0.5, 0.0, 1.0\\]"),
        ("vision: {input_windows: [[0.0, 1.5, 0.0, 1.0]]}\n", "vision.input_windows: each window"),
        ("vision: {input_windows: [[0.0, 1.0, 0.0, 0.0]]}\n", "vision.input_windows: each window"),
        ("decoder: {target: text}\n", "decoder.target should be 'findings' or 'report', got 'text'"),
        ("osl_pairs: -1\n", "osl_pairs should be >= 0 \\(0 = every mentioned finding\\), got -1"),
    ],
)
def test_bad_text_augment_stem_and_decoder_values_name_the_key(tmp_path, yaml_text, message):
    path = tmp_path / "model.yaml"
    path.write_text("preset: tiny\n" + yaml_text)
    with pytest.raises(ValueError, match=message):
        load_config_file(path)


@pytest.mark.parametrize(
    "section, values",
    [("text", {"trainable_layers": -1, "cache_size": 0, "lr_scale": 0.0}), ("text", {"trainable_layers": 12}),
     ("augment", {"intensity_scale": 0.99, "max_translation": 0}), ("vision", {"conv_stem": (8, 16), "conv_stem_kernel": 4}),
     ("vision", {"conv_stem": (4, 4, 4, 4), "conv_stem_kernel": 2}), ("decoder", {"target": "report"})],
)
def test_the_edges_of_the_allowed_values_load(tmp_path, section, values):
    import yaml

    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"preset": "tiny", section: {k: list(v) if isinstance(v, tuple) else v
                                                                   for k, v in values.items()}}))
    loaded = getattr(load_config_file(path), section)
    assert {k: getattr(loaded, k) for k in values} == values
