"""The site's Prometheus exporter: local training progress as whitelisted aggregates.

Flower starts a fresh ClientApp process for every message, so no exporter can live inside it. The
round writes a small snapshot, ``cache_dir/metrics/site_metrics.json`` (atomically, every few seconds
while it trains and at its end), and a long-lived exporter serves it:

    fedvlp-site metrics --config /etc/fedvlp/site.yaml          # port: metrics.port in the site YAML

The exporter is a prometheus-client custom collector that reads the snapshot at each scrape (the
pattern of node_exporter's textfile collector), so a scrape always shows the latest state and the
exporter holds no state of its own. The snapshot keeps only the names of :data:`EXPORTED` (the egress
whitelist plus the round's peak GPU memory): aggregates of the site's training, never a path, an
identifier or a per-study value. Cumulative counters (rounds, steps, volumes) survive exporter and
ClientApp restarts because they live in the snapshot.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .egress import ALLOWED_METRICS
from .ingest.cache import INGEST_REPORT, write_atomic

log = logging.getLogger(__name__)

SNAPSHOT = Path("metrics") / "site_metrics.json"
EXPORTED = frozenset(ALLOWED_METRICS | {"gpu-memory-peak-bytes"}) - {"num-examples"}
"""Metric names a snapshot may hold: the egress whitelist (what the server may see anyway) plus the
round's peak GPU memory, which stays at the site."""
WRITE_EVERY_S = 5.0
LOG_EVERY_S = 30.0


def snapshot_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / SNAPSHOT


def read_snapshot(cache_dir: str | Path) -> dict[str, Any]:
    """The snapshot, or an empty one when there is none yet (or it is unreadable)."""
    path = snapshot_path(cache_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _whitelisted(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k in EXPORTED and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class RoundProgress:
    """Writes the site's snapshot as one round of local training goes on.

    Args:
        cache_dir: the site's cache folder (the snapshot goes to ``metrics/site_metrics.json`` there).
        server_round: the round being trained. steps: its planned optimizer steps.
        every_s: at most one write per this many seconds while training (the end is always written).
    """

    def __init__(self, cache_dir: str | Path, server_round: int, steps: int, every_s: float = WRITE_EVERY_S) -> None:
        self.cache_dir = Path(cache_dir)
        self.every_s = every_s
        self.last_write = 0.0
        self.state = read_snapshot(cache_dir)
        self.state.setdefault("totals", {})
        self.state.update(round=server_round, training=1, step=0, steps=steps, latest=self.state.get("latest", {}))
        self.last_log = time.monotonic()
        self._write()

    def _write(self) -> None:
        self.state["updated"] = time.time()
        self.last_write = time.monotonic()
        try:
            write_atomic(snapshot_path(self.cache_dir), json.dumps(self.state, sort_keys=True))
        except OSError as err:  # metrics must never stop a round
            log.warning("could not write the metrics snapshot %s: %s", snapshot_path(self.cache_dir), err)

    def step(self, step: int, running: dict[str, float]) -> None:
        """After optimizer step ``step`` (1-based) with the round's running aggregates."""
        self.state["step"] = step
        self.state["latest"] = {**self.state["latest"], **_whitelisted(running)}
        if time.monotonic() - self.last_write >= self.every_s:
            self._write()
        if time.monotonic() - self.last_log >= LOG_EVERY_S or step == self.state["steps"]:
            self.last_log = time.monotonic()
            log.info("round %s: step %d/%d, %.2f volumes/s, loss %.4f, data wait %.0f%%", self.state["round"], step,
                     self.state["steps"], running.get("volumes-per-second", 0.0), running.get("train-loss", float("nan")),
                     100 * running.get("data-wait-fraction", 0.0))

    @classmethod
    def mark_failed(cls, cache_dir: str | Path, server_round: int) -> None:
        """Record a round that failed (whatever was written while it ran stays as it was)."""
        state = read_snapshot(cache_dir)
        progress = cls.__new__(cls)
        progress.cache_dir, progress.every_s, progress.last_write = Path(cache_dir), WRITE_EVERY_S, 0.0
        progress.state = {**state, "round": server_round, "totals": state.get("totals", {}),
                          "latest": state.get("latest", {})}
        progress.finish(None, ok=False)

    def finish(self, metrics: dict[str, float] | None, ok: bool = True) -> None:
        """The round ended (``ok=False``: it failed); cumulative counters move on."""
        totals = self.state["totals"]
        totals["rounds_completed" if ok else "rounds_failed"] = totals.get("rounds_completed" if ok else "rounds_failed", 0) + 1
        if ok and metrics:
            totals["local_steps"] = totals.get("local_steps", 0) + float(metrics.get("local-steps", 0))
            totals["volumes"] = totals.get("volumes", 0) + float(metrics.get("volumes", 0))
            self.state["latest"] = {**self.state["latest"], **_whitelisted(metrics)}
        self.state["training"] = 0
        self._write()


def _ingest_counts(cache_dir: Path) -> dict[str, int]:
    try:
        files = json.loads((cache_dir / INGEST_REPORT).read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError):
        return {}
    return {k: int(files[k]) for k in ("ingested", "skipped", "failed") if isinstance(files.get(k), int)}


class SiteCollector:
    """A prometheus-client collector that turns the site's snapshot into metric families at each scrape.

    Args:
        cache_dir: the site's cache folder.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)

    def describe(self) -> list:
        return []  # collected lazily: the families depend on the snapshot

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = read_snapshot(self.cache_dir)
        latest, totals = state.get("latest", {}), state.get("totals", {})

        def gauge(name: str, doc: str, value: float | None):
            family = GaugeMetricFamily(name, doc)
            if value is not None:
                family.add_metric([], float(value))
            return family

        yield gauge("fedvlp_site_up", "1: the exporter reads this site's cache folder", 1.0 if self.cache_dir.is_dir() else 0.0)
        yield gauge("fedvlp_site_round", "the latest federated round this site trained (or is training)", state.get("round", 0))
        yield gauge("fedvlp_site_training", "1 while a round of local training runs", state.get("training", 0))
        yield gauge("fedvlp_site_step", "optimizer steps done in the current or last round", state.get("step", 0))
        yield gauge("fedvlp_site_steps_planned", "optimizer steps of the current or last round", state.get("steps", 0))
        yield gauge("fedvlp_site_last_update_timestamp_seconds", "when the training process last wrote its snapshot",
                    state.get("updated", 0))
        rounds = CounterMetricFamily("fedvlp_site_rounds", "rounds of local training by outcome", labels=["outcome"])
        rounds.add_metric(["completed"], float(totals.get("rounds_completed", 0)))
        rounds.add_metric(["failed"], float(totals.get("rounds_failed", 0)))
        yield rounds
        yield CounterMetricFamily("fedvlp_site_local_steps", "optimizer steps trained in completed rounds",
                                  value=float(totals.get("local_steps", 0)))
        yield CounterMetricFamily("fedvlp_site_volumes", "volumes trained on in completed rounds",
                                  value=float(totals.get("volumes", 0)))
        yield gauge("fedvlp_site_volumes_per_second", "local training throughput (volumes/s)",
                    latest.get("volumes-per-second"))
        yield gauge("fedvlp_site_data_wait_fraction", "fraction of training time spent waiting for data",
                    latest.get("data-wait-fraction"))
        yield gauge("fedvlp_site_train_loss", "the weighted total training loss (mean over the round so far)",
                    latest.get("train-loss"))
        losses = GaugeMetricFamily("fedvlp_site_loss", "per-objective training loss (mean over the round so far)",
                                   labels=["objective"])
        for name, value in sorted(latest.items()):
            if name.startswith("loss."):
                losses.add_metric([name.split(".", 1)[1]], value)
        yield losses
        yield gauge("fedvlp_site_gpu_memory_peak_bytes", "peak GPU memory allocated by the last round (0 on CPU)",
                    latest.get("gpu-memory-peak-bytes", 0.0))
        yield gauge("fedvlp_site_dp_epsilon", "sample-level DP-SGD epsilon spent by this site so far",
                    latest.get("dp-epsilon"))
        files = GaugeMetricFamily("fedvlp_site_ingest_files", "input files of the last ingest by outcome",
                                  labels=["outcome"])
        for outcome, count in sorted(_ingest_counts(self.cache_dir).items()):
            files.add_metric([outcome], float(count))
        yield files


def serve(cache_dir: str | Path, port: int, address: str = "0.0.0.0"):
    """Start the exporter's HTTP server in a thread; returns (server, thread)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SiteCollector(cache_dir))
    return start_http_server(port, addr=address, registry=registry)
