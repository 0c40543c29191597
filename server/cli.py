"""``fedvlp-server``: the federation operator's and evaluator's command line.

    fedvlp-server demo --out runs/demo          # synthetic sites + a real local federation + report
    fedvlp-server report --run-dir RUN --out report.md
    fedvlp-server train-central --recipe tiny --sites a/site.yaml b/site.yaml --run-dir runs/central
    fedvlp-server evaluate --checkpoint RUN/checkpoints/round_0003/global.safetensors --data COHORT --out DIR
        COHORT: an ingested cohort's cache folder, its manifest.jsonl, or its site YAML
    fedvlp-server fleet-gateway --listen 0.0.0.0:9093 --superlink 127.0.0.1:9092 --certs CERT_DIR
        the sites' port: passes the SuperLink's Fleet API only (server/fleet_gateway.py)
    fedvlp-server superlink -- FLOWER_SUPERLINK_ARGS   flower-superlink, its --database fit for many sites
        (server/superlink.py)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedvlp-server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the local demo")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=30)
    p.add_argument("--studies", type=int, default=30, help="studies per site")
    p.add_argument("--central-studies", type=int, default=40)
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a held-out cohort: metrics.json + report.html")
    p.add_argument("--checkpoint", required=True, help="a global.safetensors (its state.json names the preset)")
    p.add_argument("--data", required=True, help="cohort cache folder, manifest.jsonl or site YAML")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default=None, help="model preset or YAML (default: the checkpoint's run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--generate", type=int, default=32, help="studies to generate reports for")
    p.add_argument("--masks", default=None, help="folder of <AccessionNumber>/findings.nii.gz for the segmentation probe")
    p = sub.add_parser("train-central", help="the centralized baseline on the sites' pooled caches")
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--sites", nargs="+", required=True, help="the sites' YAMLs (or cache folders)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="run settings as in --run-config, e.g. num-rounds=4 local-steps=8 eval-cohort=/abs/c.yaml")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p = sub.add_parser("report", help="write the Markdown report of a run folder")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("fleet-gateway", help="the sites' port: a TLS proxy passing the SuperLink's Fleet API only")
    p.add_argument("--listen", default="0.0.0.0:9093", help="HOST:PORT the sites connect to (default 0.0.0.0:9093)")
    p.add_argument("--superlink", default="127.0.0.1:9092", help="the SuperLink's own HOST:PORT (default 127.0.0.1:9092)")
    p.add_argument("--certs", required=True, help="folder with ca.crt, superlink.crt, superlink.key (deploy/make_certs.py)")
    p = sub.add_parser("superlink", help="flower-superlink with its arguments, the object store in memory and a "
                       "longer database busy timeout (server/superlink.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then flower-superlink's own arguments")
    args = parser.parse_args(argv)
    if args.command == "superlink":  # Flower configures its own logging and signal handling
        from .superlink import main as run_superlink

        run_superlink(args.args[1:] if args.args[:1] == ["--"] else args.args)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM (e.g. from a CI runner or `kill`) unwinds like Ctrl-C, so started processes are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.command == "demo":
        from .demo import run_demo

        report = run_demo(args.out, args.rounds, args.local_steps, args.studies, args.central_studies)
        print(report.read_text())
        return 0
    if args.command == "fleet-gateway":
        from pathlib import Path

        from .fleet_gateway import serve

        certs = Path(args.certs)
        missing = [name for name in ("ca.crt", "superlink.crt", "superlink.key") if not (certs / name).is_file()]
        if missing:
            print(f"configuration error: {certs} lacks {', '.join(missing)} (deploy/make_certs.py makes them)",
                  file=sys.stderr)
            return 2
        serve(args.listen, args.superlink, certs / "superlink.crt", certs / "superlink.key", certs / "ca.crt")
        return 0
    if args.command == "train-central":
        import yaml

        from .central import train_central
        from .settings import settings_from_run_config

        overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
        settings = settings_from_run_config({"recipe": args.recipe, "run-dir": args.run_dir, **overrides})
        print(train_central(settings, args.sites, args.batch_size, args.device))
        return 0
    if args.command == "evaluate":
        import json
        from pathlib import Path

        from .evaluation.evaluate import evaluate_checkpoint
        from .evaluation.html_report import write_html_report

        result = evaluate_checkpoint(args.checkpoint, args.data, args.out, args.preset, args.device, args.bootstrap,
                                     args.generate, args.masks)
        run_dir = Path(args.checkpoint).resolve().parents[2]
        history_path = run_dir / "history.jsonl"
        history = [json.loads(x) for x in history_path.read_text().splitlines()] if history_path.is_file() else []
        from .privacy import load_privacy_report, privacy_lines

        privacy = load_privacy_report(run_dir)
        report = write_html_report(result, Path(args.out) / "report.html", result.get("_roc"), history,
                                   privacy=privacy_lines(privacy) if privacy else None)
        for key in ("zero_shot.macro_auroc", "zero_shot.macro_ci", "retrieval.report_to_volume.recall@5",
                    "generation.bleu4", "generation.clinical_f1", "probe.macro_auroc", "segmentation.mean_dice"):
            print(f"{key}: {result.get(key)}")
        print(f"metrics: {Path(args.out) / 'metrics.json'}; report: {report}")
        return 0
    from .evaluation.report import write_run_report

    print(write_run_report(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
