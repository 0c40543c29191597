"""The site YAML: what a hospital site's operator writes to point fedvlp at its PACS export.

Schema (every key optional unless marked; relative paths are relative to the YAML file's folder)::

    site_id: hospital-a                 # required; a name for logs and metrics (never sent with data)
    model: tiny                         # preset name or path to a model YAML; must match the federation's
    text_model_dir: /models/cxr-bert    # local text encoder folder, if the run recipe uses one
    cache_dir: ./cache                  # required; manifest, preprocessed volumes, ingest_report.json
    data:
      dicom_root: /pacs/export          # a DICOM folder tree (any depth, any file names)
      nifti_manifest: ./nifti.csv       # CSV: path,study_id,series_id,modality,accession_number
      reports:                          # the RIS export
        path: /pacs/reports.csv         # .csv or .jsonl
        format: auto                    # auto | csv | jsonl
        key: accession_number           # accession_number | study_uid: what joins a report to a study
        key_column: AccessionNumber
        text_column: ReportText
        encoding: utf-8
      modalities: [CT, MR]
      min_slices: 16                    # shorter series are skipped ("series too small")
      max_series_voxels: 536870912      # larger series are refused before any pixel is read (2^29: 2 GiB as float32)
      require_report: true              # false: studies without a report are kept for vision-only MAE
      labeler:
        kind: rules                     # rules | llm (an OpenAI-compatible endpoint inside the hospital)
        endpoint: http://llm.internal:8000/v1
        model: local-model-name
        api_key_env: null               # name of an environment variable holding the endpoint's key
        timeout_s: 30
    preprocess: {}                      # overrides of the model's preprocessing (spacing, size, ...)
    compute:
      device: auto                      # auto | cpu | cuda | cuda:N
      batch_size: 4                     # volumes per step on each GPU (process)
      workers: 2                        # DataLoader worker processes per GPU (used on GPU only)
      amp: true                         # bf16 autocast on GPU
      grad_accum: 1
      threads: null                     # torch CPU threads; null = torch's default
      processes: 1                      # > 1: one process per GPU with torch.distributed (DDP), e.g. 4
      compile: false                    # torch.compile the vision encoder (GPU; first step compiles)
      channels_last: false              # channels-last-3d memory format (helps the ResNet encoders on GPU)
    privacy:
      sample_dp: false                  # DP-SGD (opacus) on this site's data: MAE, report and findings only
      noise_multiplier: 1.0             #   DP-SGD noise (std = noise_multiplier * max_grad_norm per batch)
      max_grad_norm: 1.0                #   per-sample gradient clipping bound
      target_delta: 1.0e-5              #   the delta the site's epsilon is reported at
      max_epsilon: 0                    #   > 0: refuse to train a round once this epsilon is spent
      allowed_fab_hashes: []            # app versions (FAB hashes) this site runs; [] runs none, `any` runs any
      approvals_dir: ./approved_apps    # what `fedvlp-site approve PROJECT` recorded (added to the list above)
      max_num_examples: 100000          # the largest num-examples a reply may carry (volumes of one round)
      egress_log: null                  # a JSONL file recording every reply that leaves the site
    metrics:
      port: null                        # fedvlp-site metrics serves Prometheus metrics here (e.g. 9101)
      address: 0.0.0.0

Unknown keys, wrong types and missing paths are errors that name the key and the file.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared_models.config import ModelConfig, PreprocessConfig, build_dataclass, load_model_config

from .ingest.reasons import MAX_SERIES_VOXELS


ANY_APP = "any"  # privacy.allowed_fab_hashes: any: the site runs every app version (an explicit choice)


class SiteConfigError(ValueError):
    """A site YAML problem, naming the file and the key."""


@dataclass
class ReportsConfig:
    path: str = ""
    format: str = "auto"
    key: str = "accession_number"
    key_column: str = "AccessionNumber"
    text_column: str = "ReportText"
    encoding: str = "utf-8"


@dataclass
class LabelerConfig:
    kind: str = "rules"
    endpoint: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    timeout_s: float = 30.0


@dataclass
class DataConfig:
    dicom_root: str | None = None
    nifti_manifest: str | None = None
    reports: ReportsConfig | None = None
    modalities: list[str] = field(default_factory=lambda: ["CT", "MR"])
    min_slices: int = 16
    max_series_voxels: int = MAX_SERIES_VOXELS
    require_report: bool = True
    labeler: LabelerConfig = field(default_factory=LabelerConfig)


@dataclass
class ComputeConfig:
    device: str = "auto"
    batch_size: int = 4
    workers: int = 2
    amp: bool = True
    grad_accum: int = 1
    threads: int | None = None  # torch CPU threads; None = torch's default
    processes: int = 1  # > 1: DDP over this many processes (one per GPU; gloo on CPU)
    compile: bool = False  # torch.compile the vision encoder
    channels_last: bool = False  # channels_last_3d memory format for volumes and conv weights


@dataclass
class PrivacyConfig:
    sample_dp: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_delta: float = 1e-5
    max_epsilon: float = 0.0
    allowed_fab_hashes: Any = field(default_factory=list)  # a list of FAB hashes, or the string "any"
    approvals_dir: str = "approved_apps"
    max_num_examples: int = 100_000
    egress_log: str | None = None


@dataclass
class MetricsConfig:
    port: int | None = None  # where `fedvlp-site metrics` serves the site's Prometheus metrics
    address: str = "0.0.0.0"


@dataclass
class SiteConfig:
    site_id: str = ""
    model: str = "tiny"
    text_model_dir: str | None = None
    cache_dir: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: dict[str, Any] = field(default_factory=dict)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = ""  # the YAML file this came from (set by the loader)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)

    def model_config(self, preset: str | None = None) -> ModelConfig:
        """The model config (``preset``, else the site's ``model``), with the site's text folder and preprocessing."""
        cfg = load_model_config(preset or self.model)
        overrides: dict[str, Any] = {}
        if self.text_model_dir:
            overrides["text"] = {"model_dir": self.text_model_dir}
        if self.preprocess:
            overrides["preprocess"] = self.preprocess
        out = cfg.replace(**overrides) if overrides else cfg
        if out.vision.input_windows and tuple(out.preprocess.hu_window) != tuple(cfg.preprocess.hu_window):
            # the encoder's windows are fractions of the model's HU window: another window here would
            # feed the federation's weights other intensities under the same names
            raise ValueError(f"hu_window {list(out.preprocess.hu_window)}: model {preset or self.model!r} "
                             f"reads intensity windows (vision.input_windows) set on its own HU window "
                             f"{list(cfg.preprocess.hu_window)}; remove preprocess.hu_window from the site YAML.")
        return out

    def preprocess_config(self) -> PreprocessConfig:
        return self.model_config().preprocess


def load_site_config(path: str | Path, require_data: bool = True) -> SiteConfig:
    """Load and validate a site YAML; relative paths become absolute (relative to the YAML's folder).

    ``require_data=False`` skips the checks that the PACS and report exports exist, for tools that read
    only the cache (the metrics exporter runs beside the SuperNode without the exports mounted).
    """
    path = Path(path).expanduser().resolve()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteConfigError(f"site config not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SiteConfigError(f"{path}: not a readable YAML file: {err}") from None
    if not isinstance(raw, dict):
        raise SiteConfigError(f"{path}: expected a mapping of settings at the top level.")
    raw.pop("source", None)
    try:
        cfg = build_dataclass(SiteConfig, raw, str(path))
    except (TypeError, ValueError) as err:
        raise SiteConfigError(str(err)) from None
    cfg.source = str(path)
    _resolve_paths(cfg, path.parent)
    _validate(cfg, path, require_data)
    return cfg


def _resolve_paths(cfg: SiteConfig, base: Path) -> None:
    def absolute(value: str | None) -> str | None:
        return None if value in (None, "") else str((base / Path(value).expanduser()).resolve())

    cfg.cache_dir = absolute(cfg.cache_dir) or ""
    cfg.text_model_dir = absolute(cfg.text_model_dir)
    if cfg.model.endswith((".yaml", ".yml")):
        cfg.model = absolute(cfg.model) or cfg.model
    cfg.privacy.egress_log = absolute(cfg.privacy.egress_log)
    cfg.privacy.approvals_dir = absolute(cfg.privacy.approvals_dir) or str(base / "approved_apps")
    cfg.data.dicom_root = absolute(cfg.data.dicom_root)
    cfg.data.nifti_manifest = absolute(cfg.data.nifti_manifest)
    if cfg.data.reports is not None:
        cfg.data.reports.path = absolute(cfg.data.reports.path) or ""


def _validate(cfg: SiteConfig, path: Path, require_data: bool = True) -> None:
    def fail(key: str, problem: str) -> None:
        raise SiteConfigError(f"{path}: {key}: {problem}")

    if not cfg.site_id.strip():
        fail("site_id", "is required (a short name for this site, e.g. 'hospital-a').")
    if not cfg.cache_dir:
        fail("cache_dir", "is required (a folder where the manifest and preprocessed volumes go).")
    data = cfg.data
    if not data.dicom_root and not data.nifti_manifest:
        fail("data", "set data.dicom_root (a DICOM folder tree) and/or data.nifti_manifest (a CSV of NIfTI files).")
    if data.dicom_root and require_data and not Path(data.dicom_root).is_dir():
        fail("data.dicom_root", f"folder {data.dicom_root} does not exist.")
    if data.nifti_manifest and require_data and not Path(data.nifti_manifest).is_file():
        fail("data.nifti_manifest", f"file {data.nifti_manifest} does not exist.")
    if data.reports is not None:
        r = data.reports
        if not r.path:
            fail("data.reports.path", "is required when data.reports is given.")
        if require_data and not Path(r.path).is_file():
            fail("data.reports.path", f"file {r.path} does not exist.")
        if r.format not in ("auto", "csv", "jsonl"):
            fail("data.reports.format", f"should be auto, csv or jsonl, got {r.format!r}.")
        if r.key not in ("accession_number", "study_uid"):
            fail("data.reports.key", f"should be accession_number or study_uid, got {r.key!r}.")
    elif data.require_report:
        fail("data.reports", "no report export is configured; add data.reports, or set data.require_report: false "
                             "to ingest images for vision-only (MAE) training.")
    unknown = sorted(set(m.upper() for m in data.modalities) - {"CT", "MR"})
    if unknown or not data.modalities:
        fail("data.modalities", f"should list CT and/or MR, got {data.modalities}.")
    data.modalities = [m.upper() for m in data.modalities]
    if data.min_slices < 1:
        fail("data.min_slices", f"should be >= 1, got {data.min_slices}.")
    if data.max_series_voxels < 1:
        fail("data.max_series_voxels", f"should be >= 1 (voxels of the largest series ingested), got {data.max_series_voxels}.")
    lab = data.labeler
    if lab.kind not in ("rules", "llm"):
        fail("data.labeler.kind", f"should be rules or llm, got {lab.kind!r}.")
    if lab.kind == "llm" and not (lab.endpoint and lab.model):
        fail("data.labeler", "kind 'llm' needs endpoint (an OpenAI-compatible URL inside the hospital) and model.")
    if cfg.compute.batch_size < 1 or cfg.compute.grad_accum < 1 or cfg.compute.workers < 0:
        fail("compute", "batch_size and grad_accum should be >= 1 and workers >= 0.")
    if cfg.compute.processes < 1:
        fail("compute.processes", f"should be >= 1 (one process per GPU), got {cfg.compute.processes}.")
    if cfg.metrics.port is not None and not 0 < cfg.metrics.port < 65536:
        fail("metrics.port", f"should be a TCP port (1-65535) or null, got {cfg.metrics.port}.")
    priv = cfg.privacy
    if priv.allowed_fab_hashes is None:
        priv.allowed_fab_hashes = []
    if priv.allowed_fab_hashes != ANY_APP:
        if not isinstance(priv.allowed_fab_hashes, list):
            fail("privacy.allowed_fab_hashes", f"should be a list of FAB hashes or the word {ANY_APP!r}, "
                                               f"got {priv.allowed_fab_hashes!r}.")
        bad = [h for h in priv.allowed_fab_hashes if not re.fullmatch(r"[0-9a-fA-F]{64}", str(h))]
        if bad:
            fail("privacy.allowed_fab_hashes", f"{bad[0]!r} is not a FAB hash (64 hex characters; "
                                               "fedvlp-site approve PROJECT_DIR prints one and records it).")
    if priv.max_num_examples < 1:
        fail("privacy.max_num_examples", f"should be >= 1 (volumes one round may report), got {priv.max_num_examples}.")
    if not (priv.noise_multiplier > 0 and priv.max_grad_norm > 0 and 0 < priv.target_delta < 1
            and priv.max_epsilon >= 0):
        fail("privacy", "noise_multiplier and max_grad_norm should be > 0, target_delta in (0, 1), max_epsilon >= 0.")
    if cfg.text_model_dir and not Path(cfg.text_model_dir).is_dir():
        fail("text_model_dir", f"folder {cfg.text_model_dir} does not exist.")
    try:
        cfg.model_config()
    except (TypeError, ValueError, FileNotFoundError) as err:
        fail("model" if "preprocess" not in str(err) else "preprocess", str(err))


def site_config_to_dict(cfg: SiteConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
