"""The per-step cost of sample-level DP-SGD (opacus) against plain AdamW, per decomposable objective.

    .venv/bin/python benchmarks/dp_sgd_step.py                 # tiny preset, batch 4, this machine
    .venv/bin/python benchmarks/dp_sgd_step.py --device cuda --batch 8

For each of MAE, report generation, findings and the three together: the median wall time of one
step without DP (forward, backward, AdamW) and with DP-SGD (opacus GradSampleModule computing
per-sample gradients, DPOptimizer clipping them and adding noise, same AdamW), on the same batch, and
the slowdown. Only the parameters the objectives reach are trained in both, as a site's DP round does.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

import shared_models as sm
from objective_step_times import batch_for  # noqa: E402 - benchmarks/ is the script folder
from client.dp_sgd import trainable_for


def timed(step, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first step warms up and is dropped
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(weights: dict[str, float], batch_size: int, device: str, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = sm.build_model(sm.load_preset("tiny")).to(device)
    batch = batch_for(model.cfg, batch_size, device)
    trainable_for(model, batch, weights)
    params = [p for p in model.parameters() if p.requires_grad]
    plain_opt = torch.optim.AdamW(params, lr=1e-4)

    def plain():
        plain_opt.zero_grad(set_to_none=True)
        sm.training_losses(model, batch, weights, per_sample_mean=True)["total"].backward()
        plain_opt.step()

    plain_s = timed(plain, device, repeats)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    dp_opt = DPOptimizer(torch.optim.AdamW(params, lr=1e-4), noise_multiplier=1.0, max_grad_norm=1.0,
                         expected_batch_size=batch_size)

    def private():
        dp_opt.zero_grad(set_to_none=True)
        sm.training_losses(model, batch, weights, per_sample_mean=True)["total"].backward()
        dp_opt.step()

    dp_s = timed(private, device, repeats)
    gsm._close()
    return plain_s, dp_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"tiny preset, batch {args.batch}, device {args.device}, {torch.get_num_threads()} threads")
    print("| objectives | plain s/step | DP-SGD s/step | slowdown |\n|---|---|---|---|")
    for weights in ({"mae": 1.0}, {"report": 1.0}, {"findings": 1.0}, {"mae": 1.0, "report": 0.5, "findings": 1.0}):
        plain_s, dp_s = measure(weights, args.batch, args.device, args.repeats)
        print(f"| {' + '.join(weights)} | {plain_s:.3f} | {dp_s:.3f} | {dp_s / plain_s:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
