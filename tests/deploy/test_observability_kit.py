"""deploy/: the Grafana dashboard and the Prometheus scrape configs match what the exporters really export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCRAPE_LABELS = {"job", "instance", "site"}  # added by Prometheus and the static configs, not the exporters


def exposition_labels(text: str) -> dict[str, set[str]]:
    """Sample name -> its label names, from Prometheus text exposition."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.fixture(scope="module")
def server_exposed() -> dict[str, set[str]]:
    from server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.run_started(SimpleNamespace(recipe="colipri", preset="colipri", strategy="fedavg", dp="server", rounds=10))
    metrics.round_started(2)
    metrics.observe_round({  # as server/federation.py builds it
        "round": 2, "lr": 1e-4, "skipped": False,
        "participation": {"sampled": 3, "replied": 3, "valid": 2, "rejected": [{"node": 9, "reason": "update norm"}],
                          "errors": [], "sites": [{"node": 7, "num-examples": 1, "train-seconds": 40.0},
                                                  {"node": 8, "num-examples": 1, "train-seconds": 52.5}]},
        "train": {"train-loss": 1.5, "loss.clip": 0.9, "loss.mae": 0.6, "volumes-per-second": 3.2, "local-steps": 50},
        "bytes_received": 2_000_000, "bytes_sent_per_site": 1_000_000, "aggregation_seconds": 0.4,
        "privacy": {"epsilon": 1.2, "delta": 1e-5},
        "evaluation": {"zero_shot.macro_auroc": 0.6, "probe.macro_auroc": 0.7, "validation.total": 2.1},
        "evaluation_seconds": 12.0, "wall_seconds": 70.0, "overhead_seconds": 5.0,
    })
    return exposition_labels(generate_latest(metrics.registry).decode())


@pytest.fixture(scope="module")
def site_exposed(tmp_path_factory) -> dict[str, set[str]]:
    from client.metrics import EXPORTED, RoundProgress, SiteCollector
    from shared_models.cohort import INGEST_REPORT

    cache = tmp_path_factory.mktemp("cache")
    (cache / INGEST_REPORT).write_text(json.dumps({"files": {"ingested": 40, "skipped": 2, "failed": 1}}))
    progress = RoundProgress(cache, 1, 10)
    progress.step(5, {"train-loss": 1.2, "loss.clip": 0.8, "loss.mae": 0.4, "data-wait-fraction": 0.1})
    done = {"train-loss": 1.1, "loss.clip": 0.7, "loss.mae": 0.4, "volumes-per-second": 2.5,
            "data-wait-fraction": 0.05, "gpu-memory-peak-bytes": 3e9, "dp-epsilon": 0.8, "local-steps": 10,
            "volumes": 40}
    assert set(done) <= EXPORTED  # the snapshot keeps these
    progress.finish(done)
    RoundProgress(cache, 2, 10).finish(None, ok=False)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SiteCollector(cache))
    return exposition_labels(generate_latest(registry).decode())


def dashboard_panels() -> list[dict]:
    board = json.loads((DEPLOY / "grafana" / "fedvlp-dashboard.json").read_text())
    flat = []
    for panel in board["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return flat


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def test_the_exporters_export_what_the_dashboard_needs(server_exposed, site_exposed):
    # the fixtures themselves must produce samples, or the checks below would pass on nothing
    assert {"fedvlp_server_rounds_total", "fedvlp_server_run_info", "fedvlp_server_round_duration_seconds_bucket",
            "fedvlp_server_evaluation"} <= set(server_exposed)
    assert {"fedvlp_site_rounds_total", "fedvlp_site_loss", "fedvlp_site_ingest_files",
            "fedvlp_site_gpu_memory_peak_bytes"} <= set(site_exposed)


def test_the_dashboard_parses_and_every_panel_queries_prometheus():
    board = json.loads((DEPLOY / "grafana" / "fedvlp-dashboard.json").read_text())
    assert 36 <= board["schemaVersion"] <= 41 and board["uid"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert len(panels) >= 15
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["expr"].count("{") == target["expr"].count("}"), target["expr"]


def test_every_metric_the_dashboard_queries_is_exported_with_those_labels(server_exposed, site_exposed):
    exposed = {**server_exposed, **site_exposed}
    used = set()
    for expr in dashboard_exprs():
        for name in re.findall(r"fedvlp_[a-z0-9_]+", expr):
            assert name in exposed, f"{name} (in {expr!r}) is not exported; exported: {sorted(exposed)}"
            used.add(name)
        for name, matchers in re.findall(r"(fedvlp_[a-z0-9_]+)\{([^}]*)\}", expr):
            labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
            assert labels <= exposed[name] | SCRAPE_LABELS, f"{name} has no label {labels - exposed[name]}"
        for clause in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            names = set(re.findall(r"fedvlp_[a-z0-9_]+", expr))
            for label in (s.strip() for s in clause.split(",")):
                assert any(label in exposed[n] | SCRAPE_LABELS for n in names), f"by ({label}) in {expr!r}"
    # and every exported metric has a panel (a new metric needs one)
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exposed if not n.endswith("_created")}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert families - shown == set()


def test_the_panels_the_operators_asked_for_are_there():
    exprs = "\n".join(dashboard_exprs())
    for needed in ("fedvlp_server_round", "fedvlp_server_rounds_planned", "fedvlp_server_round_sites",
                   "fedvlp_server_aggregation_seconds", "fedvlp_server_round_overhead_seconds",
                   "rate(fedvlp_server_received_bytes_total", "rate(fedvlp_server_sent_bytes_total",
                   "fedvlp_server_dp_epsilon", "zero_shot.macro_auroc", "probe.macro_auroc", "validation",
                   "fedvlp_server_train_loss", "fedvlp_site_volumes_per_second", "fedvlp_site_loss",
                   "fedvlp_site_data_wait_fraction", "fedvlp_site_gpu_memory_peak_bytes", "fedvlp_site_dp_epsilon",
                   "fedvlp_site_training", "fedvlp_site_step", "fedvlp_site_rounds_total", "fedvlp_site_ingest_files"):
        assert needed in exprs, needed
    site_exprs = [e for e in dashboard_exprs() if "fedvlp_site_" in e and "time()" not in e]
    assert all('site=~"$site"' in e for e in site_exprs)  # the site selector applies to every site panel


def test_grafana_provisioning_loads_the_dashboard_from_the_folder_compose_mounts():
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    board = json.loads((DEPLOY / "grafana" / "fedvlp-dashboard.json").read_text())
    default = next(v for v in board["templating"]["list"] if v["name"] == "datasource")["current"]["value"]
    assert default == source["uid"]
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/fedvlp.yml").read_text())["providers"]
    folder = providers[0]["options"]["path"]
    grafana = yaml.safe_load((DEPLOY / "compose" / "server.yml").read_text())["services"]["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"]}
    assert mounts[f"{folder}/fedvlp-dashboard.json"] == "../grafana/fedvlp-dashboard.json"
    assert mounts["/etc/grafana/provisioning"] == "../grafana/provisioning"
    for source_path in mounts.values():
        if source_path.startswith("../"):
            assert (DEPLOY / "compose" / source_path).resolve().exists(), source_path


def scrape_targets(path: Path) -> dict[str, list[tuple[str, int, dict]]]:
    config = yaml.safe_load(path.read_text())
    assert config["global"]["scrape_interval"] == "15s"
    jobs = {}
    for job in config["scrape_configs"]:
        jobs[job["job_name"]] = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1]), static.get("labels", {}))
                                 for static in job["static_configs"] for t in static["targets"]]
    return jobs


def published(service: dict) -> set[int]:
    """Container ports of a compose service (ports and expose)."""
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", []) + service.get("expose", [])}


def test_the_scrape_configs_target_the_ports_the_compose_files_and_the_site_yaml_use():
    server = yaml.safe_load((DEPLOY / "compose" / "server.yml").read_text())["services"]
    site = yaml.safe_load((DEPLOY / "compose" / "site.yml").read_text())["services"]
    example_site = yaml.safe_load((REPO / "site_configs" / "example-site.yaml").read_text())
    site_port = example_site["metrics"]["port"]
    assert site_port in published(site["site-exporter"])

    jobs = scrape_targets(DEPLOY / "prometheus" / "prometheus.yml")
    assert set(jobs) == {"fedvlp-server", "fedvlp-sites"}
    [(host, port, _)] = jobs["fedvlp-server"]
    assert host == "superlink" and port in published(server["superlink"])  # the ServerApp runs in its container
    assert port != 9093 and jobs["fedvlp-sites"]
    for _, port, labels in jobs["fedvlp-sites"]:
        assert port == site_port and labels.get("site")  # the dashboard groups by the site label

    local = scrape_targets(DEPLOY / "prometheus" / "site-prometheus.yml")
    assert [(h, p) for h, p, _ in local["fedvlp-sites"]] == [("site-exporter", site_port)]
    assert all(labels.get("site") for _, _, labels in local["fedvlp-sites"])
    mounted = {v.split(":")[0] for v in site["prometheus"]["volumes"]}
    assert "../prometheus/site-prometheus.yml" in mounted
    assert "../prometheus/prometheus.yml" in {v.split(":")[0] for v in server["prometheus"]["volumes"]}


def test_the_operator_guide_names_the_metrics_settings_the_code_reads():
    guide = (DEPLOY / "OPERATORS.md").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    for key in ("metrics-port", "metrics-address"):
        assert f"\n{key} = " in pyproject and key in guide
    from client.site_config import MetricsConfig  # the site YAML's metrics section

    assert "port" in MetricsConfig.__dataclass_fields__ and "metrics: {port: 9101}" in guide
