"""``fedvlp-site supernode``: a SuperNode refused because its crashed session is still listed as online
is started again; anything else ends the command with the SuperNode's own status."""

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


def run_site(tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "client.cli", "supernode", "--rejoin-wait", "0.2", *extra, "--",
                             "--superlink", "h:1", "--port", "9"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


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
    assert calls == ["--superlink h:1 --port 9"] * expected_calls  # the arguments pass through unchanged
    refusals = sum(o.startswith("refused") for o in outcomes)
    assert out.count("Exit Code: 305") == min(refusals, expected_calls)  # output passes through
    assert ("refused to activate" in err) == outcomes[0].startswith("refused")
    leftovers = subprocess.run(["pgrep", "-f", f"fake-superexec-{tmp_path.name}"], capture_output=True, text=True)
    assert leftovers.stdout == ""  # what the refused SuperNode left running was stopped


def test_a_stop_reaches_the_supernode_and_ends_the_retries(tmp_path):
    site = run_site(tmp_path, fake_supernode(tmp_path, ["hang", "ok"]))
    assert site.stdout.readline().strip() == "started"
    site.send_signal(signal.SIGTERM)
    site.communicate(timeout=30)
    assert site.returncode != 0  # the SuperNode's status after the signal, not a fresh start's
    assert len((tmp_path / "calls").read_text().splitlines()) == 1


def test_without_arguments_it_says_what_to_pass(tmp_path):
    out = subprocess.run([sys.executable, "-m", "client.cli", "supernode"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--superlink" in out.stderr
