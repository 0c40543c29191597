"""The site YAML: paths resolved, and every mistake named with its key and file."""

from __future__ import annotations

import pytest

from client.site_config import SiteConfigError, load_site_config


@pytest.fixture
def export(tmp_path):
    (tmp_path / "dicom").mkdir()
    (tmp_path / "reports.csv").write_text("AccessionNumber,ReportText\n")
    return tmp_path


def write(tmp_path, text: str):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


GOOD = """site_id: hospital-a
cache_dir: cache
data:
  dicom_root: dicom
  reports: {path: reports.csv}
"""


def test_relative_paths_resolve_against_the_yaml_folder(export):
    cfg = load_site_config(write(export, GOOD))
    assert cfg.data.dicom_root == str(export / "dicom")
    assert cfg.data.reports.path == str(export / "reports.csv")
    assert cfg.cache_dir == str(export / "cache")
    assert cfg.model_config().name == "tiny" and cfg.compute.batch_size == 4


def test_preprocess_overrides_apply_to_the_model_preset(export):
    cfg = load_site_config(write(export, GOOD + "preprocess: {spacing: [4.0, 4.0, 4.0]}\n"))
    assert cfg.preprocess_config().spacing == (4.0, 4.0, 4.0)
    assert cfg.preprocess_config().size == (64, 64, 64)


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD + "colour: blue\n", "unknown key\\(s\\) colour"),
        (GOOD.replace("  dicom_root: dicom", "  dicom_root: dicom\n  dicom_rot: x"), "unknown key\\(s\\) data.dicom_rot"),
        (GOOD + "compute: {batch_size: four}\n", "compute.batch_size should be int, got 'four'"),
        (GOOD.replace("dicom_root: dicom", "dicom_root: missing"), "data.dicom_root: folder .*missing does not exist"),
        (GOOD.replace("path: reports.csv", "path: nope.csv"), "data.reports.path: file .*nope.csv does not exist"),
        (GOOD.replace("site_id: hospital-a\n", ""), "site_id: is required"),
        (GOOD.replace("cache_dir: cache\n", ""), "cache_dir: is required"),
        (GOOD + "model: nonsense\n", "model: unknown preset 'nonsense'"),
        (GOOD.replace("  reports: {path: reports.csv}\n", ""), "data.reports: no report export is configured"),
        (GOOD + "data2: 1\n", "unknown key\\(s\\) data2"),
        (GOOD.replace("{path: reports.csv}", "{path: reports.csv, key: mrn}"), "data.reports.key: should be accession_number or study_uid"),
        (GOOD.replace("  dicom_root: dicom\n", "  dicom_root: dicom\n  modalities: [CT, PET]\n"), "data.modalities: should list CT and/or MR"),
        (GOOD.replace("  dicom_root: dicom\n", "  dicom_root: dicom\n  labeler: {kind: llm}\n"), "data.labeler: kind 'llm' needs endpoint"),
        (GOOD + "preprocess: {size: [60, 64, 64]}\n", "preprocess: .*divisible"),
        (GOOD + "preprocess: {hu_window: [-1000.0, 1000.0]}\n",
         "preprocess: hu_window \\[-1000.0, 1000.0\\]: model 'tiny' reads intensity windows "
         "\\(vision.input_windows\\) set on its own HU window \\[-1000.0, 3000.0\\]; remove preprocess.hu_window"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_bad_site_configs_name_key_and_file(export, text, message):
    path = write(export, text)
    with pytest.raises(SiteConfigError, match=message) as info:
        load_site_config(path)
    assert str(path) in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SiteConfigError, match="site config not found: .*absent.yaml"):
        load_site_config(tmp_path / "absent.yaml")


def test_the_shipped_example_uses_only_known_keys():
    from pathlib import Path

    import yaml

    from client.site_config import SiteConfig
    from shared_models.config import build_dataclass

    path = Path(__file__).resolve().parents[2] / "site_configs" / "example-site.yaml"
    cfg = build_dataclass(SiteConfig, yaml.safe_load(path.read_text()), str(path))
    assert cfg.site_id == "hospital-a" and cfg.data.reports.key_column == "AccessionNumber"
