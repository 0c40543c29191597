"""The server's Prometheus exporter: a round's history record becomes metrics; it serves over HTTP."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.local_federation import free_port
from server.metrics import ServerMetrics
from server.settings import RunSettings


def samples(metrics: ServerMetrics) -> dict:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def record(server_round: int, **extra) -> dict:
    base = {
        "round": server_round, "lr": 3e-4, "skipped": False, "wall_seconds": 42.0, "aggregation_seconds": 1.5,
        "overhead_seconds": 20.0, "evaluation_seconds": 5.0, "bytes_received": 3000, "bytes_sent_per_site": 1000,
        "participation": {"sampled": 3, "replied": 3, "valid": 2, "rejected": [{"node": 7, "reason": "norm"}],
                          "errors": [], "sites": [{"train-seconds": 10.0}, {"train-seconds": 17.0}]},
        "train": {"train-loss": 2.5, "loss.clip": 1.9, "loss.mae": 0.6, "volumes-per-second": 3.0},
        "privacy": {"epsilon": 1.25, "delta": 1e-5},
        "evaluation": {"zero_shot.macro_auroc": 0.61, "probe.macro_auroc": None, "validation.total": 4.2},
    }
    return {**base, **extra}


def test_a_round_record_becomes_metrics():
    m = ServerMetrics()
    m.run_started(RunSettings(rounds=5))
    m.round_started(1)
    assert samples(m)[("fedvlp_server_round_in_progress", ())] == 1
    m.observe_round(record(1))
    m.observe_round(record(2, skipped=True, participation={"sampled": 3, "replied": 1, "valid": 1, "rejected": [],
                                                           "errors": [{"node": 1, "reason": "x"}], "sites": []}))
    s = samples(m)
    assert s[("fedvlp_server_rounds_planned", ())] == 5 and s[("fedvlp_server_round", ())] == 2
    assert s[("fedvlp_server_round_in_progress", ())] == 0
    assert s[("fedvlp_server_rounds_total", (("outcome", "aggregated"),))] == 1
    assert s[("fedvlp_server_rounds_total", (("outcome", "skipped"),))] == 1
    assert s[("fedvlp_server_round_sites", (("state", "valid"),))] == 1  # the latest round's
    assert s[("fedvlp_server_round_sites", (("state", "errors"),))] == 1
    assert s[("fedvlp_server_replies_total", (("outcome", "valid"),))] == 3
    assert s[("fedvlp_server_replies_total", (("outcome", "rejected"),))] == 1
    assert s[("fedvlp_server_replies_total", (("outcome", "error"),))] == 1
    assert s[("fedvlp_server_received_bytes_total", ())] == 6000
    assert s[("fedvlp_server_sent_bytes_total", ())] == 6000  # 1000 bytes x 3 sampled sites x 2 rounds
    assert s[("fedvlp_server_slowest_site_train_seconds", ())] == 17.0  # from round 1 (round 2 had no sites)
    assert s[("fedvlp_server_round_duration_seconds_count", ())] == 2
    assert s[("fedvlp_server_aggregation_seconds", ())] == 1.5
    assert s[("fedvlp_server_train_loss", (("objective", "clip"),))] == 1.9
    assert s[("fedvlp_server_train_loss", (("objective", "total"),))] == 2.5
    assert s[("fedvlp_server_dp_epsilon", ())] == 1.25
    assert s[("fedvlp_server_evaluation", (("metric", "zero_shot.macro_auroc"),))] == 0.61
    assert ("fedvlp_server_evaluation", (("metric", "probe.macro_auroc"),)) not in s  # undefined: not exported
    assert s[("fedvlp_server_run_info", (("dp", "none"), ("preset", "tiny"), ("recipe", "tiny"),
                                         ("strategy", "fedavg")))] == 1


def test_the_exporter_serves_over_http_and_stops():
    m = ServerMetrics()
    m.run_started(RunSettings(rounds=2))
    port = free_port()
    m.start(port, "127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "fedvlp_server_rounds_planned 2.0" in text
    finally:
        m.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_two_runs_in_one_process_do_not_collide():
    a, b = ServerMetrics(), ServerMetrics()  # each has its own registry
    a.observe_round(record(1))
    assert samples(b).get(("fedvlp_server_round", ())) == 0.0


@pytest.mark.parametrize("port", [-1, 70000])
def test_a_bad_metrics_port_is_refused(port):
    with pytest.raises(ValueError, match="metrics_port"):
        RunSettings(metrics_port=port)
