"""One rank of the 2-process DDP step in test_distributed.py (run by torchrun; not a test module).

    python -m torch.distributed.run --nproc-per-node 2 ddp_step_worker.py CASE.pt OUT_PREFIX

Loads the case (model config, initial state, global batch, weights), trains one SGD step on this
rank's half of the batch in DDP, and rank 0 saves the updated state and the losses.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shared_models import build_model, training_losses


def shard(batch: dict, rank: int, world: int) -> dict:
    """This rank's contiguous share of the samples, with the OSL pairs of those samples re-indexed."""
    size = batch["volume"].shape[0] // world
    lo, hi = rank * size, (rank + 1) * size
    out = {}
    for key, value in batch.items():
        if key.startswith("osl_"):
            continue
        out[key] = value[lo:hi]
    keep = [(i, int(v)) for i, v in enumerate(batch["osl_index"]) if lo <= int(v) < hi]
    out["osl_index"] = torch.tensor([v - lo for _, v in keep], dtype=torch.long)
    out["osl_positive"] = [batch["osl_positive"][i] for i, _ in keep]
    out["osl_negative"] = [batch["osl_negative"][i] for i, _ in keep]
    return out


def main(case_path: str, out_prefix: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    case = torch.load(case_path, weights_only=False)
    model = build_model(case["config"])
    model.load_state_dict(case["state"])
    model.eval()  # no dropout, as in the one-process step it is compared with
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=case["lr"])
    local = shard(case["batch"], dist.get_rank(), dist.get_world_size())
    losses = training_losses(ddp, local, case["weights"])
    losses["total"].backward()
    optimizer.step()
    values = {k: v.detach().clone() for k, v in losses.items()}
    for value in values.values():  # the ranks' average of each loss is the global batch's loss
        dist.all_reduce(value)
        value /= dist.get_world_size()
    if dist.get_rank() == 0:
        torch.save({"state": model.state_dict(), "losses": values}, out_prefix + ".pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
