"""``fedvlp-site supernode``: the SuperNode runs with ``--isolation process`` beside the site runner, and
both stop together; a SuperNode refused because its crashed session is still listed as online is started
again; anything else ends the command with the SuperNode's own status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REFUSAL = "ERROR :     Exit Code: 305\\nFailed to initialize the connection to the SuperLink.\\n[code: 2004] Failed to activate SuperNode."


def fake_supernode(tmp_path: Path, outcomes: list[str]) -> dict[str, str]:
    """A ``flower-supernode`` on PATH that logs its arguments and plays the next outcome:
    ``refused`` (Flower's 305 message, status 1), ``fail`` (another error, status 1), ``ok`` (status 0),
    ``hang`` (runs until signalled), ``refused_leaving_a_child`` (refused, leaving an orphan that holds
    the output open, as Flower's SuperExec does)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "outcomes").write_text("\n".join(outcomes) + "\n")
    script = bin_dir / "flower-supernode"
    script.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/calls
outcome=$(head -n1 {tmp_path}/outcomes); sed -i 1d {tmp_path}/outcomes
case "$outcome" in
  refused) printf '{REFUSAL}\\n'; exit 1 ;;
  refused_leaving_a_child) (exec -a fake-superexec-{tmp_path.name} sleep 600 &); printf '{REFUSAL}\\n'; exit 1 ;;
  fail) echo "ERROR :     Exit Code: 300"; exit 1 ;;
  hang) echo started; exec sleep 600 ;;
  *) echo joined; exit 0 ;;
esac
""")
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def site_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text("site_id: s\ncache_dir: cache\ndata: {dicom_root: dicom, require_report: false}\n"
                    "privacy: {allowed_fab_hashes: []}\n")
    return path


def run_site(tmp_path: Path, env: dict[str, str], *extra: str, flags=("--superlink", "h:1", "--port", "9")
             ) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "client.cli", "supernode", "--config", str(site_yaml(tmp_path)),
                             "--rejoin-wait", "0.2", *extra, "--", *flags], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def runners(tmp_path: Path) -> list[int]:
    """The site runners started for this test's site YAML."""
    out = subprocess.run(["pgrep", "-f", f"client.cli runner --config {tmp_path}/site.yaml"], capture_output=True,
                         text=True)
    return [int(pid) for pid in out.stdout.split()]


@pytest.mark.parametrize("outcomes,expected_rc,expected_calls", [
    (["refused", "refused", "ok"], 0, 3),  # refused while the old session was online, then joined
    (["refused", "fail", "ok"], 1, 2),  # any other failure is the operator's to see, not retried
    (["ok"], 0, 1),
    (["refused"] * 4, 1, 3),  # gives up after --rejoin-tries
    (["refused_leaving_a_child", "ok"], 0, 2),
])
def test_only_a_refused_activation_is_retried(tmp_path, outcomes, expected_rc, expected_calls):
    site = run_site(tmp_path, fake_supernode(tmp_path, outcomes), "--rejoin-tries", "3")
    out, err = site.communicate(timeout=60)
    assert site.returncode == expected_rc
    calls = (tmp_path / "calls").read_text().splitlines()
    # the arguments pass through unchanged, the site's apps left to its runner
    assert calls == ["--superlink h:1 --port 9 --isolation process"] * expected_calls
    refusals = sum(o.startswith("refused") for o in outcomes)
    assert out.count("Exit Code: 305") == min(refusals, expected_calls)  # output passes through
    assert ("refused to activate" in err) == outcomes[0].startswith("refused")
    leftovers = subprocess.run(["pgrep", "-f", f"fake-superexec-{tmp_path.name}"], capture_output=True, text=True)
    assert leftovers.stdout == ""  # what the refused SuperNode left running was stopped
    assert runners(tmp_path) == []  # and the site runner with it


def test_a_stop_reaches_the_supernode_and_the_runner_and_ends_the_retries(tmp_path):
    site = run_site(tmp_path, fake_supernode(tmp_path, ["hang", "ok"]))
    assert site.stdout.readline().strip() == "started"
    deadline = time.time() + 60
    while not (found := runners(tmp_path)):  # the runner runs beside the SuperNode
        assert time.time() < deadline, "the site runner never started"
        time.sleep(0.2)
    command = Path(f"/proc/{found[0]}/cmdline").read_bytes().split(b"\0")
    assert command[command.index(b"--runtime-api-address") + 1] == b"127.0.0.1:9"  # the SuperNode's --port
    site.send_signal(signal.SIGTERM)
    site.communicate(timeout=60)
    assert site.returncode != 0  # the SuperNode's status after the signal, not a fresh start's
    assert len((tmp_path / "calls").read_text().splitlines()) == 1
    assert runners(tmp_path) == []


def test_a_dead_runner_stops_the_supernode(tmp_path):
    site = run_site(tmp_path, fake_supernode(tmp_path, ["hang", "ok"]))
    assert site.stdout.readline().strip() == "started"
    deadline = time.time() + 60
    while not (found := runners(tmp_path)):
        assert time.time() < deadline, "the site runner never started"
        time.sleep(0.2)
    os.kill(found[0], signal.SIGKILL)
    _, err = site.communicate(timeout=60)
    assert site.returncode != 0 and "the site runner exited" in err
    assert len((tmp_path / "calls").read_text().splitlines()) == 1  # not restarted without its runner


@pytest.mark.parametrize("argv,message", [
    (["supernode", "--config", "site.yaml"], "--superlink"),
    (["supernode", "--config", "SITE", "--", "--superlink", "h:1", "--isolation", "subprocess"],
     "--isolation subprocess: this site runs its apps through its own runner"),
])
def test_wrong_arguments_are_named(tmp_path, argv, message):
    argv = [str(site_yaml(tmp_path)) if a == "SITE" else a for a in argv]
    out = subprocess.run([sys.executable, "-m", "client.cli", *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr


def test_a_heartbeat_interval_runs_the_supernode_through_the_shim_with_the_same_arguments(tmp_path, monkeypatch):
    from client.supernode import supernode_command

    env = fake_supernode(tmp_path, ["ok"])
    monkeypatch.setenv("PATH", env["PATH"])
    assert supernode_command(["--superlink", "h:1"]) == [str(tmp_path / "bin" / "flower-supernode"), "--superlink", "h:1"]
    assert supernode_command(["--superlink", "h:1"], 12) == [
        sys.executable, "-m", "client.supernode", "--heartbeat-interval", "12.0", "--superlink", "h:1"]
    # `fedvlp-site supernode --heartbeat-interval` starts that command: Flower's SuperNode, which finds no
    # SuperLink at 127.0.0.1:1 and exits
    from server.local_federation import free_port

    site = run_site(tmp_path, env, "--heartbeat-interval", "12", "--rejoin-tries", "1",
                    flags=("--superlink", "127.0.0.1:1", "--port", str(free_port()), "--max-retries", "0", "--insecure"))
    out, err = site.communicate(timeout=120)
    assert not (tmp_path / "calls").exists()  # not the flower-supernode on PATH
    assert site.returncode != 0 and "Starting Flower SuperNode" in out
    assert runners(tmp_path) == []


def test_the_shim_sets_the_interval_the_supernode_announces_and_keeps(monkeypatch):
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.cli as cli
    import flwr.supernode.fleet_http_connection as connection

    from client.supernode import flower_supernode_with_heartbeat

    seen = {}
    monkeypatch.setattr(connection, "HEARTBEAT_DEFAULT_INTERVAL", connection.HEARTBEAT_DEFAULT_INTERVAL)
    monkeypatch.setattr(heartbeat, "HEARTBEAT_DEFAULT_INTERVAL", heartbeat.HEARTBEAT_DEFAULT_INTERVAL)
    monkeypatch.setattr(sys, "argv", sys.argv)
    monkeypatch.setattr(cli, "flower_supernode", lambda: seen.update(
        argv=list(sys.argv), announced=connection.HEARTBEAT_DEFAULT_INTERVAL, pace=heartbeat.HEARTBEAT_DEFAULT_INTERVAL))
    flower_supernode_with_heartbeat(["--heartbeat-interval", "12.0", "--superlink", "h:1", "--insecure"])
    assert seen == {"argv": ["flower-supernode", "--superlink", "h:1", "--insecure"], "announced": 12.0, "pace": 12.0}


@pytest.mark.parametrize("seconds", ["5", "3600"])
def test_a_heartbeat_interval_the_superlink_refuses_is_named(tmp_path, seconds):
    out = subprocess.run([sys.executable, "-m", "client.cli", "supernode", "--config", str(site_yaml(tmp_path)),
                          "--heartbeat-interval", seconds, "--", "--superlink", "h:1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--heartbeat-interval" in out.stderr and "10 to 1800 seconds" in out.stderr
