"""The local training steps, shared by a site's federated round and the server's centralized baseline.

``run_steps`` trains a model for N optimizer steps on cached cohorts: vision-language batches,
alternating with vision-only MAE batches as COLIPRI does; bf16 autocast on GPU; gradient
accumulation; FedProx's proximal term when an anchor is given; gradient clipping. Data order,
augmentation, crops and masks are seeded, so a run is reproducible.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader

from .cohort import Collate, SiteDataset
from .config import ModelConfig
from .objectives import training_losses


@dataclass
class StepSettings:
    """Knobs of a stretch of local training (the server's round config and the site's compute section)."""

    steps: int
    lr: float
    weights: dict[str, float]
    batch_size: int = 4
    grad_accum: int = 1
    mae_alternate: bool = True
    proximal_mu: float = 0.0
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    amp: bool = True
    workers: int = 0
    seed: int = 0


def derive_seed(*parts: Any) -> int:
    """A stable 60-bit seed from any parts (site id, round, purpose...)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


class _Pooled(ConcatDataset):
    """Several cohorts as one dataset; ``set_epoch`` reaches each (their augmentation depends on it)."""

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_epoch(epoch)


def cohort_dataset(cache_dirs: Sequence[str | Path], model_cfg: ModelConfig, with_reports: bool, seed: int):
    datasets = [SiteDataset(d, model_cfg, with_reports=with_reports, seed=seed) for d in cache_dirs]
    return datasets[0] if len(datasets) == 1 else _Pooled(datasets)


def _stream(dataset, model_cfg: ModelConfig, s: StepSettings, seed: int, device: torch.device) -> Iterator[dict]:
    loader = DataLoader(dataset, batch_size=min(s.batch_size, len(dataset)), shuffle=True, drop_last=True,
                        collate_fn=Collate(model_cfg, seed=seed), generator=torch.Generator().manual_seed(seed),
                        num_workers=s.workers, pin_memory=device.type == "cuda")
    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        yield from loader


def make_optimizer(model: torch.nn.Module, s: StepSettings, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and kernels (``p.dim() >= 2``) only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, fused=device.type == "cuda")


def run_steps(model, cache_dirs: Sequence[str | Path], s: StepSettings, optimizer: torch.optim.Optimizer,
              device: torch.device, anchor: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Train ``s.steps`` optimizer steps; returns mean losses per objective and throughput figures."""
    started = time.perf_counter()
    model_cfg = model.cfg
    weights = {k: w for k, w in s.weights.items() if w > 0}
    alternate = s.mae_alternate and weights.get("mae", 0) > 0 and len(weights) > 1
    vl_weights = {k: w for k, w in weights.items() if k != "mae"} if alternate else weights
    streams = {}
    if vl_weights:
        streams["vl"] = _stream(cohort_dataset(cache_dirs, model_cfg, True, s.seed), model_cfg, s, s.seed, device)
    if alternate or weights.keys() == {"mae"}:
        seed = s.seed + 1
        streams["mae"] = _stream(cohort_dataset(cache_dirs, model_cfg, False, seed), model_cfg, s, seed, device)
    for group in optimizer.param_groups:
        group["lr"] = s.lr
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and s.amp else contextlib.nullcontext()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    volumes, data_wait = 0, 0.0
    model.train()
    for step in range(s.steps):
        use_mae = (alternate and step % 2 == 1) or "vl" not in streams
        stream, step_weights = (streams["mae"], {"mae": weights["mae"]}) if use_mae else (streams["vl"], vl_weights)
        optimizer.zero_grad(set_to_none=True)
        for _ in range(s.grad_accum):
            t0 = time.perf_counter()
            batch = next(stream)
            data_wait += time.perf_counter() - t0
            with amp:
                losses = training_losses(model, batch, step_weights)
            loss = losses["total"]
            if anchor is not None and s.proximal_mu > 0:
                loss = loss + s.proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            (loss / s.grad_accum).backward()
            volumes += batch["volume"].shape[0]
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
                counts[name] = counts.get(name, 0) + 1
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        optimizer.step()
    seconds = time.perf_counter() - started
    metrics = {f"loss.{name}": total / counts[name] for name, total in sums.items() if name != "total"}
    metrics.update({
        "train-loss": sums["total"] / counts["total"],
        "local-steps": float(s.steps),
        "train-seconds": seconds,
        "volumes-per-second": volumes / seconds,
        "data-wait-fraction": data_wait / seconds,
        "volumes": float(volumes),
    })
    return metrics
