"""One round of local training at a site: global weights in, updated weights and aggregate metrics out.

What a round does (the server's per-round config decides the knobs):
- builds the federation's model (the preset the server names, with this site's text-model folder),
  checks that the site's cache was preprocessed for it, loads the global arrays, and keeps a copy of
  them for FedProx's proximal term;
- runs ``local_steps`` optimizer steps (``shared_models.training.run_steps``: vision-language
  batches alternating with vision-only MAE batches, bf16 autocast on GPU, gradient accumulation);
- keeps AdamW's moments between rounds on the site's disk (each Flower message is a fresh process),
  saved per round so that a re-run round starts from the same state;
- refuses to return non-finite weights.
Everything random is seeded from (run seed, round, site), so a round is reproducible.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_models import arrays_digest, build_model, frozen_keys, load_arrays, model_to_arrays
from shared_models.objectives import check_weights
from shared_models.training import StepSettings, derive_seed, make_optimizer, run_steps

from .metrics import RoundProgress
from .site_config import SiteConfig

log = logging.getLogger(__name__)


class NonFiniteUpdate(RuntimeError):
    """Local training produced NaN or infinite weights; nothing is sent."""


@dataclass
class RoundConfig:
    """The per-round settings the server sends (flattened into a Flower ConfigRecord)."""

    server_round: int
    preset: str
    local_steps: int
    lr: float
    weights: dict[str, float]
    run_key: str = "default"
    seed: int = 0
    mae_alternate: bool = True
    proximal_mu: float = 0.0
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    uniform_weights: bool = False  # DP-FedAvg: every site counts as one example
    frozen_digest: str = ""  # SHA-256 of the arrays that stay at the sites (shared_models.arrays_digest)

    def to_flat(self) -> dict[str, Any]:
        flat = {k: v for k, v in self.__dict__.items() if k != "weights"}
        flat.update({f"weight.{name}": float(w) for name, w in self.weights.items()})
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "RoundConfig":
        weights = {k.split(".", 1)[1]: float(v) for k, v in flat.items() if k.startswith("weight.")}
        known = {f for f in cls.__dataclass_fields__ if f != "weights"}
        values = {k: v for k, v in flat.items() if k in known}
        return cls(weights=check_weights(weights), **values)


@dataclass
class RoundResult:
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _state_file(site_cfg: SiteConfig, rc: RoundConfig, server_round: int) -> Path:
    return Path(site_cfg.cache_dir) / "train_state" / rc.run_key / f"optimizer_round{server_round:04d}.pt"


def _load_optimizer_state(opt: torch.optim.Optimizer, path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        opt.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True
    except (RuntimeError, ValueError, KeyError) as err:  # another model shape: start fresh, say so
        log.warning("ignoring optimizer state %s (%s)", path, err)
        return False


def _save_optimizer_state(opt: torch.optim.Optimizer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(opt.state_dict(), tmp)
    tmp.replace(path)
    for old in path.parent.glob("optimizer_round*.pt"):  # keep this round's and the previous one
        if old.name < f"optimizer_round{max(0, int(path.stem[-4:]) - 1):04d}.pt":
            old.unlink(missing_ok=True)


def check_cache_matches(site_cfg: SiteConfig, model_cfg) -> None:
    """The site's cache must be preprocessed as the federation's model expects."""
    from .ingest.cache import INGEST_REPORT
    from .ingest.pipeline import preprocess_fingerprint, unfinished_ingest

    report = Path(site_cfg.cache_dir) / INGEST_REPORT
    if not report.is_file():
        raise FileNotFoundError(f"site {site_cfg.site_id}: no ingested cache in {site_cfg.cache_dir}; "
                                f"run fedvlp-site ingest --config {site_cfg.source}")
    recorded = json.loads(report.read_text())
    if (unfinished := unfinished_ingest(recorded)) is not None:
        raise ValueError(f"site {site_cfg.site_id}: {unfinished} ({site_cfg.cache_dir}).")
    if recorded.get("preprocess_fingerprint") != preprocess_fingerprint(model_cfg.preprocess):
        raise ValueError(
            f"site {site_cfg.site_id}: the cache in {site_cfg.cache_dir} was preprocessed for other settings than "
            f"the federation's model ({model_cfg.name}: {model_cfg.preprocess.size} at {model_cfg.preprocess.spacing} mm); "
            f"set model: {model_cfg.name} in {site_cfg.source} and re-run fedvlp-site ingest."
        )


class FrozenPartMismatch(ValueError):
    """This site's copy of the federation's frozen arrays (a locked text tower) differs from the server's."""


def with_frozen_part(model, global_arrays: dict[str, np.ndarray], digest: str, site_cfg: SiteConfig) -> dict[str, np.ndarray]:
    """The server's arrays completed with this site's own frozen arrays, which must match ``digest``.

    Arrays that cannot train do not travel: the site builds them (the locked text tower from its local
    model folder) and checks that they are byte for byte the federation's before training on them.
    """
    frozen = [k for k in frozen_keys(model) if k not in global_arrays]
    if not frozen:
        return global_arrays
    local = model_to_arrays(model)
    if digest and arrays_digest(local, frozen) != digest:
        raise FrozenPartMismatch(
            f"site {site_cfg.site_id}: the frozen part of the model built here ({len(frozen)} arrays, e.g. {frozen[0]}) "
            f"differs from the federation's; the text encoder in text.model_dir must be the one the federation "
            f"uses. Check the model section of {site_cfg.source} against the federation's preset.")
    return {**{k: local[k] for k in frozen}, **global_arrays}


def _dp_round(model, site_cfg: SiteConfig, rc: RoundConfig, steps: StepSettings, device: torch.device):
    """A round of sample-level DP-SGD (:mod:`client.dp_sgd`): (metrics, optimizer, optimizer resumed)."""
    from shared_models.cohort import Collate
    from shared_models.training import cohort_dataset

    from .dp_sgd import SampleDPError, check_objectives, run_dp_steps, trainable_for

    weights = check_objectives(rc.weights, site_cfg.source)
    if rc.proximal_mu > 0:
        raise SampleDPError(f"{site_cfg.source}: privacy.sample_dp does not combine with FedProx's proximal term; "
                            "use strategy fedavg for this run.")
    dataset = cohort_dataset([site_cfg.cache_dir], model.cfg, bool(set(weights) & {"report", "findings"}), steps.seed)
    probe = Collate(model.cfg, seed=steps.seed)([dataset[i] for i in range(min(2, len(dataset)))])
    trainable_for(model, probe, weights)
    opt = make_optimizer(model, steps, device)
    resumed = _load_optimizer_state(opt, _state_file(site_cfg, rc, rc.server_round - 1))
    state_dir = Path(site_cfg.cache_dir) / "train_state" / rc.run_key
    metrics = run_dp_steps(model, site_cfg.cache_dir, steps, opt, device, site_cfg.privacy, state_dir,
                           rc.server_round, site_cfg.source)
    for p in model.parameters():
        p.requires_grad_(True)
    return metrics, opt, resumed


def apply_compute_options(model, site_cfg: SiteConfig, device: torch.device):
    """The site's GPU options: channels-last-3d conv weights, ``torch.compile`` of the vision encoder."""
    compute = site_cfg.compute
    if compute.channels_last:
        model.to(memory_format=torch.channels_last_3d)  # only 5-D tensors (Conv3d kernels) change layout
    if compute.compile:
        # in place (Module.compile): the state-dict keys stay those of the bare model
        vision = model.vision
        for block in getattr(vision, "blocks", None) or [vision]:
            block.compile()
    return model


def local_round(site_cfg: SiteConfig, global_arrays: dict[str, np.ndarray], rc: RoundConfig,
                device: torch.device | None = None) -> RoundResult:
    """One round of local training in this process, or as one rank of the site's DDP group.

    Under torch.distributed every rank trains its share and ends with the same weights; rank 0 alone
    keeps the optimizer state and writes the metrics snapshot.
    """
    from shared_models import distributed

    device = device or pick_device(site_cfg.compute.device)
    if site_cfg.compute.threads:
        torch.set_num_threads(site_cfg.compute.threads)
    me = distributed.rank()
    torch.manual_seed(derive_seed(rc.seed, rc.server_round, site_cfg.site_id, "torch", me))
    model_cfg = site_cfg.model_config(preset=rc.preset).replace(objectives=rc.weights)
    check_cache_matches(site_cfg, model_cfg)
    model = build_model(model_cfg)
    load_arrays(model, with_frozen_part(model, global_arrays, rc.frozen_digest, site_cfg))
    model.to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls outside autocast (the losses) use TF32
        torch.backends.cudnn.allow_tf32 = True
    anchor = [p.detach().clone() for p in model.parameters()] if rc.proximal_mu > 0 else None
    steps = StepSettings(
        steps=rc.local_steps, lr=rc.lr, weights=rc.weights, batch_size=site_cfg.compute.batch_size,
        grad_accum=site_cfg.compute.grad_accum, mae_alternate=rc.mae_alternate, proximal_mu=rc.proximal_mu,
        weight_decay=rc.weight_decay, max_grad_norm=rc.max_grad_norm, amp=site_cfg.compute.amp,
        workers=site_cfg.compute.workers if device.type == "cuda" else 0,
        seed=derive_seed(rc.seed, rc.server_round, site_cfg.site_id, "data"),
        channels_last=site_cfg.compute.channels_last,
    )
    progress = RoundProgress(site_cfg.cache_dir, rc.server_round, rc.local_steps) if me == 0 else None
    if site_cfg.privacy.sample_dp:
        metrics, opt, resumed = _dp_round(model, site_cfg, rc, steps, device)
    else:
        opt = make_optimizer(model, steps, device)
        resumed = _load_optimizer_state(opt, _state_file(site_cfg, rc, rc.server_round - 1))
        apply_compute_options(model, site_cfg, device)
        trained = model
        if distributed.active():
            from torch.nn.parallel import DistributedDataParallel

            # objectives alternate (MAE batches leave the text side unused): let DDP find unused parameters
            trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=True)
        metrics = run_steps(trained, [site_cfg.cache_dir], steps, opt, device, anchor,
                            progress=progress.step if progress else None)
    arrays = {k: v for k, v in model_to_arrays(model).items() if k in global_arrays}  # what the server sent
    bad = [k for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()]
    if bad:
        raise NonFiniteUpdate(f"local training produced non-finite weights in {len(bad)} arrays (e.g. {bad[0]}); "
                              "nothing was sent. Lower the learning rate or check the site's data with fedvlp-site check.")
    if me == 0:
        _save_optimizer_state(opt, _state_file(site_cfg, rc, rc.server_round))
    metrics["optimizer-resumed"] = float(resumed)
    if progress is not None:
        progress.finish(metrics)
    metrics.pop("gpu-memory-peak-bytes", None)  # for the site's own metrics only: not sent
    num_examples = 1 if rc.uniform_weights else int(metrics["volumes"])
    return RoundResult(arrays=arrays, num_examples=num_examples, metrics=metrics)


def train_round(site_cfg: SiteConfig, global_arrays: dict[str, np.ndarray], rc: RoundConfig) -> RoundResult:
    """Run one round of local training and return the updated arrays and whitelisted metrics.

    With ``compute.processes > 1`` the round runs as that many processes, one per GPU
    (:mod:`client.ddp`), and rank 0's weights are returned.
    """
    try:
        if site_cfg.compute.processes > 1:
            from .ddp import train_round_ddp

            return train_round_ddp(site_cfg, global_arrays, rc)
        return local_round(site_cfg, global_arrays, rc)
    except BaseException:
        RoundProgress.mark_failed(site_cfg.cache_dir, rc.server_round)
        raise
