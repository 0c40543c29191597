"""The vision-only ceiling: how well a preset's vision encoder can learn the findings at all, given the labels.

    .venv/bin/python benchmarks/findings_ceiling.py --cohort runs/demo/data          # the demo's caches
    .venv/bin/python benchmarks/findings_ceiling.py --cohort DIR --steps 600 --batch 16 \
        --vision '{"conv_stem": [16]}' --lr 3e-3

Trains the preset's vision encoder, attention pool and findings head with the labeler's findings as
supervised targets (binary cross-entropy, AdamW, gradient clipping at 1.0: the recipe's settings), on the
training sites' caches (``COHORT/site-*/cache``) pooled, and prints held-out macro AUROC on
``COHORT/central/cache`` every ``--every`` steps, the training AUROC at the end and the per-finding AUROC.
No text tower, no other objective: an upper bound on what zero-shot or the findings head can reach from
the same encoder, data and steps. Volumes are held in memory (about 1 MB each at 64^3).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shared_models.cohort import SiteDataset
from shared_models.config import load_preset
from shared_models.heads import AttentionPool
from server.evaluation.classification import per_finding_auroc
from shared_models.vision import build_vision_encoder


def load_cache(cache: Path, cfg, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ds = SiteDataset(cache, cfg, with_reports=True, augment=False)
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it["volume"] for it in items])
    y = torch.tensor([[1.0 if it["findings"].get(n) else 0.0 for n in names] for it in items])
    return x, y


def macro_auroc(y: np.ndarray, p: np.ndarray, names: list[str], n_boot: int = 0) -> dict:
    """The evaluation's per-finding and macro AUROC (bootstrap CI with ``n_boot``); undefined findings skipped."""
    return per_finding_auroc({n: y[:, j] for j, n in enumerate(names)}, {n: p[:, j] for j, n in enumerate(names)},
                             n_boot=n_boot)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", required=True, help="folder with site-*/cache and central/cache (the demo's OUT/data)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vision", default="{}", help="JSON overrides of the preset's vision section")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=90)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_preset(args.preset)
    vision = cfg.replace(vision=json.loads(args.vision)).vision  # validated as a preset's vision section
    root = Path(args.cohort)
    sites = sorted(p.parent for p in root.glob("site-*/cache"))
    if not sites or not (root / "central" / "cache").is_dir():
        raise SystemExit(f"{root} needs site-*/cache and central/cache folders (run make demo, or server.demo.prepare_cohorts).")
    probe = SiteDataset(sites[0] / "cache", cfg, with_reports=True, augment=False)
    names = sorted({n for s in probe.studies for n in s["findings"]})  # the findings the labeler reads
    train = [load_cache(s / "cache", cfg, names) for s in sites]
    x_tr, y_tr = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    x_te, y_te = load_cache(root / "central" / "cache", cfg, names)
    torch.manual_seed(args.seed)
    encoder = build_vision_encoder(vision, (cfg.preprocess.norm_mean, cfg.preprocess.norm_std))
    pool = AttentionPool(vision.width, cfg.pool_heads)
    head = torch.nn.Linear(vision.width, len(names))
    params = [*encoder.parameters(), *pool.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)

    def predict(x: torch.Tensor) -> np.ndarray:
        encoder.eval()
        with torch.no_grad():
            out = []
            for i in range(0, len(x), 8):
                vis = encoder(x[i:i + 8])
                out.append(torch.sigmoid(head(pool(vis.tokens, vis.valid))))
        encoder.train()
        return torch.cat(out).numpy()

    print(f"{args.preset} vision {json.loads(args.vision) or 'as shipped'}; {len(x_tr)} training studies from "
          f"{len(sites)} sites, {len(x_te)} held out; batch {args.batch}, lr {args.lr}")
    g = torch.Generator().manual_seed(args.seed + 1)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_tr), (args.batch,), generator=g)
        vis = encoder(x_tr[idx])
        loss = F.binary_cross_entropy_with_logits(head(pool(vis.tokens, vis.valid)), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            held = macro_auroc(y_te.numpy(), predict(x_te), names)["macro_auroc"]
            print(f"step {step:5d}  {time.perf_counter() - started:7.1f} s  loss {float(loss.detach()):.3f}  "
                  f"held-out macro AUROC {held:.3f}")
    seen = macro_auroc(y_tr.numpy(), predict(x_tr), names)["macro_auroc"]
    held = macro_auroc(y_te.numpy(), predict(x_te), names, n_boot=1000)
    low, high = held["macro_ci"]
    print(f"training macro AUROC {seen:.3f}, held-out {held['macro_auroc']:.3f} (95% CI {low:.3f}-{high:.3f}); "
          f"{(time.perf_counter() - started) / args.steps:.3f} s/step")
    defined = {k: v for k, v in held["per_finding"].items() if v["auroc"] is not None}
    for name, v in sorted(defined.items(), key=lambda kv: -kv[1]["auroc"]):
        print(f"  {name:32s} {v['auroc']:.3f} ({v['ci_low']:.2f}-{v['ci_high']:.2f})")


if __name__ == "__main__":
    main()
