"""Step time of each objective and parameter counts of each preset.

    .venv/bin/python benchmarks/objective_step_times.py            # tiny preset, batch 4, this machine
    .venv/bin/python benchmarks/objective_step_times.py --batch 8 --device cuda

Prints, per objective, the median wall time of one AdamW step (forward, backward, update) of the tiny
preset as shipped (MiniLM text side), and the parameter count of every preset's full model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import shared_models as sm
from shared_models.objectives import osl_inputs
from shared_models.reports import findings_vector

REPORT = "FINDINGS: Small right pleural effusion. No lung nodule. The heart is enlarged. IMPRESSION: Effusion, cardiomegaly."
FINDINGS = {"Pleural effusion": True, "Lung nodule": False, "Cardiomegaly": True}


def batch_for(cfg: sm.ModelConfig, size: int, device: str) -> dict:
    labels, mask = findings_vector(FINDINGS, cfg.vocabulary)
    return {
        "volume": torch.randn(size, 1, *cfg.preprocess.size, device=device),
        "report": [REPORT] * size,
        "finding_labels": torch.tensor([labels] * size, device=device),
        "finding_mask": torch.tensor([mask] * size, device=device),
        **osl_inputs([FINDINGS] * size),
    }


def step_seconds(model, batch, weights, repeats: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(repeats + 1):  # the first step warms up and is dropped
        if batch["volume"].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sm.training_losses(model, batch, weights)["total"].backward()
        opt.step()
        if batch["volume"].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-param-counts", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = sm.load_preset("tiny")
    model = sm.build_model(cfg).to(args.device)
    batch = batch_for(cfg, args.batch, args.device)
    print(f"tiny preset, batch {args.batch}, {cfg.preprocess.size} volumes, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    for name in sm.OBJECTIVES:
        print(f"  {name:10s} {step_seconds(model, batch, {name: 1.0}, args.repeats):7.3f} s/step")
    print(f"  {'all six':10s} {step_seconds(model, batch, {n: 1.0 for n in sm.OBJECTIVES}, args.repeats):7.3f} s/step")
    if args.skip_param_counts:
        return
    print("parameters (millions): vision / text / report decoder / whole model")
    for name in sm.available_presets():
        m = sm.build_model(sm.load_preset(name))
        count = lambda module: sum(p.numel() for p in module.parameters()) / 1e6  # noqa: E731
        print(f"  {name:16s} {count(m.vision):7.1f} / {count(m.text):5.1f} / {count(m.report_decoder):5.1f} / {count(m):7.1f}")
        del m


if __name__ == "__main__":
    main()
