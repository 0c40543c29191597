"""A site with several GPUs: one round of local training as a torch.distributed (DDP) job.

The ClientApp process stays the only one that talks to Flower. With ``compute.processes: N`` in the
site YAML it writes the global arrays and the round's config to a folder on the site's disk, runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m client.ddp FOLDER

(torchrun: one process per GPU, NCCL on GPUs, gloo on CPU), waits, and replies once with rank 0's
weights and the metrics of all ranks. Each rank trains on its own share of every epoch; contrastive
negatives are all-gathered across ranks (:mod:`shared_models.distributed`), so N processes of batch b
train as one process of batch N*b. The folder is removed after the round; the workers' log stays at
the site (``train_state/RUN/ddp_round_NNNN.log``) and only the exception type reaches the server.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .site_config import SiteConfig, load_site_config
from .train import RoundConfig, RoundResult, local_round

log = logging.getLogger(__name__)
GLOBAL, RESULT, METRICS, SPEC = "global.safetensors", "result.safetensors", "metrics.json", "round.json"


class DistributedRoundError(RuntimeError):
    """The site's multi-process round failed; its log is named in the message (kept at the site)."""


def _device_for(site_cfg: SiteConfig, local_rank: int) -> torch.device:
    wanted = site_cfg.compute.device
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if torch.cuda.device_count() < site_cfg.compute.processes:
        raise DistributedRoundError(f"{site_cfg.source}: compute.processes is {site_cfg.compute.processes} but "
                                    f"{torch.cuda.device_count()} GPUs are visible; lower it or set CUDA_VISIBLE_DEVICES.")
    return torch.device("cuda", local_rank)


def train_round_ddp(site_cfg: SiteConfig, global_arrays: dict[str, np.ndarray], rc: RoundConfig) -> RoundResult:
    """Run the round as ``compute.processes`` ranks and return rank 0's weights and the site's metrics."""
    from safetensors.numpy import load_file, save_file

    if site_cfg.privacy.sample_dp:
        raise DistributedRoundError(f"{site_cfg.source}: privacy.sample_dp (DP-SGD) runs in one process; set "
                                    "compute.processes: 1 for a DP-SGD site.")
    state_dir = Path(site_cfg.cache_dir) / "train_state" / rc.run_key
    folder = state_dir / f"ddp_round_{rc.server_round:04d}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in global_arrays.items()}, str(folder / GLOBAL))
        (folder / SPEC).write_text(json.dumps({"site_config": site_cfg.source, "round": rc.to_flat()}))
        log_path = state_dir / f"ddp_round_{rc.server_round:04d}.log"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                   "--nproc-per-node", str(site_cfg.compute.processes), "-m", "client.ddp", str(folder)]
        # the ranks import this very app: from the FAB folder Flower installed it in, not from site-packages
        app_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "OMP_NUM_THREADS": str(site_cfg.compute.threads or 1),
               "PYTHONPATH": os.pathsep.join(filter(None, [app_root, os.environ.get("PYTHONPATH")]))}
        log.info("round %d: local training on %d processes (log: %s)", rc.server_round, site_cfg.compute.processes,
                 log_path)
        with open(log_path, "wb") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
        if done.returncode != 0 or not (folder / METRICS).is_file():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise DistributedRoundError(f"the {site_cfg.compute.processes}-process round failed (exit "
                                        f"{done.returncode}); see {log_path}: " + " | ".join(tail))
        arrays = load_file(str(folder / RESULT))
        result = json.loads((folder / METRICS).read_text())
        return RoundResult(arrays={k: arrays[k] for k in global_arrays}, num_examples=result["num_examples"],
                           metrics=result["metrics"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def worker(folder: Path) -> None:
    """One rank (started by torchrun): train the round, rank 0 writes the result."""
    import torch.distributed as dist
    from safetensors.numpy import load_file, save_file

    spec = json.loads((folder / SPEC).read_text())
    site_cfg = load_site_config(spec["site_config"])
    rc = RoundConfig.from_flat(spec["round"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _device_for(site_cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        result = local_round(site_cfg, load_file(str(folder / GLOBAL)), rc, device)
        if dist.get_rank() == 0:
            save_file({k: np.ascontiguousarray(v) for k, v in result.arrays.items()}, str(folder / RESULT))
            metrics = {"num_examples": result.num_examples, "metrics": result.metrics}
            (folder / (METRICS + ".tmp")).write_text(json.dumps(metrics))
            (folder / (METRICS + ".tmp")).replace(folder / METRICS)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s rank%(process)d %(name)s: %(message)s")
    worker(Path(sys.argv[1]))
