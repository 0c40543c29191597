"""The site's metrics: a snapshot written as a round trains, served by a long-lived exporter."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from client.metrics import RoundProgress, SiteCollector, read_snapshot, snapshot_path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site_yaml(tmp_path, writer, **overrides):
    (tmp_path / "dicom").mkdir(exist_ok=True)
    (tmp_path / "reports.csv").write_text("AccessionNumber,ReportText\n")
    return writer(tmp_path, **overrides)


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(port)


def samples(cache_dir) -> dict:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SiteCollector(cache_dir))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_progress_snapshots_become_metrics_and_counters_accumulate(tmp_path):
    (tmp_path / "ingest_report.json").write_text(json.dumps({"files": {"ingested": 40, "skipped": 3, "failed": 1}}))
    progress = RoundProgress(tmp_path, server_round=1, steps=10, every_s=0.0)
    progress.step(4, {"train-loss": 3.0, "loss.clip": 2.0, "volumes-per-second": 5.0, "data-wait-fraction": 0.1})
    s = samples(tmp_path)
    assert s[("fedvlp_site_training", ())] == 1 and s[("fedvlp_site_step", ())] == 4
    assert s[("fedvlp_site_steps_planned", ())] == 10 and s[("fedvlp_site_loss", (("objective", "clip"),))] == 2.0
    progress.finish({"train-loss": 2.5, "loss.clip": 1.5, "local-steps": 10, "volumes": 40,
                     "gpu-memory-peak-bytes": 2.0e9, "dp-epsilon": 0.7})
    RoundProgress(tmp_path, server_round=2, steps=10).finish({"local-steps": 10, "volumes": 40})
    RoundProgress.mark_failed(tmp_path, 3)
    s = samples(tmp_path)
    assert s[("fedvlp_site_round", ())] == 3 and s[("fedvlp_site_training", ())] == 0
    assert s[("fedvlp_site_rounds_total", (("outcome", "completed"),))] == 2
    assert s[("fedvlp_site_rounds_total", (("outcome", "failed"),))] == 1
    assert s[("fedvlp_site_local_steps_total", ())] == 20 and s[("fedvlp_site_volumes_total", ())] == 80
    assert s[("fedvlp_site_gpu_memory_peak_bytes", ())] == 2.0e9 and s[("fedvlp_site_dp_epsilon", ())] == 0.7
    assert s[("fedvlp_site_ingest_files", (("outcome", "failed"),))] == 1


def test_only_whitelisted_aggregates_reach_the_snapshot(tmp_path):
    progress = RoundProgress(tmp_path, server_round=1, steps=2)
    progress.finish({"train-loss": 1.0, "study_uid": 1.2, "loss.clip": float("nan"), "cache": "/data/x",
                     "volumes": 4})
    latest = read_snapshot(tmp_path)["latest"]
    assert latest == {"train-loss": 1.0, "volumes": 4.0}


def test_a_missing_or_broken_snapshot_gives_empty_metrics_not_an_error(tmp_path):
    assert samples(tmp_path)[("fedvlp_site_round", ())] == 0
    snapshot_path(tmp_path).parent.mkdir(parents=True)
    snapshot_path(tmp_path).write_text("{not json")
    assert samples(tmp_path)[("fedvlp_site_rounds_total", (("outcome", "completed"),))] == 0


def test_fedvlp_site_metrics_serves_the_snapshot(tmp_path, site_yaml_writer):
    config = site_yaml(tmp_path, site_yaml_writer, metrics={"port": free_port(), "address": "127.0.0.1"})
    from client.site_config import load_site_config

    cfg = load_site_config(config)
    RoundProgress(cfg.cache_dir, server_round=7, steps=3).finish({"local-steps": 3, "volumes": 6})
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "metrics", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(cfg.metrics.port, proc)
        text = urllib.request.urlopen(f"http://127.0.0.1:{cfg.metrics.port}/metrics", timeout=5).read().decode()
        assert "fedvlp_site_round 7.0" in text and "fedvlp_site_volumes_total 6.0" in text
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0  # SIGTERM stops it cleanly


def test_fedvlp_site_metrics_without_a_port_says_what_to_set(tmp_path, site_yaml_writer, capsys):
    from client.cli import main

    assert main(["metrics", "--config", str(site_yaml(tmp_path, site_yaml_writer))]) == 2
    assert "metrics.port" in capsys.readouterr().err


def test_the_exporter_needs_no_pacs_export(tmp_path, site_yaml_writer):
    """Beside the SuperNode it sees the cache only: the export paths of the site YAML are not checked."""
    import shutil

    from client.site_config import SiteConfigError, load_site_config

    config = site_yaml(tmp_path, site_yaml_writer, metrics={"port": 9101})
    shutil.rmtree(tmp_path / "dicom")
    assert load_site_config(config, require_data=False).metrics.port == 9101
    try:
        load_site_config(config)
    except SiteConfigError as err:
        assert "data.dicom_root" in str(err)
    else:
        raise AssertionError("a missing DICOM export should be refused for ingest and training")
