"""Data parallelism across the GPUs of one site (torch.distributed, DDP): exact losses over the global batch.

DDP averages the ranks' gradients. For that average to be the gradient of the loss over the global
batch (all ranks' samples), each objective is computed as follows on rank r of W:

- CLIP / SigLIP (batch-coupled: every volume is contrasted with every report): the embeddings of all
  ranks are all-gathered *with* their gradient (``torch.distributed.nn.functional.all_gather``, as
  open_clip's ``gather_with_grad``) and every rank computes the same global loss. The gather's
  backward sums the W ranks' identical gradients, which DDP's average divides by W again: exact.
- Multi-view (T3D): the views of a rank are classified among the global batch's prototypes, gathered
  without gradient (they are gradient-stopped anyway), this rank's block first so the local targets
  stay ``0..b-1`` (a softmax does not care about the order of its classes).
- Means over items (OSL pairs, MAE's masked patches, report tokens, labelled findings, or samples):
  ``local_mean * local_count / global_count * W``; the ranks' average is then the global mean.

So a step on W ranks with b samples each equals a step of one process on the W*b samples (a test
checks it with the gloo backend on CPU). Nothing here runs unless a process group is initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def active() -> bool:
    """True when this process is one rank of an initialised process group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, differentiable (rank order). Shapes may differ in dim 0."""
    if not active():
        return x
    from torch.distributed.nn.functional import all_gather

    sizes = all_sizes(x.shape[0])
    if len(set(sizes)) == 1:
        return torch.cat(all_gather(x), dim=0)
    # all_gather needs equal shapes: pad to the largest, then drop the padding
    padded = torch.cat([x, x.new_zeros(max(sizes) - x.shape[0], *x.shape[1:])]) if x.shape[0] < max(sizes) else x
    return torch.cat([part[:n] for part, n in zip(all_gather(padded), sizes)], dim=0)


def gather_local_first(x: Tensor) -> Tensor:
    """All ranks' ``x`` (no gradient) concatenated with this rank's block first, then the others in rank order."""
    if not active():
        return x
    with torch.no_grad():
        sizes = all_sizes(x.shape[0])
        padded = torch.cat([x, x.new_zeros(max(sizes) - x.shape[0], *x.shape[1:])]) if x.shape[0] < max(sizes) else x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        me = rank()
        ordered = [parts[me][: sizes[me]]] + [p[:n] for i, (p, n) in enumerate(zip(parts, sizes)) if i != me]
        return torch.cat(ordered, dim=0)


def _comm_device() -> torch.device:
    """Where collectives of small tensors run: the current GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sizes(n: int) -> list[int]:
    """Every rank's ``n`` (rank order)."""
    if not active():
        return [int(n)]
    mine = torch.tensor([int(n)], dtype=torch.int64, device=_comm_device())
    sizes = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(sizes, mine)
    return [int(s.item()) for s in sizes]


def global_sum(value: Tensor | float) -> Tensor:
    """The sum over ranks of a (detached) scalar, as a float64 CPU tensor."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if active():
        t = t.to(_comm_device())
        dist.all_reduce(t)
    return t.cpu()


def rescale_mean(local_mean: Tensor, local_count: Tensor | float) -> Tensor:
    """A local mean over ``local_count`` items, rescaled so that DDP's average over ranks is the global mean."""
    if not active():
        return local_mean
    total = float(global_sum(local_count))
    if total == 0:
        return local_mean * 0.0
    return local_mean * (float(local_count) * world_size() / total)
