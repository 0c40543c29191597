"""End to end on Flower's Deployment Engine: a real SuperLink and SuperNodes on loopback, `flwr run`.

Sites are small synthetic exports ingested with `fedvlp-site`; the model is the tiny preset with a
tiny random text encoder (a model YAML passed as the run's preset), so a round takes seconds of
training and the rest is Flower's real machinery.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from client.cli import main as site_cli
from client.supernode import live_processes
from server.checkpoint import RunFolder
from server.local_federation import LocalFederation, free_port, processes_using

REPO = Path(__file__).resolve().parents[2]
TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three small ingested synthetic sites and a model YAML for them."""
    root = tmp_path_factory.mktemp("cohort")
    model_yaml = root / "model.yaml"
    model_yaml.write_text(yaml.safe_dump({"preset": "tiny", "text": {"random_init": TINY_TEXT, "max_length": 64},
                                          "decoder": {"max_length": 64}}))
    sites = []
    for i, profile in enumerate(["general", "cardio", "pulmonary"]):
        folder = root / f"site{i}"
        assert site_cli(["synth", "--out", str(folder), "--profile", profile, "--studies", "4", "--seed", str(i)]) == 0
        config = {"site_id": f"site{i}", "model": str(model_yaml), "cache_dir": "cache",
                  "data": {"dicom_root": "dicom", "nifti_manifest": "nifti_manifest.csv", "reports": {"path": "reports.csv"}},
                  "compute": {"batch_size": 2, "workers": 0, "threads": 1},
                  # these tests are not about which app versions run (tests/e2e/test_security.py is): any
                  "privacy": {"allowed_fab_hashes": "any"}}
        (folder / "site.yaml").write_text(yaml.safe_dump(config))
        assert site_cli(["ingest", "--config", str(folder / "site.yaml"), "--quiet", "--workers", "0"]) == 0
        sites.append(folder / "site.yaml")
    return {"sites": sites, "model": str(model_yaml), "root": root}


def run_config(cohort, run_dir: Path, rounds: int, **extra) -> dict:
    return {"recipe": "tiny", "run-dir": str(run_dir), "num-rounds": rounds, "local-steps": 1,
            "min-replies": 2, "min-available": 2, "max-update-norm": 1e6, **extra}


def preset_override(cohort, run_dir: Path) -> Path:
    """A recipe file naming the cohort's model YAML as preset (run configs carry scalars only)."""
    recipe = yaml.safe_load((REPO / "server" / "recipes" / "tiny.yaml").read_text())
    recipe.update(preset=cohort["model"], round_timeout_s=120)
    path = run_dir.parent / f"{run_dir.name}_recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def app_snapshot(folder: Path) -> Path:
    """A copy of this app's files: what ``flwr run`` sends stays the same for the whole test, whatever is
    edited in the checkout meanwhile (and what a site approves is what then runs)."""
    import shutil

    folder.mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", folder)
    for package in ("client", "server", "shared_models"):
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def final_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    latest = RunFolder(run_dir).latest()
    assert latest is not None, f"no checkpoint in {run_dir}"
    return latest.arrays


def scrape(port: int) -> dict[tuple[str, tuple], float] | None:
    """``{(sample name, sorted labels): value}`` from a Prometheus exporter, or None if it does not answer."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples} | {("_text", ()): text}


def test_two_rounds_on_two_supernodes_watched_by_both_exporters(cohort, tmp_path):
    run_dir = tmp_path / "run"
    recipe = preset_override(cohort, run_dir)
    server_port = free_port()
    config = run_config(cohort, run_dir, 2, recipe=str(recipe), **{"metrics-port": server_port,
                                                                 "metrics-address": "127.0.0.1"})
    server_seen = None
    with LocalFederation(tmp_path / "fed", cohort["sites"][:2]) as fed:
        site_ports = [fed.start_site_exporter(i) for i in range(2)]
        run = fed.run_async(REPO, config)
        deadline = time.time() + 600
        while run.poll() is None:  # the ServerApp's exporter lives as long as the run: scrape it meanwhile
            assert time.time() < deadline, "the run did not finish"
            sample = scrape(server_port)
            if sample and sample.get(("fedvlp_server_round", ()), 0) >= 1:
                server_seen = sample
            time.sleep(0.3)
        sites_seen = [scrape(port) for port in site_ports]
    log = (tmp_path / "fed" / "logs" / "run.log").read_text()
    assert run.returncode == 0, log[-3000:]
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["participation"]["valid"] == 2 and not h["skipped"] for h in history)
    assert all(h["train"]["loss.clip"] > 0 for h in history)
    start = RunFolder(run_dir).latest()
    assert (run_dir / "checkpoints" / "round_0002" / "global.safetensors").is_file()
    from server.checkpoint import load_arrays_file

    initial = load_arrays_file(run_dir / "checkpoints" / "round_0000" / "global.safetensors")
    changed = [k for k in initial if not np.array_equal(initial[k], start.arrays[k])]
    assert len(changed) > len(initial) // 2  # the global model trained

    assert server_seen is not None, "the server's exporter never showed a finished round"
    s = server_seen
    assert s[("fedvlp_server_rounds_planned", ())] == 2 and s[("fedvlp_server_round", ())] >= 1
    assert s[("fedvlp_server_round_sites", (("state", "valid"),))] == 2
    assert s[("fedvlp_server_round_sites", (("state", "rejected"),))] == 0
    assert s[("fedvlp_server_rounds_total", (("outcome", "aggregated"),))] >= 1
    assert s[("fedvlp_server_received_bytes_total", ())] >= 2 * history[0]["bytes_sent_per_site"]
    assert 0 < s[("fedvlp_server_round_seconds", ())] < 600 and s[("fedvlp_server_aggregation_seconds", ())] >= 0
    assert s[("fedvlp_server_train_loss", (("objective", "clip"),))] > 0
    for i, site in enumerate(sites_seen):
        assert site is not None, f"site {i}'s exporter did not answer"
        assert site[("fedvlp_site_round", ())] == 2 and site[("fedvlp_site_training", ())] == 0
        assert site[("fedvlp_site_rounds_total", (("outcome", "completed"),))] == 2
        assert site[("fedvlp_site_rounds_total", (("outcome", "failed"),))] == 0
        assert site[("fedvlp_site_local_steps_total", ())] == 2 and site[("fedvlp_site_volumes_total", ())] > 0
        assert site[("fedvlp_site_volumes_per_second", ())] > 0
        assert 0 <= site[("fedvlp_site_data_wait_fraction", ())] <= 1
        assert site[("fedvlp_site_loss", (("objective", "clip"),))] > 0
        assert site[("fedvlp_site_gpu_memory_peak_bytes", ())] == 0  # CPU
        assert site[("fedvlp_site_ingest_files", (("outcome", "ingested"),))] > 0
        text = site[("_text", ())]  # aggregates only: no path, site name or study identifier
        assert str(cohort["root"]) not in text and f"site{i}" not in text and "SYN-" not in text


def registrations(fed: LocalFederation) -> int:
    log = fed.logs / "register.log"
    return log.read_text(errors="replace").count("registered successfully") if log.is_file() else 0


def listed_runs(fed: LocalFederation) -> list[dict]:
    out = subprocess.run(["flwr", "ls", "local-deployment", "--format", "json"], env=fed.env, cwd=fed.workdir,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)["runs"]


def test_a_superlink_restarted_mid_run_keeps_its_sites_and_the_run_resumes_to_the_uninterrupted_result(cohort, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    app = app_snapshot(tmp_path / "app")  # both runs run the same code
    with LocalFederation(tmp_path / "fed_a", cohort["sites"][:2]) as fed:
        done = fed.run(app, run_config(cohort, straight, 4, recipe=str(preset_override(cohort, straight)), seed=7))
        assert done.returncode == 0
    assert RunFolder(straight).latest().round == 4  # `flwr run --stream` exits 0 even when the ServerApp fails
    recipe = preset_override(cohort, resumed)
    config = run_config(cohort, resumed, 4, recipe=str(recipe), seed=7)
    fed = LocalFederation(tmp_path / "fed_b", cohort["sites"][:2])
    with fed:
        run = fed.run_async(app, config)
        deadline = time.time() + 600
        while not (resumed / "checkpoints" / "round_0002" / "state.json").is_file():
            assert time.time() < deadline and run.poll() is None, "round 2 never completed"
            time.sleep(0.5)
        sites, registered = [node.pid for node in fed.nodes], registrations(fed)
        old_superlink = fed.superlink.pid
        fed.restart_superlink()  # SIGKILL during round 3: the SuperLink's ServerApp dies with it; its database stays
        assert live_processes(group=old_superlink) == []
        try:  # the operator's `flwr run --stream` of the killed run
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
        assert RunFolder(resumed).latest().round == 2
        again = fed.run(app, config, log_name="run_again")  # the same run-dir: resumes from its checkpoint
        assert again.returncode == 0, (fed.logs / "run_again.log").read_text()[-3000:]
        assert [node.pid for node in fed.nodes] == sites and all(node.poll() is None for node in fed.nodes)
        assert registrations(fed) == registered == 2  # the sites were not registered again
        assert len(listed_runs(fed)) == 2  # the restarted SuperLink still knows the first run
        groups = [fed.superlink.pid, *(node.pid for node in fed.nodes)]
    assert all(live_processes(group=g) == [] for g in groups)
    assert processes_using(fed.addresses()) == []
    assert "resuming" in (fed.logs / "run_again.log").read_text()
    a, b = final_arrays(straight), final_arrays(resumed)
    assert RunFolder(resumed).latest().round == 4
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    assert worst < 1e-5, worst
    rounds = [json.loads(line)["round"] for line in (resumed / "history.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]


def test_a_killed_site_is_skipped_and_rejoins(cohort, tmp_path):
    run_dir = tmp_path / "run"
    recipe = preset_override(cohort, run_dir)
    # the dead site's message ends round 2 when the SuperLink marks it offline (two missed heartbeats, about
    # 60 s) or at the timeout; a timeout well above a live site's round keeps a loaded CI machine's slow
    # ClientApp start from being counted as a dead site
    config = run_config(cohort, run_dir, 4, recipe=str(recipe), **{"round-timeout-s": 120})
    with LocalFederation(tmp_path / "fed", cohort["sites"]) as fed:
        run = fed.run_async(REPO, {**config, "min-available": 3})
        history = run_dir / "history.jsonl"
        deadline = time.time() + 600
        while not history.is_file():  # round 1 done: kill site 2 as round 2 starts
            assert time.time() < deadline and run.poll() is None, "round 1 never completed"
            time.sleep(0.2)
        fed.kill_node(2, signal.SIGKILL)
        while len(history.read_text().splitlines()) < 2:
            assert time.time() < deadline and run.poll() is None, "round 2 never completed"
            time.sleep(0.5)
        fed.start_node(2)  # the site comes back
        assert run.wait(timeout=900) == 0
    rounds = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[0]["participation"]["valid"] == 3
    assert rounds[1]["participation"]["valid"] == 2 and not rounds[1]["skipped"]  # went on without the dead site
    assert rounds[-1]["participation"]["valid"] == 3  # the restarted site took part again


def test_a_site_restarted_right_after_a_crash_rejoins(cohort, tmp_path):
    """Within a minute of a crash the SuperLink still lists the old session as online and refuses to
    activate the site again; `fedvlp-site supernode` waits that out instead of exiting."""
    with LocalFederation(tmp_path / "fed", cohort["sites"][:1]) as fed:
        superlink_log, node_log = fed.logs / "superlink.log", fed.logs / "supernode_0.log"

        def activations() -> int:
            return superlink_log.read_text(errors="replace").count("Activated node_id=")

        deadline = time.time() + 120
        while activations() < 1:
            assert time.time() < deadline, "the SuperNode never came online"
            time.sleep(0.2)
        fed.kill_node(0, signal.SIGKILL)
        fed.start_node(0)  # at once: its old session is online for up to 60 s more
        deadline = time.time() + 240
        while activations() < 2:
            assert time.time() < deadline and fed.nodes[0].poll() is None, "the restarted site never rejoined"
            time.sleep(1)
        log = node_log.read_text(errors="replace")
        assert "refused to activate" in log  # it was refused first, and retried
        assert fed.nodes[0].poll() is None  # and it is still running
