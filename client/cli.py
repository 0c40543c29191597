"""``fedvlp-site``: the site operator's command line.

    fedvlp-site ingest --config site.yaml       # PACS export -> manifest + preprocessed cache
    fedvlp-site check  --config site.yaml       # validate config and cache, print a summary
    fedvlp-site synth  --out DIR --profile general --studies 20 --seed 0   # a synthetic PACS export
    fedvlp-site fab-hash PROJECT_DIR                # the FAB hash `flwr run PROJECT_DIR` sends
    fedvlp-site approve PROJECT_DIR --config site.yaml  # review an app version, add it to the allowlist
    fedvlp-site metrics --config site.yaml      # serve the site's Prometheus metrics (metrics.port)
    fedvlp-site supernode --config site.yaml -- FLOWER_SUPERNODE_ARGS...   # SuperNode + the site runner
    fedvlp-site runner --config site.yaml --runtime-api-address 127.0.0.1:9094   # (started by supernode)

Exit status: 0 on success, 1 when the cache is unusable, 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .ingest.cache import INGEST_REPORT, load_volume, read_manifest
from .site_config import SiteConfigError, load_site_config


def cmd_ingest(args) -> int:
    from .ingest.pipeline import CacheFolderError, run_ingest

    cfg = load_site_config(args.config)
    try:
        report = run_ingest(cfg, progress=not args.quiet, workers=args.workers)
    except CacheFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = report["files"]
    print(f"site {cfg.site_id}: {files['seen']} files seen: {files['ingested']} ingested, "
          f"{files['skipped']} skipped, {files['failed']} failed ({report['duration_s']} s)")
    print(f"  studies ingested: {report['studies']['ingested']} ({report['studies']['with_report']} with a report); "
          f"series: {report['series']['ingested']} ({report['series']['processed']} processed, "
          f"{report['series']['reused']} reused from the cache)")
    for reason, info in report["reasons"].items():
        print(f"  {info['kind']:7s} {info['count']:6d}  {reason}  (e.g. {info['examples'][0]})")
    for reason, count in report["reports"]["problems"].items():
        print(f"  report rows {count:6d}  {reason}")
    print(f"  details: {Path(cfg.cache_dir) / INGEST_REPORT} and quarantine.jsonl")
    return 0 if report["series"]["ingested"] else 1


def check_cache(cfg) -> tuple[list[str], list[str]]:
    """(summary lines, problems) for a site's cache; no problems means the site can train."""
    from .ingest.pipeline import preprocess_fingerprint, unfinished_ingest

    cache = Path(cfg.cache_dir)
    try:
        rows = read_manifest(cache)
    except ValueError as err:
        return [], [str(err)]
    problems: list[str] = []
    if not rows:
        return [], [f"no ingested series in {cache}; run: fedvlp-site ingest --config {cfg.source}"]
    report_path = cache / INGEST_REPORT
    pcfg = cfg.preprocess_config()
    if not report_path.is_file():
        problems.append(f"no {INGEST_REPORT} in {cache}: no ingest completed there; run fedvlp-site ingest")
    else:
        recorded = json.loads(report_path.read_text())
        if (unfinished := unfinished_ingest(recorded)) is not None:
            problems.append(unfinished)
        elif recorded.get("preprocess_fingerprint") != preprocess_fingerprint(pcfg):
            problems.append("the cache was made with other preprocessing settings than the config's; re-run ingest")
    for row in rows:
        try:
            volume = load_volume(cache, row["cache_file"])
            if tuple(volume.shape) != tuple(pcfg.size):
                problems.append(f"{row['cache_file']}: shape {volume.shape}, expected {pcfg.size}")
            elif not np.isfinite(volume).all():
                problems.append(f"{row['cache_file']}: non-finite values")
        except (OSError, ValueError) as err:
            problems.append(f"{row['cache_file']}: unreadable ({err}); re-run ingest")
    studies = {r["study_uid"]: r for r in rows}
    labelled = [r for r in studies.values() if r["findings"] is not None]
    if cfg.data.require_report and not labelled:
        problems.append("no study has a report; check data.reports (key and columns) and the ingest report")
    spacing = np.array([r["original_spacing"] for r in rows])
    lines = [
        f"site {cfg.site_id}: {len(studies)} studies, {len(rows)} series "
        f"({', '.join(f'{m}: {n}' for m, n in sorted(Counter(r['modality'] for r in rows).items()))})",
        f"  with a report: {len(labelled)} studies; vision-only: {len(studies) - len(labelled)}",
        "  original spacing (mm) min-max per axis: "
        + ", ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(spacing.min(0), spacing.max(0))),
        f"  cached volumes: {len(rows)} x {tuple(pcfg.size)} at {tuple(pcfg.spacing)} mm",
    ]
    counts = Counter()
    for r in labelled:
        counts.update(name for name, present in r["findings"].items() if present)
    if labelled:
        lines.append("  finding prevalence (studies with the finding present):")
        lines += [f"    {name:36s} {n:5d}  {100 * n / len(labelled):5.1f}%" for name, n in counts.most_common()]
    return lines, problems


def cmd_check(args) -> int:
    cfg = load_site_config(args.config)
    lines, problems = check_cache(cfg)
    print("\n".join(lines))
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print("OK: the site's cache is ready to train." if not problems else f"{len(problems)} problem(s) found.")
    return 0 if not problems else 1


def cmd_synth(args) -> int:
    from .synth import write_synthetic_export

    summary = write_synthetic_export(args.out, args.profile, args.studies, args.seed)
    print(summary)
    return 0


def cmd_fab_hash(args) -> int:
    from .fab_pinning import fab_hash_of_project

    project = Path(args.project)
    if not (project / "pyproject.toml").is_file():
        print(f"configuration error: {project} is not a Flower app folder (no pyproject.toml)", file=sys.stderr)
        return 2
    print(fab_hash_of_project(project))
    return 0


def cmd_approve(args) -> int:
    import hashlib

    from .approvals import last_approved, read_fab, record_approval, review, site_policy

    cfg = load_site_config(args.config, require_data=False)
    try:
        fab = read_fab(args.source)
    except FileNotFoundError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    fab_hash = hashlib.sha256(fab).hexdigest()
    print("\n".join(review(fab, last_approved(cfg.privacy.approvals_dir))))
    policy = site_policy(cfg)
    if policy.any_app:
        print(f"note: {cfg.source} says privacy.allowed_fab_hashes: any, so this site runs every app version; "
              "the approval is recorded all the same (for the next review's diff).")
    elif policy.allows(fab_hash):
        print(f"already allowed at site {cfg.site_id}: {fab_hash}")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            print("not approved: no terminal to confirm on; pass --yes to approve what is printed above", file=sys.stderr)
            return 1
        if input(f"Add {fab_hash[:12]}... to the apps site {cfg.site_id} runs? [y/N] ").strip().lower() not in ("y", "yes"):
            print("not approved")
            return 1
    record_approval(cfg.privacy.approvals_dir, fab, str(Path(args.source).resolve()))
    print(f"approved: {fab_hash} recorded in {Path(cfg.privacy.approvals_dir) / 'approved.jsonl'}; "
          "the site runner allows it from the next message on")
    return 0


def cmd_runner(args) -> int:
    import signal

    from .site_runner import SiteRunner

    load_site_config(args.config, require_data=False)  # a broken site YAML stops the site here, not later
    logging.getLogger().handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API call otherwise
    runner = SiteRunner(args.config, args.runtime_api_address, poll_s=args.poll)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runner.stop())
    runner.serve()
    return 0


def cmd_metrics(args) -> int:
    import signal
    import threading

    from .metrics import serve

    cfg = load_site_config(args.config, require_data=False)  # reads the cache only
    port = args.port or cfg.metrics.port
    if not port:
        raise SiteConfigError(f"{cfg.source}: metrics.port: set a port for the site's metrics (e.g. 9101), "
                              "or pass --port.")
    server, _ = serve(cfg.cache_dir, port, args.address or cfg.metrics.address)
    print(f"site {cfg.site_id}: Prometheus metrics on http://{args.address or cfg.metrics.address}:{port}/metrics "
          f"(from {cfg.cache_dir}); Ctrl-C stops", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0


def cmd_supernode(args) -> int:
    from .supernode import check_heartbeat_interval, process_isolation, run_supernode

    flags = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not flags:
        raise SiteConfigError("supernode: pass flower-supernode's arguments after --, e.g. fedvlp-site supernode "
                              "--config /abs/site.yaml -- --superlink HOST:9093 --root-certificates ca.crt "
                              "--auth-supernode-private-key site.key --node-config 'site-config=\"/abs/site.yaml\"'")
    load_site_config(args.config, require_data=False)  # the runner's policy must load before the site joins
    try:
        process_isolation(flags)
    except ValueError as err:
        raise SiteConfigError(f"supernode: {err}") from None
    try:
        check_heartbeat_interval(args.heartbeat_interval)
    except ValueError as err:
        raise SiteConfigError(f"supernode: {err}") from None
    return run_supernode(flags, str(Path(args.config).resolve()), tries=args.rejoin_tries, wait_s=args.rejoin_wait,
                         heartbeat_interval=args.heartbeat_interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedvlp-site", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest", help="ingest the site's PACS export into its cache")
    p.add_argument("--config", required=True)
    p.add_argument("--workers", type=int, default=None, help="processes for series (default: compute.workers)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ingest)
    p = sub.add_parser("check", help="validate the config and the cache, print a summary")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("synth", help="write a synthetic PACS export (DICOM, NIfTI, reports, masks)")
    p.add_argument("--out", required=True)
    p.add_argument("--profile", default="general")
    p.add_argument("--studies", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
    p = sub.add_parser("fab-hash", help="print the FAB hash `flwr run PROJECT` sends (for privacy.allowed_fab_hashes)")
    p.add_argument("project", help="the app's folder (the one holding pyproject.toml)")
    p.set_defaults(func=cmd_fab_hash)
    p = sub.add_parser("approve", help="review an app version (hash, files, diff against the last approved one) "
                       "and add it to the site's allowlist (privacy.approvals_dir)")
    p.add_argument("source", help="the app's folder (the one holding pyproject.toml) or a .fab file")
    p.add_argument("--config", required=True, help="the site YAML")
    p.add_argument("--yes", action="store_true", help="approve without asking (after printing the review)")
    p.set_defaults(func=cmd_approve)
    p = sub.add_parser("metrics", help="serve this site's Prometheus metrics (training progress, ingest counts)")
    p.add_argument("--config", required=True)
    p.add_argument("--port", type=int, default=None, help="default: metrics.port in the site YAML")
    p.add_argument("--address", default=None, help="default: metrics.address in the site YAML (0.0.0.0)")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("supernode", help="run flower-supernode (--isolation process) with the site runner; retry "
                       "while the SuperLink still holds this site's previous session (a restart right after a crash)")
    p.add_argument("--config", required=True, help="the site YAML whose privacy section the runner enforces")
    p.add_argument("--rejoin-tries", type=int, default=12, help="starts before giving up (default 12)")
    p.add_argument("--rejoin-wait", type=float, default=10.0, help="seconds between starts (default 10)")
    p.add_argument("--heartbeat-interval", type=float, default=None,
                   help="seconds between the SuperNode's heartbeats, 10 to 1800 (default Flower's 30); the "
                   "SuperLink counts the site out two intervals after its last one (a dead site leaves its round, "
                   "a restarted one may rejoin, that much sooner)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then flower-supernode's own arguments")
    p.set_defaults(func=cmd_supernode)
    p = sub.add_parser("runner", help="the site runner: take the SuperNode's ClientApp tasks, vet each FAB, "
                       "filter each reply (started by `fedvlp-site supernode`)")
    p.add_argument("--config", required=True, help="the site YAML")
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's Runtime API (its --port)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between looks for a task (default 1)")
    p.set_defaults(func=cmd_runner)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SiteConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
