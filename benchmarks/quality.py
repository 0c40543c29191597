"""Federated vs centralized quality at equal optimizer steps, and the seed objectives' ablations.

    .venv/bin/python benchmarks/quality.py --out runs/quality --rounds 6 --local-steps 40 --studies 40
    .venv/bin/python benchmarks/quality.py --out runs/quality --ablations osl mae multiview report
    .venv/bin/python benchmarks/quality.py --out runs/quality --skip-central --dp 1.0,5.0 --dp 0.01,5.0

On a synthetic cohort (3 non-IID sites, a held-out central cohort) it runs the recipe federated on a
real local Flower federation (SuperLink + 3 SuperNodes), then the centralized baseline on the pooled
caches with the same total optimizer steps, evaluates both final checkpoints on the central cohort,
and prints both evaluations with the federated/centralized ratio of zero-shot macro AUROC. With
``--ablations``, it retrains the federation without each named objective and prints each metric's
change. With ``--dp NOISE,CLIP`` (repeatable) it also runs the federation under client-level DP
(server-side fixed clipping, all sites every round) and prints the utility cost beside the epsilon
spent. Results are appended to ``benchmarks/RESULTS.md`` with the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from server.central import train_central
from server.demo import REPO, approve_app, prepare_cohorts
from server.evaluation.evaluate import evaluate_checkpoint
from server.local_federation import LocalFederation
from server.settings import settings_from_run_config

KEYS = ("zero_shot.macro_auroc", "findings_head.macro_auroc", "probe.macro_auroc",
        "retrieval.report_to_volume.recall@5", "retrieval.report_to_volume.chance@5", "generation.bleu4",
        "generation.rougeL", "generation.clinical_f1")
log = logging.getLogger("quality")


def final_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("round_*"))[-1] / "global.safetensors"


def federated(out: Path, sites: list[Path], central: Path, name: str, config: dict) -> dict:
    run_dir = out / name
    approve_app(sites, app=REPO)  # each site runs only the app version it approved: the current checkout's
    with LocalFederation(out / f"fed_{name}", sites) as fed:
        result = fed.run(REPO, {**config, "run-dir": str(run_dir), "eval-cohort": str(central)}, timeout=7200)
    if result.returncode != 0:
        raise RuntimeError(f"federated run {name} failed; see {out / f'fed_{name}' / 'logs'}")
    return evaluate_checkpoint(final_checkpoint(run_dir), central, out / f"eval_{name}", n_boot=500, generate=16)


def fmt(value) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=40)
    parser.add_argument("--studies", type=int, default=40, help="studies per site")
    parser.add_argument("--central-studies", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weights", default="", help="objective weights overriding the recipe, e.g. clip=1,osl=0.5,findings=1 "
                        "(objectives not named keep the recipe's weight; name them =0 to drop them)")
    parser.add_argument("--ablations", nargs="*", default=[], choices=["osl", "mae", "multiview", "report", "findings"])
    parser.add_argument("--skip-central", action="store_true")
    parser.add_argument("--dp", action="append", default=[], metavar="NOISE,CLIP",
                        help="also run with client-level DP at this noise multiplier and clipping norm")
    parser.add_argument("--skip-federated", action="store_true",
                        help="reuse the federated run already in --out (eval_federated/metrics.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if (out / "data" / "central" / "site.yaml").is_file():
        sites = [out / "data" / s / "site.yaml" for s in ("site-a", "site-b", "site-c")]
        central = out / "data" / "central" / "site.yaml"
    else:
        sites, central = prepare_cohorts(out, args.studies, args.central_studies, "tiny")
    # a generous round timeout: on a shared CPU a site's round can take minutes, and a late site would be
    # dropped from the round (with min-replies 3, the round skipped), which is not what is measured here
    config = {"recipe": args.recipe, "num-rounds": args.rounds, "local-steps": args.local_steps, "lr": args.lr,
              "min-available": 3, "min-replies": 3, "evaluate-every": args.rounds, "round-timeout-s": 3600}
    for item in filter(None, args.weights.split(",")):
        name, value = item.split("=")
        config[f"weight-{name.strip()}"] = float(value)
    if args.skip_federated:
        results = {"federated": json.loads((out / "eval_federated" / "metrics.json").read_text())}
    else:
        results = {"federated": federated(out, sites, central, "federated", config)}
    if not args.skip_central:
        settings = settings_from_run_config({**config, "run-dir": str(out / "centralized"),
                                             "eval-cohort": str(central)})
        train_central(settings, sites, batch_size=4)
        results["centralized"] = evaluate_checkpoint(final_checkpoint(out / "centralized"), central,
                                                     out / "eval_centralized", n_boot=500, generate=16)
    for objective in args.ablations:
        results[f"without {objective}"] = federated(out, sites, central, f"no_{objective}",
                                                    {**config, f"weight-{objective}": 0.0})
    epsilons = {}
    for item in args.dp:
        noise, clip = (float(x) for x in item.split(","))
        name = f"dp noise {noise:g} clip {clip:g}"
        tag = f"dp_{noise:g}_{clip:g}"
        results[name] = federated(out, sites, central, tag, {**config, "dp": "server", "dp-noise-multiplier": noise,
                                                             "dp-clipping-norm": clip, "dp-sites-per-round": 3})
        epsilons[name] = json.loads((out / tag / "privacy_report.json").read_text())["client_level"]
    minutes = (time.time() - started) / 60
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [f"## Quality: {args.recipe} recipe, {args.rounds} rounds x {args.local_steps} local steps, "
             f"3 sites x {args.studies} studies, central cohort {args.central_studies} studies",
             "", f"Command: `{command}` ({minutes:.0f} min on this machine).", "",
             "| run | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt(metrics.get(k)) for k in KEYS) + " |")
    fed = results["federated"]
    ci = fed.get("zero_shot.macro_ci") or [None, None]
    lines += ["", f"Federated zero-shot macro AUROC {fmt(fed['zero_shot.macro_auroc'])} "
                  f"(95% CI {fmt(ci[0])}-{fmt(ci[1])})."]
    if "centralized" in results and fed["zero_shot.macro_auroc"] and results["centralized"]["zero_shot.macro_auroc"]:
        ratio = fed["zero_shot.macro_auroc"] / results["centralized"]["zero_shot.macro_auroc"]
        lines.append(f"Federated/centralized ratio of zero-shot macro AUROC: {ratio:.3f}.")
    for name, metrics in results.items():
        if name.startswith("without"):
            deltas = ", ".join(f"{k} {metrics[k] - fed[k]:+.3f}" for k in KEYS
                               if isinstance(metrics.get(k), float) and isinstance(fed.get(k), float))
            lines.append(f"{name}: change vs federated with all objectives: {deltas}.")
    for name, spent in epsilons.items():
        lines.append(f"{name}: client-level epsilon {spent['epsilon_spent']:.4g} at delta {spent['delta']:g} after "
                     f"{spent['releases']} releases; zero-shot macro AUROC "
                     f"{fmt(results[name].get('zero_shot.macro_auroc'))} vs {fmt(fed.get('zero_shot.macro_auroc'))} "
                     f"without DP.")
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "quality.json").write_text(json.dumps({k: {m: v.get(m) for m in KEYS} for k, v in results.items()}, indent=2))
    results_md = Path(__file__).with_name("RESULTS.md")
    with results_md.open("a", encoding="utf-8") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
