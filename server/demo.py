"""The local demo: a synthetic multi-site cohort, a real Flower federation on loopback, a report.

    make demo                                   # = python -m server.cli demo --out runs/demo
    fedvlp-server demo --out runs/demo --rounds 3 --studies 20

Steps, each through the commands a site operator or federation operator runs:
1. ``fedvlp-site synth``: three non-IID sites (general, cardio, pulmonary scanners and prevalence)
   and a held-out central cohort;
2. ``fedvlp-site ingest`` of each (the sites in parallel);
3. a SuperLink and three SuperNodes on loopback (``server.local_federation``), ``flwr run`` of the
   ``tiny`` recipe with the central cohort as the evaluation cohort;
4. a report under the output folder (per-round losses and participation, central evaluation);
   the ServerApp serves Prometheus metrics during the run and each site runs its exporter
   (``fedvlp-site metrics``), whose final scrape is saved in ``OUT/metrics/SITE.prom``.
Every process started is stopped on exit, Ctrl-C included. ``FLWR_HOME`` is ``OUT/flwr_home``.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .local_federation import LocalFederation, app_snapshot, free_port

log = logging.getLogger(__name__)
SITES = (("site-a", "general", 1), ("site-b", "cardio", 2), ("site-c", "pulmonary", 3))
REPO = Path(__file__).resolve().parents[1]


def _site_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "client.cli", *args]


def write_site_yaml(folder: Path, site_id: str, preset: str, threads: int, batch_size: int = 8) -> Path:
    config = {
        "site_id": site_id,
        "model": preset,
        "cache_dir": "cache",
        "data": {"dicom_root": "dicom", "nifti_manifest": "nifti_manifest.csv", "reports": {"path": "reports.csv"}},
        "compute": {"device": "auto", "batch_size": batch_size, "workers": 0, "threads": threads},
        "privacy": {"egress_log": "egress.jsonl"},  # every reply that leaves the site, for an audit
    }
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prepare_cohorts(out: Path, studies: int, central_studies: int, preset: str) -> tuple[list[Path], Path]:
    """Synthesize and ingest the three sites and the central cohort; returns their site YAMLs."""
    data = out / "data"
    jobs = [(name, profile, seed, studies) for name, profile, seed in SITES] + [("central", "central", 100, central_studies)]
    synths = [(name, subprocess.Popen(_site_command("synth", "--out", str(data / name), "--profile", profile,
                                                    "--studies", str(n), "--seed", str(seed)),
                                      stdout=subprocess.DEVNULL)) for name, profile, seed, n in jobs]
    for name, proc in synths:  # the exports are written in parallel, each by its own process
        if proc.wait() != 0:
            raise RuntimeError(f"fedvlp-site synth of {name} failed (exit {proc.returncode})")
    yamls = {name: write_site_yaml(data / name, name, preset, threads=1) for name, *_ in jobs}
    procs = [subprocess.Popen(_site_command("ingest", "--config", str(yamls[name]), "--quiet", "--workers", "0"),
                              stdout=open(data / name / "ingest.log", "wb"), stderr=subprocess.STDOUT)
             for name, *_ in jobs]
    for (name, *_), proc in zip(jobs, procs):
        if proc.wait() != 0:
            raise RuntimeError(f"ingest of {name} failed; see {data / name / 'ingest.log'}")
        log.info("%s: %s", name, (data / name / "ingest.log").read_text().splitlines()[0])
    return [yamls[name] for name, *_ in SITES], yamls["central"]


def approve_app(site_yamls: list[Path], app: Path = REPO) -> None:
    """Each site allows the app version it is about to run (``fedvlp-site approve``): a site's runner refuses
    any other. Call it right before ``flwr run APP``: a change of the app's files changes its hash.
    The FAB is built once (what ``flwr run APP`` sends: builds are deterministic) and each site reviews
    that file, in parallel."""
    import tempfile

    from flwr.cli.build import build_fab_from_disk

    with tempfile.TemporaryDirectory(prefix="fedvlp-approve-") as tmp:
        fab = Path(tmp) / "app.fab"
        fab.write_bytes(build_fab_from_disk(Path(app)))
        procs = [subprocess.Popen(_site_command("approve", str(fab), "--config", str(site_yaml), "--yes"),
                                  stdout=subprocess.DEVNULL) for site_yaml in site_yamls]
        for site_yaml, proc in zip(site_yamls, procs):
            if proc.wait() != 0:
                raise RuntimeError(f"fedvlp-site approve failed for {site_yaml} (exit {proc.returncode})")


def save_site_metrics(folder: Path, names: list[str], ports: list[int]) -> None:
    """Each site exporter's final scrape, as Prometheus would see it, in ``folder/SITE.prom``."""
    import urllib.request

    folder.mkdir(parents=True, exist_ok=True)
    for name, port in zip(names, ports):
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        except OSError as err:
            log.warning("site %s's exporter did not answer: %s", name, err)
            continue
        (folder / f"{name}.prom").write_bytes(text)


def budget_note(evaluation: dict, history: list[dict], studies: int, sites: int) -> str:
    """One line on what the demo's budget can and cannot show, from its own figures: which findings
    the global model separates zero-shot (95% interval above chance) and which it does not."""
    steps = sum(int(r["train"].get("local-steps", 0) or 0) for r in history) or "?"
    per = {k: v for k, v in evaluation.get("zero_shot.per_finding", {}).items() if v.get("auroc") is not None}
    learned = sorted(k for k, v in per.items() if (v.get("ci_low") or 0) > 0.5)
    not_yet = sorted(k for k in per if k not in learned)
    return (f"{len(history)} rounds ({steps} local steps in all per site) on {studies} synthetic phantom studies at each "
            f"of {sites} sites: enough to check that the federation, the objectives and the evaluation work end to end "
            f"and to see which findings a model learns first (zero-shot 95% interval above chance: "
            f"{', '.join(learned) if learned else 'none yet'}); too little to learn the rest "
            f"({', '.join(not_yet) if not_yet else '-'}) or to rank objectives, and phantoms say nothing "
            f"about real CT. Quality at a larger budget: benchmarks/RESULTS.md.")


def run_demo(out: str | Path, rounds: int = 3, local_steps: int = 30, studies: int = 30, central_studies: int = 40,
             recipe: str = "tiny") -> Path:
    out = Path(out).resolve()
    if out.exists():
        shutil.rmtree(out)  # the demo's own folder: each demo starts from scratch
    out.mkdir(parents=True)
    started = time.time()
    site_yamls, central_yaml = prepare_cohorts(out, studies, central_studies, "tiny")
    app = app_snapshot(out / "app")  # what the sites approve is what flwr run sends
    approve_app(site_yamls, app)
    log.info("cohorts ready and the app approved at each site in %.0f s", time.time() - started)
    run_dir = out / "run"
    metrics_port = free_port()
    run_config = {"recipe": recipe, "run-dir": str(run_dir), "num-rounds": rounds, "local-steps": local_steps,
                  "eval-cohort": str(central_yaml), "evaluate-every": rounds,  # the last round only
                  "min-available": len(site_yamls), "min-replies": 2,
                  "metrics-port": metrics_port, "metrics-address": "127.0.0.1"}
    with LocalFederation(out, site_yamls) as federation:
        log.info("SuperLink on %s, %d SuperNodes; flwr run (logs in %s)", federation.address, len(site_yamls),
                 federation.logs)
        site_ports = federation.start_site_exporters(list(range(len(site_yamls))))
        log.info("Prometheus metrics: server http://127.0.0.1:%d/metrics (while the run goes on), sites %s",
                 metrics_port, ", ".join(f"http://127.0.0.1:{p}/metrics" for p in site_ports))
        result = federation.run(app, run_config, timeout=3600)
        save_site_metrics(out / "metrics", [name for name, *_ in SITES], site_ports)
    if result.returncode != 0 or not (run_dir / "history.jsonl").is_file():
        raise RuntimeError(f"the federated run failed (flwr run exit {result.returncode}); see {out / 'logs'}")
    from .evaluation.evaluate import evaluate_checkpoint
    from .evaluation.html_report import write_html_report
    from .evaluation.report import write_run_report
    from .privacy import load_privacy_report, privacy_lines

    final = sorted((run_dir / "checkpoints").glob("round_*"))[-1] / "global.safetensors"
    evaluation = evaluate_checkpoint(final, central_yaml, out / "evaluation", n_boot=500, generate=16,
                                     masks=central_yaml.parent / "masks")
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    privacy = load_privacy_report(run_dir)
    note = budget_note(evaluation, history, studies, len(site_yamls))
    html = write_html_report(evaluation, out / "evaluation" / "report.html", evaluation.get("_roc"), history,
                             title="fedvlp demo: the global model on the held-out central cohort",
                             privacy=privacy_lines(privacy) if privacy else None, note=note)
    report = write_run_report(run_dir, out / "report.md", wall_seconds=time.time() - started,
                              evaluation=evaluation, html=html, note=note)
    log.info("demo finished in %.0f s; report: %s", time.time() - started, report)
    return report
