"""Segmentation probe (the seeds' dense task): a light decoder on the frozen encoder, Dice per label.

The encoder's token grid ``[W, Dt, Ht, Wt]`` goes through a small UNETR decoder (MONAI blocks) with
UNETR's skip connection from the input volume. Only the decoder trains (briefly,
DiceCE loss) on the studies of a fixed split that have masks; Dice per label is measured on the
others. Masks are looked up as ``MASKS/<AccessionNumber>/findings.nii.gz`` (what ``fedvlp-site
synth`` writes) and put on the model grid with :func:`shared_models.volumes.preprocess_label_map`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared_models.cohort import SiteDataset, load_volume
from shared_models.volumes import preprocess_label_map

from .cohorts import resolve_cohort
from .metrics import fixed_split

log = logging.getLogger(__name__)


class ProbeDecoder(nn.Module):
    """Frozen token grid (+ the input volume) -> per-voxel logits, UNETR's decoder in small.

    As in UNETR, the decoder has a skip connection from the input volume (a MONAI UnetrBasicBlock at
    full resolution): the token grid says what is where at the token scale (80 mm for the tiny preset),
    the skip gives the decoder the edges to draw it with. The token grid is up-sampled by a
    UnetrPrUpBlock to half the volume's resolution, a UnetrUpBlock merges it with the skip, a
    UnetOutBlock gives the classes.

    Args:
        width: token width. classes: output classes (background included). upsamples: log2 of the
            volume size over the token grid size. channels: decoder channels. in_channels: channels of
            the volume the skip reads (the encoder's input windows, ``vision.input_windows``).
    """

    def __init__(self, width: int, classes: int, upsamples: int, channels: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

        common = {"spatial_dims": 3, "norm_name": "instance"}
        if upsamples >= 2:
            self.grid_up = UnetrPrUpBlock(in_channels=width, out_channels=channels, num_layer=upsamples - 2,
                                          kernel_size=3, stride=1, upsample_kernel_size=2, conv_block=True,
                                          res_block=True, **common)
        else:
            self.grid_up = nn.Conv3d(width, channels, kernel_size=1)
        self.skip = UnetrBasicBlock(in_channels=in_channels, out_channels=channels, kernel_size=3, stride=1, res_block=True, **common)
        self.merge = UnetrUpBlock(in_channels=channels, out_channels=channels, kernel_size=3, upsample_kernel_size=2,
                                  res_block=True, **common)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=channels, out_channels=classes)

    def forward(self, grid: torch.Tensor, volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        skip = self.skip(volume)
        up = self.grid_up(grid)
        up = F.interpolate(up, size=tuple(n // 2 for n in skip.shape[2:]), mode="trilinear", align_corners=False)
        logits = self.out(self.merge(up, skip))
        return logits if tuple(logits.shape[2:]) == tuple(size) else F.interpolate(
            logits, size=size, mode="trilinear", align_corners=False)


def _token_grid(model, volume: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        vis = model.vision(volume)
    b, n, w = vis.tokens.shape
    return vis.tokens.transpose(1, 2).reshape(b, w, *vis.grid)


def load_masked_studies(cohort: Path, model_cfg, masks_dir: Path, mask_file: str = "findings.nii.gz") -> list[dict[str, Any]]:
    """Studies of the cohort with a mask, each with its volume and the mask on the model grid."""
    import nibabel as nib

    studies = []
    for study in SiteDataset(cohort, model_cfg, augment=False).studies:
        accession = study["series"][0]["accession_number"]
        path = masks_dir / accession / mask_file
        if not path.is_file():
            continue
        image = nib.load(str(path))
        mask_shape = sorted(image.shape)
        # the mask was drawn on one series of the study: the one with the same voxel grid
        row = next((r for r in study["series"] if sorted(r["original_shape"]) == mask_shape), None)
        if row is None:
            continue
        labels = preprocess_label_map(np.asarray(image.dataobj), model_cfg, image.affine)
        volume = torch.from_numpy(np.asarray(load_volume(cohort, row["cache_file"]), dtype=np.float32))[None, None]
        studies.append({"uid": study["study_uid"], "volume": volume, "labels": labels})
    return studies


def segmentation_probe(model, cohort: str | Path, masks_dir: str | Path, label_names: list[str],
                       steps: int = 60, lr: float = 1e-3, seed: int = 0, mask_file: str = "findings.nii.gz",
                       prefix: str = "segmentation") -> dict[str, Any]:
    """Train a probe decoder on frozen features; ``<prefix>.mean_dice`` and Dice per label."""
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric

    cohort, masks_dir = resolve_cohort(cohort), Path(masks_dir)
    model.eval()
    studies = load_masked_studies(cohort, model.cfg, masks_dir, mask_file)
    if len(studies) < 2:
        return {f"{prefix}.mean_dice": None, f"{prefix}.studies": len(studies),
                f"{prefix}.note": f"fewer than 2 studies with {mask_file} under {masks_dir}"}
    present = sorted({int(v) for s in studies for v in torch.unique(s["labels"]).tolist()} - {0})
    compact = {label: i + 1 for i, label in enumerate(present)}  # label id -> class index
    lookup = torch.zeros(max(present) + 1, dtype=torch.long)
    for label, index in compact.items():
        lookup[label] = index
    train_idx, test_idx = fixed_split([s["uid"] for s in studies], test_fraction=0.3, seed=seed)
    if len(train_idx) == 0 or len(test_idx) == 0:
        train_idx, test_idx = np.arange(len(studies) - 1), np.array([len(studies) - 1])
    device = model.device
    feats = [_token_grid(model, s["volume"].to(device)) for s in studies]
    with torch.no_grad():  # the skip sees what the encoder sees: its input windows (vision.input_windows)
        volumes = [model.vision.windows(s["volume"].to(device)) for s in studies]
    size = tuple(studies[0]["labels"].shape)
    upsamples = max(1, int(round(math.log2(size[0] / feats[0].shape[2]))))
    torch.manual_seed(seed)
    decoder = ProbeDecoder(feats[0].shape[1], len(present) + 1, upsamples, in_channels=volumes[0].shape[1]).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(seed)
    decoder.train()
    for _ in range(steps):
        i = int(rng.choice(train_idx))
        target = lookup[studies[i]["labels"]][None, None].to(device)
        optimizer.zero_grad()
        loss_fn(decoder(feats[i], volumes[i], size), target).backward()
        optimizer.step()
    decoder.eval()
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    with torch.no_grad():
        for i in test_idx:
            pred = decoder(feats[int(i)], volumes[int(i)], size).argmax(1)
            n = len(present) + 1
            metric(F.one_hot(pred, n).permute(0, 4, 1, 2, 3).float(),
                   F.one_hot(lookup[studies[int(i)]["labels"]][None].to(device), n).permute(0, 4, 1, 2, 3).float())
    dice = metric.aggregate().cpu().numpy()  # [test studies, labels], NaN where the label is absent
    per_label = {}
    for label, index in compact.items():
        column = dice[:, index - 1]
        name = label_names[label - 1] if 0 < label <= len(label_names) else str(label)
        per_label[name] = float(np.nanmean(column)) if np.isfinite(column).any() else None
    defined = [v for v in per_label.values() if v is not None]
    return {f"{prefix}.mean_dice": float(np.mean(defined)) if defined else None,
            f"{prefix}.per_label": per_label, f"{prefix}.studies": len(studies),
            f"{prefix}.test_studies": int(len(test_idx))}
