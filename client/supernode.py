"""Run ``flower-supernode`` and let a site rejoin after a crash.

When a site's machine dies (no clean shutdown) and comes back within about a minute, the SuperLink
still lists its previous session as online (until two heartbeat intervals, 60 s by default, after the
last heartbeat) and refuses to activate the new one: ``flower-supernode`` prints ``Exit Code: 305``
("Failed to activate SuperNode") and exits with status 1, without retrying. This wrapper passes the
SuperNode's output through unchanged and, on exactly that refusal, starts it again after a pause.
Any other exit is returned as it is, so a real misconfiguration still stops the site.
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


def _stop_leftovers() -> None:
    """Terminate and reap this process's remaining children (the exited SuperNode's SuperExec)."""
    found = live_processes(parent=os.getpid())
    for pid in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
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


def run_supernode(args: list[str], tries: int = 12, wait_s: float = 10.0) -> int:
    """Run ``flower-supernode ARGS``; retry up to ``tries`` times while its activation is refused."""
    executable = shutil.which("flower-supernode")
    if executable is None:
        raise FileNotFoundError("flower-supernode is not on PATH: install the project (pip install -e .) "
                                "in the environment this command runs from.")
    stopping = False
    child: subprocess.Popen | None = None

    def stop(signum, _frame) -> None:  # a stop of the wrapper stops the SuperNode and ends the retries
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    _adopt_orphans()
    try:
        rc = 1
        for attempt in range(1, tries + 1):
            child = subprocess.Popen([executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            tail: deque[bytes] = deque(maxlen=40)  # enough to see Flower's exit message, never the whole log
            reader = threading.Thread(target=_forward, args=(child.stdout, tail), daemon=True)
            reader.start()
            rc = child.wait()
            _stop_leftovers()  # they hold the output pipe open too
            reader.join(timeout=10)
            if stopping or rc == 0 or not any(REFUSED in line for line in tail):
                return rc
            log.warning("the SuperLink refused to activate this SuperNode (attempt %d/%d). If this site restarted "
                        "less than a minute ago, its previous session is still listed as online; retrying in %.0f s. "
                        "If it persists, check that the site's public key is registered (flwr supernode register) "
                        "and that the SuperLink was not restarted (it keeps registrations in memory).",
                        attempt, tries, wait_s)
            deadline = time.time() + wait_s
            while not stopping and time.time() < deadline:
                time.sleep(min(0.5, wait_s))
            if stopping:
                return rc
        log.error("gave up after %d refused activations", tries)
        return rc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
