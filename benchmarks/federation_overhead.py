"""Federation overhead per round on loopback: 3 SuperNodes, TLS, the ~100M-parameter ``base100m`` model.

    .venv/bin/python benchmarks/federation_overhead.py                      # 2 rounds x 1 local step
    .venv/bin/python benchmarks/federation_overhead.py --rounds 3 --local-steps 2 --studies 8
    .venv/bin/python benchmarks/federation_overhead.py --sites 2 --limit-gib 11.5   # where 3 sites do not fit

Synthesizes and ingests three small non-IID sites (:func:`server.demo.prepare_cohorts`, reused when
``OUT/data`` holds them), starts a real :class:`server.local_federation.LocalFederation` (SuperLink +
3 SuperNodes on 127.0.0.1, TLS and SuperNode authentication as by default), and runs the ``tiny``
recipe with ``benchmarks/models/base100m.yaml`` as preset: a recipe copy in ``OUT/recipe.yaml`` names
it (run configs carry scalars only), and the site YAMLs' ``model:`` names the same file, so each
site's cache fingerprint matches. No evaluation cohort: rounds carry no central evaluation.

From the run's ``history.jsonl`` it prints, per round: wall time, the slowest site's
``train-seconds``, ``overhead_seconds`` (wall - evaluation - slowest site), aggregation time, the
bytes per site each way, and the wall time split where the last site's reply left it (the sites'
egress logs): before (instruction transport, ClientApp start, model build, training, optimizer state
save) and after (reply transport, the server's checks, aggregation). While the run goes on it samples the RSS of every process of the
federation (SuperLink, SuperNodes, ServerApp, ClientApps, their SuperExecs) and prints the peaks; past
``--limit-gib`` in all (or what the machine has free) it stops the federation and says so. Every
process started is stopped on exit (LocalFederation's context manager).

Memory on one machine (measured): each ClientApp of base100m peaks near 3.5 GiB (weights, gradients,
AdamW moments, the received and the sent arrays), so 2 sites peaked at 10.9 GiB in all and 3 sites
need about 14 GiB; with less, run ``--sites 2``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from server.demo import REPO, SITES, approve_app, prepare_cohorts
from server.local_federation import LocalFederation, processes_using

MODEL_YAML = Path(__file__).resolve().parent / "models" / "base100m.yaml"
GIB = 1024 ** 3
ROLES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp")
log = logging.getLogger("federation_overhead")


# -- the run's inputs -----------------------------------------------------------------------------

def made_before(site_yaml: Path, studies: int) -> bool:
    """Whether this site was synthesized with ``studies`` studies and ingested for base100m."""
    truth = site_yaml.parent / "truth.json"
    return (site_yaml.is_file() and truth.is_file() and yaml.safe_load(site_yaml.read_text())["model"] == str(MODEL_YAML)
            and json.loads(truth.read_text()).get("studies_requested") == studies)


def cohorts(out: Path, studies: int) -> list[Path]:
    """The three sites' YAMLs (``model:`` = base100m.yaml), synthesized and ingested unless present."""
    data = out / "data"
    yamls = [data / name / "site.yaml" for name, *_ in SITES]
    if all(made_before(p, studies) for p in yamls):
        log.info("reusing the ingested sites in %s", data)
        return yamls
    shutil.rmtree(data, ignore_errors=True)
    # the central cohort prepare_cohorts also makes is kept minimal: no evaluation here
    sites, _central = prepare_cohorts(out, studies, 2, str(MODEL_YAML))
    return sites


def write_recipe(out: Path, rounds: int) -> Path:
    """``server/recipes/tiny.yaml`` with base100m as preset, a round timeout that slow CPUs meet, and
    every round's checkpoint kept (their times mark the rounds' starts, see :func:`timeline`)."""
    recipe = yaml.safe_load((REPO / "server" / "recipes" / "tiny.yaml").read_text())
    recipe.update(preset=str(MODEL_YAML), round_timeout_s=3600, keep_checkpoints=rounds + 1)
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# -- memory of the federation's processes ---------------------------------------------------------

def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def role(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return "gone"
    return next((r for r in ROLES if r in cmdline), "other")


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class MemoryWatch:
    """Peak RSS of the federation's processes, by role (summed over a role's processes) and in all."""

    def __init__(self, federation: LocalFederation) -> None:
        self.federation = federation
        self.peaks: dict[str, int] = defaultdict(int)
        self.total_peak = 0
        self.at_peak: dict[str, int] = {}  # by role, when the total peaked
        self.now: dict[str, int] = {}

    def pids(self) -> set[int]:
        started = [p.pid for p in [self.federation.superlink, *self.federation.nodes] if p is not None]
        return set(started) | set(processes_using(self.federation.addresses()))

    def sample(self) -> int:
        by_role: dict[str, int] = defaultdict(int)
        for pid in self.pids():
            by_role[role(pid)] += rss_bytes(pid)
        total = sum(by_role.values())
        for name, value in by_role.items():
            self.peaks[name] = max(self.peaks[name], value)
        if total > self.total_peak:
            self.total_peak, self.at_peak = total, dict(by_role)
        self.now = dict(by_role)
        return total

    @staticmethod
    def describe(by_role: dict[str, int]) -> str:
        return ", ".join(f"{name} {value / GIB:.2f}" for name, value in sorted(by_role.items()))


def stop_group(process: subprocess.Popen) -> None:
    """End ``flwr run`` and its children (started in a session of their own) if still running."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_watched(federation: LocalFederation, run_config: dict[str, Any], limit: float, timeout: float) -> MemoryWatch:
    """``flwr run`` while sampling memory every second; stops it past ``limit`` bytes (or with under 1 GiB
    free on the machine) or after ``timeout`` seconds (the caller's ``with`` then stops the federation)."""
    watch = MemoryWatch(federation)
    run = federation.run_async(REPO, run_config)
    deadline, logged = time.time() + timeout, 0.0
    try:
        while run.poll() is None:
            total = watch.sample()
            if total > limit or mem_available_bytes() < GIB:
                raise RuntimeError(f"the federation's processes hold {total / GIB:.1f} GiB (limit {limit / GIB:.1f} "
                                   f"GiB; {watch.describe(watch.now)}), the machine has "
                                   f"{mem_available_bytes() / GIB:.1f} GiB free; stopped")
            if time.time() - logged >= 30:
                log.info("RSS GiB: %s; all %.2f (peak %.2f)", watch.describe(watch.now), total / GIB,
                         watch.total_peak / GIB)
                logged = time.time()
            if time.time() > deadline:
                raise TimeoutError(f"flwr run still going after {timeout:.0f} s; stopped")
            time.sleep(1.0)
    finally:
        stop_group(run)
    if run.returncode != 0:
        raise RuntimeError(f"flwr run exited with {run.returncode}; see {federation.logs}")
    return watch


# -- figures --------------------------------------------------------------------------------------

def round_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for record in history:
        sites = record["participation"]["sites"]
        seconds = [s["train-seconds"] for s in sites if s.get("train-seconds")]
        rows.append({
            "round": record["round"], "valid": record["participation"]["valid"], "wall": record["wall_seconds"],
            "slowest": max(seconds) if seconds else None, "evaluation": record.get("evaluation_seconds", 0.0),
            "overhead": record.get("overhead_seconds"), "aggregation": record.get("aggregation_seconds"),
            "sent_mb": record["bytes_sent_per_site"] / 1e6,
            "received_mb": record["bytes_received"] / max(1, len(sites)) / 1e6,
        })
    return rows


def egress_times(site_yaml: Path, since: float) -> list[float]:
    """When each training reply left the site (its egress log, 1 s resolution), from ``since`` on."""
    config = yaml.safe_load(site_yaml.read_text())
    path = site_yaml.parent / (config.get("privacy") or {}).get("egress_log", "")
    if not path.is_file():
        return []
    times = [datetime.strptime(r["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
             for r in map(json.loads, path.read_text().splitlines()) if r.get("message_type") == "train"]
    return sorted(t for t in times if t >= since)


def timeline(rows: list[dict[str, Any]], run_dir: Path, sites: list[Path], since: float) -> None:
    """Split each round's wall time at the moment the last site's reply left it (its egress log):
    before (instruction transport, ClientApp start, model build, training, optimizer state save) and
    after (reply transport, the server's checks, aggregation). A round starts when the previous
    round's checkpoint is complete (``state.json`` written)."""
    left = [egress_times(site, since) for site in sites]
    for r in rows:
        start_file = run_dir / "checkpoints" / f"round_{r['round'] - 1:04d}" / "state.json"
        times = [t[r["round"] - 1] for t in left if len(t) >= r["round"]]
        if not start_file.is_file() or len(times) < len(sites):
            r["before"] = r["after"] = None
            continue
        start = start_file.stat().st_mtime
        r["before"] = max(times) - start
        r["after"] = start + r["wall"] - max(times)


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_figures(rows: list[dict[str, Any]], watch: MemoryWatch, minutes: float, command: str) -> None:
    print(f"\nCommand: `{command}` ({minutes:.1f} min in all)\n")
    print("| round | valid replies | round wall time s | slowest site's train-seconds | evaluation s | overhead s "
          "| aggregation s | MB sent per site | MB received per site | until the last reply left its site s "
          "| after it left s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['valid']} | {fmt(r['wall'])} | {fmt(r['slowest'])} | {fmt(r['evaluation'])} "
              f"| {fmt(r['overhead'])} | {fmt(r['aggregation'], 2)} | {r['sent_mb']:.1f} | {r['received_mb']:.1f} "
              f"| {fmt(r.get('before'), 0)} | {fmt(r.get('after'), 0)} |")
    overheads = [r["overhead"] for r in rows if r["overhead"] is not None]
    if overheads:
        print(f"\nmean overhead {sum(overheads) / len(overheads):.1f} s per round; mean wall "
              f"{sum(r['wall'] for r in rows) / len(rows):.1f} s")
    print(f"peak RSS of the federation's processes (GiB, sampled each second): all together "
          f"{watch.total_peak / GIB:.2f} ({watch.describe(watch.at_peak)}); each role's own peak: "
          f"{watch.describe(watch.peaks)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/fedvlp_federation_overhead")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--studies", type=int, default=6, help="studies per site")
    parser.add_argument("--sites", type=int, default=3, choices=(1, 2, 3),
                        help="SuperNodes to start (the first N of the three sites)")
    parser.add_argument("--limit-gib", type=float, default=11.0,
                        help="stop the federation when its processes hold more than this (or MemAvailable - 1 GiB)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole flwr run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    sites = cohorts(out, args.studies)[:args.sites]
    log.info("sites ready in %.0f s", time.time() - started)
    run_dir, fed_dir = out / "run", out / "federation"
    # a fresh run each time: an old run_dir would resume, and each run leaves 2 x 0.8 GB of optimizer state per site
    for folder in (run_dir, fed_dir, *(site.parent / "cache" / "train_state" for site in sites)):
        shutil.rmtree(folder, ignore_errors=True)
    run_config = {"recipe": str(write_recipe(out, args.rounds)), "run-dir": str(run_dir), "num-rounds": args.rounds,
                  "local-steps": args.local_steps, "min-available": len(sites), "min-replies": len(sites)}
    limit = min(args.limit_gib * GIB, mem_available_bytes() - GIB)
    approve_app(sites, app=REPO)  # each site runs only the app version it approved: the current checkout's
    run_started = time.time()
    with LocalFederation(fed_dir, sites) as federation:
        log.info("SuperLink on %s (TLS), %d SuperNode(s); flwr run, logs in %s; memory limit %.1f GiB",
                 federation.address, len(sites), federation.logs, limit / GIB)
        watch = run_watched(federation, run_config, limit, args.timeout)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    rows = round_rows(history)
    timeline(rows, run_dir, sites, run_started)
    command = "python benchmarks/federation_overhead.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in ("rounds", "local_steps", "studies", "sites"))
    print_figures(rows, watch, (time.time() - started) / 60, command)


if __name__ == "__main__":
    main()
