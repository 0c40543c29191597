"""``fedvlp-server``: the federation operator's and evaluator's command line.

    fedvlp-server demo --out runs/demo          # synthetic sites + a real local federation + report
    fedvlp-server report --run-dir RUN --out report.md
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
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--studies", type=int, default=20, help="studies per site")
    p.add_argument("--central-studies", type=int, default=40)
    p = sub.add_parser("report", help="write the Markdown report of a run folder")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM (e.g. from a CI runner or `kill`) unwinds like Ctrl-C, so started processes are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.command == "demo":
        from .demo import run_demo

        report = run_demo(args.out, args.rounds, args.local_steps, args.studies, args.central_studies)
        print(report.read_text())
        return 0
    from .evaluation.report import write_run_report

    print(write_run_report(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
