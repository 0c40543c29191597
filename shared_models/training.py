"""The local training steps, shared by a site's federated round and the server's centralized baseline.

``run_steps`` trains a model for N optimizer steps on cached cohorts: vision-language batches,
alternating with vision-only MAE batches as COLIPRI does; bf16 autocast on GPU; gradient
accumulation; FedProx's proximal term when an anchor is given; gradient clipping. Data order,
augmentation, crops and masks are seeded, so a run is reproducible. The data path keeps a GPU fed:
memory-mapped float16 volumes, worker processes that prefetch, pinned memory and asynchronous copies.
Under torch.distributed (DDP over a site's GPUs) each rank reads its own share of every epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from . import distributed
from .cohort import Collate, SiteDataset
from .config import ModelConfig
from .objectives import training_losses
from .state import unwrap_model


@dataclass
class StepSettings:
    """Knobs of a stretch of local training (the server's round config and the site's compute section)."""

    steps: int
    lr: float
    weights: dict[str, float]
    batch_size: int = 4  # per process (GPU)
    grad_accum: int = 1
    mae_alternate: bool = True
    proximal_mu: float = 0.0
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    amp: bool = True  # bf16 autocast on GPU
    workers: int = 0  # DataLoader worker processes
    seed: int = 0
    channels_last: bool = False  # volumes in channels_last_3d memory format (conv encoders on GPU)
    prefetch: int = 4  # batches each worker prepares ahead


ProgressHook = Callable[[int, dict[str, float]], None]
"""Called after each optimizer step with (steps done, running metrics: mean losses, throughput so far)."""


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
    """Endless batches; under torch.distributed each rank draws its own share of every epoch."""
    ranks, me = distributed.world_size(), distributed.rank()
    sampler = None
    if ranks > 1:
        if len(dataset) < ranks:
            raise ValueError(f"{len(dataset)} studies cannot be shared among {ranks} processes; "
                             "lower compute.processes or ingest more studies.")
        sampler = DistributedSampler(dataset, num_replicas=ranks, rank=me, shuffle=True, seed=seed % 2**31,
                                     drop_last=True)
    per_rank = len(dataset) // ranks
    workers = s.workers
    loader = DataLoader(dataset, batch_size=min(s.batch_size, per_rank), shuffle=sampler is None, sampler=sampler,
                        drop_last=True, collate_fn=Collate(model_cfg, seed=seed + me, augment=True),
                        generator=torch.Generator().manual_seed(seed), num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        prefetch_factor=s.prefetch if workers > 0 else None)
    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """The batch's tensors on ``device`` (asynchronously from pinned memory); texts stay as they are."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and key in ("volume", "views") and value.dim() == 5:
                value = value.contiguous(memory_format=torch.channels_last_3d)
        moved[key] = value
    return moved


def make_optimizer(model: torch.nn.Module, s: StepSettings, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on GPU); weight decay on matrices and kernels (``p.dim() >= 2``) only; the text
    tower's parameters at ``text.lr_scale`` times the learning rate (``run_steps`` applies ``lr_scale``)."""
    core = unwrap_model(model)
    text_ids = {id(p) for p in core.text.parameters()} if hasattr(core, "text") else set()
    text_scale = core.cfg.text.lr_scale if hasattr(core, "cfg") else 1.0
    groups = []
    for in_text in (False, True):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in text_ids) == in_text]
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "weight_decay": s.weight_decay if decay else 0.0,
                               "lr_scale": text_scale if in_text else 1.0})
    return torch.optim.AdamW(groups, lr=s.lr, fused=device.type == "cuda")


def _reduce(metrics: dict[str, float], sums: tuple[str, ...], maxima: tuple[str, ...]) -> dict[str, float]:
    """Across ranks: ``sums`` are added, ``maxima`` take the largest, the rest are averaged."""
    if not distributed.active():
        return metrics
    import torch.distributed as dist

    names = sorted(metrics)
    values = torch.tensor([metrics[k] for k in names], dtype=torch.float64)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total, largest = values.to(device), values.clone().to(device)
    dist.all_reduce(total)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    ranks = distributed.world_size()
    return {k: float(largest[i] if k in maxima else total[i] if k in sums else total[i] / ranks)
            for i, k in enumerate(names)}


def run_steps(model, cache_dirs: Sequence[str | Path], s: StepSettings, optimizer: torch.optim.Optimizer,
              device: torch.device, anchor: list[torch.Tensor] | None = None,
              progress: ProgressHook | None = None) -> dict[str, float]:
    """Train ``s.steps`` optimizer steps; returns mean losses per objective and throughput figures.

    ``model`` may be wrapped in DDP (one process per GPU of the site): each rank then trains on its
    own share of the data, the losses are those of the global batch (:mod:`shared_models.distributed`)
    and the returned metrics cover all ranks (``volumes`` summed, throughput of the whole site).
    """
    started = time.perf_counter()
    model_cfg = unwrap_model(model).cfg
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
        group["lr"] = s.lr * group.get("lr_scale", 1.0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and s.amp else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    volumes, data_wait = 0, 0.0
    model.train()
    for step in range(s.steps):
        use_mae = (alternate and step % 2 == 1) or "vl" not in streams
        stream, step_weights = (streams["mae"], {"mae": weights["mae"]}) if use_mae else (streams["vl"], vl_weights)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(s.grad_accum):
            t0 = time.perf_counter()
            batch = to_device(next(stream), device, s.channels_last)
            data_wait += time.perf_counter() - t0
            # DDP: all-reduce the gradients once per optimizer step, not per micro-batch
            sync = model.no_sync() if micro < s.grad_accum - 1 and hasattr(model, "no_sync") else contextlib.nullcontext()
            with sync:
                with amp:
                    losses = training_losses(model, batch, step_weights)
                loss = losses["total"]
                if anchor is not None and s.proximal_mu > 0:
                    loss = loss + s.proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                (loss / s.grad_accum).backward()
            # scans seen: every real scan of an HLIP study, else one volume per study
            volumes += int(batch["study_mask"].sum()) if "study_mask" in batch else batch["volume"].shape[0]
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
                counts[name] = counts.get(name, 0) + 1
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        optimizer.step()
        if progress is not None:
            progress(step + 1, _summary(sums, counts, volumes, data_wait, time.perf_counter() - started))
    metrics = _summary(sums, counts, volumes, data_wait, time.perf_counter() - started)
    metrics["local-steps"] = float(s.steps)
    if device.type == "cuda":
        metrics["gpu-memory-peak-bytes"] = float(torch.cuda.max_memory_allocated(device))
    metrics = _reduce(metrics, sums=("volumes",), maxima=("train-seconds", "gpu-memory-peak-bytes", "local-steps"))
    metrics["volumes-per-second"] = metrics["volumes"] / metrics["train-seconds"]
    return metrics


def _summary(sums: dict[str, float], counts: dict[str, int], volumes: int, data_wait: float,
             seconds: float) -> dict[str, float]:
    metrics = {f"loss.{name}": total / counts[name] for name, total in sums.items() if name != "total"}
    if "total" in sums:
        metrics["train-loss"] = sums["total"] / counts["total"]
    metrics.update({
        "train-seconds": seconds,
        "volumes-per-second": volumes / seconds if seconds > 0 else 0.0,
        "data-wait-fraction": data_wait / seconds if seconds > 0 else 0.0,
        "volumes": float(volumes),
    })
    return metrics
