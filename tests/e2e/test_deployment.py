"""End to end on Flower's Deployment Engine: a real SuperLink and SuperNodes on loopback, `flwr run`.

Sites are small synthetic exports ingested with `fedvlp-site`; the model is the tiny preset cut to one
block per tower, with a tiny random text encoder (a model YAML passed as the run's preset), so a round
takes well under a second of training and the rest is Flower's real machinery. The cohort, the app's
files and one uninterrupted 2-round run (``reference_run``) come from tests/e2e/conftest.py, shared with
tests/e2e/test_security.py.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from client.supernode import live_processes
from server.checkpoint import RunFolder, load_arrays_file
from server.local_federation import LocalFederation, processes_using


def _helpers():
    """tests/e2e/conftest.py's helpers (tests are not a package: loaded by path)."""
    spec = importlib.util.spec_from_file_location("_e2e_helpers", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_e2e = _helpers()
run_config, preset_override, history, final_arrays = _e2e.run_config, _e2e.preset_override, _e2e.history, _e2e.final_arrays
# a SuperNode's heartbeat interval where a test waits for the SuperLink to count a dead site out (two intervals
# after its last heartbeat; Flower's default is 30 s, the SuperLink accepts 10 to 1800)
HEARTBEAT_S = 15


def counter(sample: dict | None, name: str, labels: tuple = ()) -> float:
    return (sample or {}).get((name, labels), 0.0)


def test_two_rounds_on_two_supernodes_watched_by_both_exporters(cohort, reference_run):
    ref = reference_run
    log = (ref.fed.logs / "run.log").read_text()
    assert ref.run.returncode == 0, log[-3000:]
    rounds = history(ref.run_dir)
    assert [h["round"] for h in rounds] == [1, 2]
    assert all(h["participation"]["valid"] == 2 and not h["skipped"] for h in rounds)
    assert all(h["train"]["loss.clip"] > 0 for h in rounds)
    start = RunFolder(ref.run_dir).latest()
    assert (ref.run_dir / "checkpoints" / "round_0002" / "global.safetensors").is_file()
    initial = load_arrays_file(ref.run_dir / "checkpoints" / "round_0000" / "global.safetensors")
    changed = [k for k in initial if not np.array_equal(initial[k], start.arrays[k])]
    assert len(changed) > len(initial) // 2  # the global model trained

    assert ref.server_seen is not None, "the server's exporter never showed a finished round"
    s = ref.server_seen
    assert s[("fedvlp_server_rounds_planned", ())] == 2 and s[("fedvlp_server_round", ())] >= 1
    assert s[("fedvlp_server_round_sites", (("state", "valid"),))] == 2
    assert s[("fedvlp_server_round_sites", (("state", "rejected"),))] == 0
    assert s[("fedvlp_server_rounds_total", (("outcome", "aggregated"),))] >= 1
    assert s[("fedvlp_server_received_bytes_total", ())] >= 2 * rounds[0]["bytes_sent_per_site"]
    assert 0 < s[("fedvlp_server_round_seconds", ())] < 600 and s[("fedvlp_server_aggregation_seconds", ())] >= 0
    assert s[("fedvlp_server_train_loss", (("objective", "clip"),))] > 0
    for i, (before, site) in enumerate(zip(ref.sites_before, ref.sites_after)):
        assert before is not None and site is not None, f"site {i}'s exporter did not answer"
        # the counters live in the site's cache, across runs: this run added its two rounds
        assert site[("fedvlp_site_round", ())] == 2 and site[("fedvlp_site_training", ())] == 0
        completed, failed = ("fedvlp_site_rounds_total", (("outcome", "completed"),)), \
            ("fedvlp_site_rounds_total", (("outcome", "failed"),))
        assert counter(site, *completed) - counter(before, *completed) == 2
        assert counter(site, *failed) - counter(before, *failed) == 0
        assert counter(site, "fedvlp_site_local_steps_total") - counter(before, "fedvlp_site_local_steps_total") == 2
        assert counter(site, "fedvlp_site_volumes_total") > counter(before, "fedvlp_site_volumes_total")
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


def test_a_superlink_restarted_mid_run_keeps_its_sites_and_the_run_resumes_to_the_uninterrupted_result(
        cohort, app, reference_run, tmp_path):
    """The uninterrupted result is ``reference_run``'s: the same app, sites, settings and seed, two rounds.
    Here the SuperLink is killed during round 2, after round 1's checkpoint, and the run resumed."""
    assert reference_run.run.returncode == 0 and RunFolder(reference_run.run_dir).latest().round == 2
    resumed = tmp_path / "resumed"
    recipe = preset_override(cohort, resumed)
    config = run_config(resumed, 2, recipe=str(recipe), seed=_e2e.REFERENCE_SEED)
    fed = LocalFederation(tmp_path / "fed", cohort["sites"][:2])
    with fed:
        run = fed.run_async(app, config)
        deadline = time.time() + 600
        while not (resumed / "checkpoints" / "round_0001" / "state.json").is_file():
            assert time.time() < deadline and run.poll() is None, "round 1 never completed"
            time.sleep(0.5)
        sites, registered = [node.pid for node in fed.nodes], registrations(fed)
        old_superlink = fed.superlink.pid
        fed.restart_superlink()  # SIGKILL during round 2: the SuperLink's ServerApp dies with it; its database stays
        assert live_processes(group=old_superlink) == []
        try:  # the operator's `flwr run --stream` of the killed run
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
        assert RunFolder(resumed).latest().round == 1
        again = fed.run(app, config, log_name="run_again")  # the same run-dir: resumes from its checkpoint
        assert again.returncode == 0, (fed.logs / "run_again.log").read_text()[-3000:]
        assert [node.pid for node in fed.nodes] == sites and all(node.poll() is None for node in fed.nodes)
        assert registrations(fed) == registered == 2  # the sites were not registered again
        assert len(listed_runs(fed)) == 2  # the restarted SuperLink still knows the first run
        groups = [fed.superlink.pid, *(node.pid for node in fed.nodes)]
    assert all(live_processes(group=g) == [] for g in groups)
    assert processes_using(fed.addresses()) == []
    assert "resuming" in (fed.logs / "run_again.log").read_text()
    a, b = final_arrays(reference_run.run_dir), final_arrays(resumed)
    assert RunFolder(resumed).latest().round == 2
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    assert worst < 1e-5, worst
    assert [h["round"] for h in history(resumed)] == [1, 2]


def test_a_killed_site_is_skipped_and_rejoins(cohort, app, tmp_path):
    run_dir = tmp_path / "run"
    recipe = preset_override(cohort, run_dir)
    # the dead site's message ends round 2 when the SuperLink marks it offline (two missed heartbeats: at most
    # 2 x HEARTBEAT_S after the kill) or at the timeout; a timeout well above a live site's round keeps a loaded
    # CI machine's slow ClientApp start from being counted as a dead site
    config = run_config(run_dir, 3, recipe=str(recipe), **{"round-timeout-s": 120})
    with LocalFederation(tmp_path / "fed", cohort["sites"], heartbeat_s=HEARTBEAT_S) as fed:
        run = fed.run_async(app, {**config, "min-available": 3})
        rounds_file = run_dir / "history.jsonl"
        deadline = time.time() + 600
        while not rounds_file.is_file():  # round 1 done: kill site 2 as round 2 starts
            assert time.time() < deadline and run.poll() is None, "round 1 never completed"
            time.sleep(0.2)
        fed.kill_node(2, signal.SIGKILL)
        while len(rounds_file.read_text().splitlines()) < 2:
            assert time.time() < deadline and run.poll() is None, "round 2 never completed"
            time.sleep(0.5)
        fed.start_node(2)  # the site comes back
        assert run.wait(timeout=900) == 0
    rounds = history(run_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["participation"]["valid"] == 3
    assert rounds[1]["participation"]["valid"] == 2 and not rounds[1]["skipped"]  # went on without the dead site
    assert rounds[-1]["participation"]["valid"] == 3  # the restarted site took part again


def test_a_site_restarted_right_after_a_crash_rejoins(cohort, tmp_path):
    """Until two heartbeat intervals after a crashed site's last heartbeat (a minute at Flower's default
    interval, 2 x HEARTBEAT_S here) the SuperLink still lists the old session as online and refuses to
    activate the site again; `fedvlp-site supernode` waits that out instead of exiting."""
    with LocalFederation(tmp_path / "fed", cohort["sites"][:1], heartbeat_s=HEARTBEAT_S) as fed:
        superlink_log, node_log = fed.logs / "superlink.log", fed.logs / "supernode_0.log"

        def activations() -> int:
            return superlink_log.read_text(errors="replace").count("Activated node_id=")

        deadline = time.time() + 120
        while activations() < 1:
            assert time.time() < deadline, "the SuperNode never came online"
            time.sleep(0.2)
        fed.kill_node(0, signal.SIGKILL)
        fed.start_node(0)  # at once: its old session stays online for up to 2 x HEARTBEAT_S more
        deadline = time.time() + 240
        while activations() < 2:
            assert time.time() < deadline and fed.nodes[0].poll() is None, "the restarted site never rejoined"
            time.sleep(1)
        log = node_log.read_text(errors="replace")
        assert "refused to activate" in log  # it was refused first, and retried
        assert fed.nodes[0].poll() is None  # and it is still running
