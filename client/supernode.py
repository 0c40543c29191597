"""Run a site's ``flower-supernode`` beside its own runner, and let the site rejoin after a crash.

    fedvlp-site supernode --config /etc/fedvlp/site.yaml -- FLOWER_SUPERNODE_ARGS...

The SuperNode runs with ``--isolation process`` (added here; ``--isolation subprocess`` is refused), so
it starts no app itself, and the site runner (:mod:`client.site_runner`, ``fedvlp-site runner``) takes
every ClientApp task from the SuperNode's Runtime API (its ``--port``, on loopback). Both are started
here and stopped together; if the runner dies, the SuperNode is stopped too (no app runs unvetted, and
an init system or ``restart: unless-stopped`` brings both back).

When a site's machine dies (no clean shutdown) and comes back within about a minute, the SuperLink
still lists its previous session as online (until two heartbeat intervals, 60 s by default, after the
last heartbeat) and refuses to activate the new one: ``flower-supernode`` prints ``Exit Code: 305``
("Failed to activate SuperNode") and exits with status 1, without retrying. This wrapper passes the
SuperNode's output through unchanged and, on exactly that refusal, starts it again after a pause.
Any other exit is returned as it is, so a real misconfiguration still stops the site.

``--heartbeat-interval S`` (10 to 1800 s; default Flower's 30) sets how often the SuperNode tells the
SuperLink it is alive, and so how soon (two intervals after its last heartbeat) the SuperLink counts a
dead site out of its round and lets a restarted one in. Flower 1.41 has no flag for it: the SuperNode
then runs through :func:`flower_supernode_with_heartbeat` (``python -m client.supernode``), which sets
the interval in Flower's SuperNode connection and heartbeat sender (two module names, pinned with
Flower in pyproject.toml) and runs the stock ``flower-supernode`` with the same arguments.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)

REFUSED = b"Exit Code: 305"  # Flower's code for a SuperNode the SuperLink would not activate
HEARTBEAT_RANGE = (10.0, 1800.0)  # what Flower's SuperLink accepts (HEARTBEAT_MIN/MAX_INTERVAL)


def _adopt_orphans() -> None:
    """Become the parent of what a SuperNode leaves behind (Linux: PR_SET_CHILD_SUBREAPER), so it can be
    stopped: a SuperNode that exits leaves its SuperExec retrying the dead SuperNode's port forever."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: leftovers are the init system's to reap


def live_processes(*, parent: int | None = None, group: int | None = None) -> list[int]:
    """Running (not zombie) processes with this parent PID or in this process group, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        except OSError:
            continue
        if fields[0] != "Z" and (parent is None or int(fields[1]) == parent) and (group is None or int(fields[2]) == group):
            found.append(int(stat.parent.name))
    return found


def _stop_leftovers(keep: tuple[int, ...] = ()) -> None:
    """Terminate and reap this process's remaining children but ``keep`` (what an exited SuperNode left)."""
    found = [pid for pid in live_processes(parent=os.getpid()) if pid not in keep]
    for pid in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while found and time.time() < deadline:
        for pid in list(found):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    found.remove(pid)
            except ChildProcessError:  # not ours to wait for (an adopted orphan reaped elsewhere) or gone
                if pid not in live_processes(parent=os.getpid()):
                    found.remove(pid)
        time.sleep(0.1)
    for pid in found:  # still there after 10 s
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _forward(stream, tail: deque) -> None:
    for line in stream:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        tail.append(line)


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in ``args`` (the last one), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def process_isolation(args: list[str]) -> tuple[list[str], str]:
    """flower-supernode's ``args`` with ``--isolation process``, and the Runtime API address the runner uses."""
    isolation = _flag(args, "--isolation")
    if isolation not in (None, "process"):
        raise ValueError(f"--isolation {isolation}: this site runs its apps through its own runner; leave "
                         "--isolation out (fedvlp-site supernode adds --isolation process).")
    host = _flag(args, "--host") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    port = _flag(args, "--port") or "9094"  # Flower's default Runtime API port
    return (args if isolation else [*args, "--isolation", "process"]), f"{host}:{port}"


def check_heartbeat_interval(seconds: float | None) -> None:
    low, high = HEARTBEAT_RANGE
    if seconds is not None and not low <= seconds <= high:
        raise ValueError(f"--heartbeat-interval {seconds:g}: the SuperLink accepts {low:g} to {high:g} seconds.")


def supernode_command(args: list[str], heartbeat_interval: float | None = None) -> list[str]:
    """The command that runs ``flower-supernode ARGS``: the stock one, or with another heartbeat interval
    through :func:`flower_supernode_with_heartbeat`."""
    if heartbeat_interval is None:
        executable = shutil.which("flower-supernode")
        if executable is None:
            raise FileNotFoundError("flower-supernode is not on PATH: install the project (pip install -e .) "
                                    "in the environment this command runs from.")
        return [executable, *args]
    check_heartbeat_interval(heartbeat_interval)
    return [sys.executable, "-m", "client.supernode", "--heartbeat-interval", repr(float(heartbeat_interval)), *args]


def set_heartbeat_interval(seconds: float) -> None:
    """Make this process's Flower SuperNode announce and keep a heartbeat of ``seconds``: the interval it
    sends the SuperLink (``ActivateNode``, ``SendNodeHeartbeat``) and the pace of its heartbeat sender
    (Flower sends one every 0.7 to 0.9 times the interval less the 5 s call timeout). Only this process:
    the task leases of the SuperNode's Runtime API keep Flower's interval, as the site runner's do."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection

    check_heartbeat_interval(seconds)
    for module in (connection, heartbeat):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise RuntimeError(f"{module.__name__} has no HEARTBEAT_DEFAULT_INTERVAL: this Flower version is not "
                               "the one --heartbeat-interval was written for; leave the option out.")
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds


def flower_supernode_with_heartbeat(argv: list[str]) -> None:
    """``python -m client.supernode --heartbeat-interval S ARGS...``: ``flower-supernode ARGS`` in this
    process, with a heartbeat of ``S`` seconds."""
    if len(argv) < 2 or argv[0] != "--heartbeat-interval":
        raise SystemExit("usage: python -m client.supernode --heartbeat-interval SECONDS FLOWER_SUPERNODE_ARGS...")
    set_heartbeat_interval(float(argv[1]))
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv[2:]]
    flower_supernode()


def start_runner(site_config: str, runtime_api_address: str) -> subprocess.Popen:
    """``fedvlp-site runner`` from this installation (never from a FAB), output to ours."""
    return subprocess.Popen([sys.executable, "-m", "client.cli", "runner", "--config", site_config,
                             "--runtime-api-address", runtime_api_address])


def run_supernode(args: list[str], site_config: str, tries: int = 12, wait_s: float = 10.0,
                  heartbeat_interval: float | None = None) -> int:
    """Run ``flower-supernode ARGS --isolation process`` and the site runner for ``site_config``; retry the
    SuperNode up to ``tries`` times while its activation is refused. ``heartbeat_interval``: seconds
    (default Flower's). Returns the SuperNode's status."""
    args, runtime_api_address = process_isolation(args)
    command = supernode_command(args, heartbeat_interval)
    stopping = runner_died = False
    child: subprocess.Popen | None = None
    runner: subprocess.Popen | None = None

    def stop(signum, _frame) -> None:  # a stop of the wrapper stops the SuperNode and ends the retries
        nonlocal stopping
        stopping = True
        for process in (child, runner):
            if process is not None and process.poll() is None:
                process.send_signal(signum)

    def watch_runner() -> None:  # without its runner the site must not take tasks: stop the SuperNode
        nonlocal runner_died
        runner.wait()
        if not stopping:
            runner_died = True
            log.error("the site runner exited (status %s): stopping the SuperNode; see the log above", runner.returncode)
            stop(signal.SIGTERM, None)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    _adopt_orphans()
    runner = start_runner(site_config, runtime_api_address)
    threading.Thread(target=watch_runner, daemon=True).start()
    try:
        rc = 1
        for attempt in range(1, tries + 1):
            if stopping:
                return rc
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            tail: deque[bytes] = deque(maxlen=40)  # enough to see Flower's exit message, never the whole log
            reader = threading.Thread(target=_forward, args=(child.stdout, tail), daemon=True)
            reader.start()
            rc = child.wait()
            _stop_leftovers(keep=(runner.pid,))  # they hold the output pipe open too
            reader.join(timeout=10)
            if runner_died:
                return rc or 1
            if stopping or rc == 0 or not any(REFUSED in line for line in tail):
                return rc
            log.warning("the SuperLink refused to activate this SuperNode (attempt %d/%d). If this site restarted "
                        "less than a minute ago, its previous session is still listed as online; retrying in %.0f s. "
                        "If it persists, check that the site's public key is registered (flwr supernode register).",
                        attempt, tries, wait_s)
            deadline = time.time() + wait_s
            while not stopping and time.time() < deadline:
                time.sleep(min(0.5, wait_s))
        log.error("gave up after %d refused activations", tries)
        return rc
    finally:
        stopping = True
        if runner.poll() is None:
            runner.terminate()
            try:
                runner.wait(timeout=30)
            except subprocess.TimeoutExpired:
                runner.kill()
                runner.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    flower_supernode_with_heartbeat(sys.argv[1:])
