"""The server's Prometheus exporter: rounds, participation, traffic, privacy spent and evaluation scores.

The ServerApp lives as long as its run, so it serves its own metrics over HTTP while the run goes on
(run config ``metrics-port``; 0 = off). Each round's history record (what ``history.jsonl`` gets) is
turned into metrics by :meth:`ServerMetrics.observe_round`, so the dashboard and the history never
disagree. Everything here is an aggregate: no site address, path or identifier becomes a label.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)
SITE_STATES = ("sampled", "replied", "valid", "rejected", "errors")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class ServerMetrics:
    """The server's metrics in a registry of their own.

    Args:
        registry: where to register (a fresh :class:`CollectorRegistry` by default, so that runs in one
            process, e.g. tests, never collide).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Info("fedvlp_server_run", "the run's recipe, preset, strategy and DP mode", registry=r)
        self.rounds_planned = Gauge("fedvlp_server_rounds_planned", "rounds the run is set to", registry=r)
        self.round = Gauge("fedvlp_server_round", "the latest finished round", registry=r)
        self.round_in_progress = Gauge("fedvlp_server_round_in_progress", "the round running now (0: none)",
                                       registry=r)
        self.rounds = Counter("fedvlp_server_rounds", "finished rounds by outcome", ["outcome"], registry=r)
        self.sites = Gauge("fedvlp_server_round_sites", "sites of the latest round by state", ["state"], registry=r)
        self.replies = Counter("fedvlp_server_replies", "training replies by outcome", ["outcome"], registry=r)
        self.round_seconds = Gauge("fedvlp_server_round_seconds", "wall time of the latest round", registry=r)
        self.round_duration = Histogram("fedvlp_server_round_duration_seconds", "wall time of rounds", registry=r,
                                        buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, math.inf))
        self.aggregation_seconds = Gauge("fedvlp_server_aggregation_seconds",
                                         "time to check and aggregate the latest round's replies", registry=r)
        self.overhead_seconds = Gauge("fedvlp_server_round_overhead_seconds",
                                      "latest round's wall time minus evaluation minus the slowest site's training",
                                      registry=r)
        self.slowest_site = Gauge("fedvlp_server_slowest_site_train_seconds",
                                  "the slowest site's local training time in the latest round", registry=r)
        self.evaluation_seconds = Gauge("fedvlp_server_evaluation_seconds", "time of the latest central evaluation",
                                        registry=r)
        self.bytes_received = Counter("fedvlp_server_received_bytes", "array bytes received from sites",
                                      registry=r)
        self.bytes_sent = Counter("fedvlp_server_sent_bytes", "array bytes sent to sites", registry=r)
        self.lr = Gauge("fedvlp_server_learning_rate", "local learning rate sent in the latest round", registry=r)
        self.train_loss = Gauge("fedvlp_server_train_loss", "sites' weighted mean training loss, latest round",
                                ["objective"], registry=r)
        self.throughput = Gauge("fedvlp_server_site_volumes_per_second",
                                "sites' weighted mean local throughput, latest round", registry=r)
        self.epsilon = Gauge("fedvlp_server_dp_epsilon", "client-level DP epsilon spent so far", registry=r)
        self.delta = Gauge("fedvlp_server_dp_delta", "the delta of the client-level DP epsilon", registry=r)
        self.evaluation = Gauge("fedvlp_server_evaluation", "latest central evaluation scores", ["metric"],
                                registry=r)
        self.server = None

    def start(self, port: int, address: str = "0.0.0.0") -> None:
        """Serve the metrics over HTTP (in a thread) until :meth:`stop`; a port in use costs the run only its
        metrics (logged), never the run."""
        try:
            self.server, _ = start_http_server(port, addr=address, registry=self.registry)
        except OSError as err:
            log.warning("cannot serve Prometheus metrics on %s:%d (%s); is another run using metrics-port %d? "
                        "This run goes on without an exporter.", address, port, err, port)
            return
        log.info("Prometheus metrics on http://%s:%d/metrics", address, port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def run_started(self, settings) -> None:
        self.info.info({"recipe": str(settings.recipe), "preset": str(settings.preset),
                        "strategy": str(settings.strategy), "dp": str(settings.dp)})
        self.rounds_planned.set(settings.rounds)
        for state in SITE_STATES:
            self.sites.labels(state).set(0)
        for outcome in ("aggregated", "skipped"):
            self.rounds.labels(outcome)
        for outcome in ("valid", "rejected", "error"):
            self.replies.labels(outcome)

    def round_started(self, server_round: int) -> None:
        self.round_in_progress.set(server_round)

    def observe_round(self, record: dict[str, Any]) -> None:
        """Update every metric from one round's history record (see :func:`server.federation.run_federation`)."""
        self.round.set(record["round"])
        self.round_in_progress.set(0)
        self.rounds.labels("skipped" if record.get("skipped") else "aggregated").inc()
        part = record.get("participation") or {}
        counts = {"sampled": part.get("sampled", 0), "replied": part.get("replied", 0),
                  "valid": part.get("valid", 0), "rejected": len(part.get("rejected", [])),
                  "errors": len(part.get("errors", []))}
        for state, count in counts.items():
            self.sites.labels(state).set(count)
        self.replies.labels("valid").inc(counts["valid"])
        self.replies.labels("rejected").inc(counts["rejected"])
        self.replies.labels("error").inc(counts["errors"])
        for gauge, key in ((self.round_seconds, "wall_seconds"), (self.aggregation_seconds, "aggregation_seconds"),
                           (self.overhead_seconds, "overhead_seconds"), (self.evaluation_seconds, "evaluation_seconds"),
                           (self.lr, "lr")):
            if (value := _number(record.get(key))) is not None:
                gauge.set(value)
        if (wall := _number(record.get("wall_seconds"))) is not None:
            self.round_duration.observe(wall)
        site_seconds = [s["train-seconds"] for s in part.get("sites", []) if _number(s.get("train-seconds"))]
        if site_seconds:
            self.slowest_site.set(max(site_seconds))
        self.bytes_received.inc(record.get("bytes_received", 0))
        self.bytes_sent.inc(record.get("bytes_sent_per_site", 0) * counts["sampled"])
        train = record.get("train") or {}
        if (value := _number(train.get("train-loss"))) is not None:
            self.train_loss.labels("total").set(value)
        for name, value in train.items():
            if name.startswith("loss.") and (value := _number(value)) is not None:
                self.train_loss.labels(name.split(".", 1)[1]).set(value)
        if (value := _number(train.get("volumes-per-second"))) is not None:
            self.throughput.set(value)
        privacy = record.get("privacy") or {}
        if (value := _number(privacy.get("epsilon"))) is not None:
            self.epsilon.set(value)
            self.delta.set(_number(privacy.get("delta")) or 0.0)
        for name, value in (record.get("evaluation") or {}).items():
            if (value := _number(value)) is not None:
                self.evaluation.labels(name).set(value)
