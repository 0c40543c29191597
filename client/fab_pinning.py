"""App pinning inside the ClientApp: defence in depth behind the site runner's own check.

The site's guarantee is enforced before the app starts, by the site runner (:mod:`client.site_runner`),
which refuses a FAB whose hash the site did not allow and never extracts it. This mod repeats the check
from inside the app with the same policy (:func:`client.approvals.site_policy`), for a SuperNode that
runs without the runner; it is not what the site relies on (a FAB built without it would not run it).

``fedvlp-site fab-hash PROJECT_DIR`` prints the hash of the FAB that ``flwr run PROJECT_DIR`` sends (FAB
builds are deterministic); ``fedvlp-site approve`` reviews and records one.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from .approvals import AppPolicy

log = logging.getLogger(__name__)

# Functions that call the app and hold its FAB in a local named ``fab``: Flower's own ClientApp process,
# and the app process the site runner starts (client/app_process.py)
APP_CALLERS = ("run_clientapp", "run_installed_app")


def fab_hash_of_project(project_dir: str | Path) -> str:
    """The hash of the FAB that ``flwr run`` builds from ``project_dir``."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(project_dir))).hexdigest()


def running_fab_hash() -> str | None:
    """The full hash of the FAB this ClientApp process runs, or None outside a SuperNode.

    Flower 1.41 gives a ClientApp no public handle on its FAB: the hash lives only in the ``fab`` local of
    the function that calls the app (and so every mod), still on the stack (:data:`APP_CALLERS`). We read
    it there (flwr is pinned to 1.41.x) and cross-check it against the folder the app was installed into,
    which is named after the hash's first 8 characters.
    """
    frame = sys._getframe(1)
    while frame is not None:
        fab = frame.f_locals.get("fab") if frame.f_code.co_name in APP_CALLERS else None
        if fab is not None and isinstance(getattr(fab, "hash_str", None), str):
            full = fab.hash_str
            installed = Path(__file__).resolve().parents[1].name  # e.g. fedvlp.fedvlp.0.1.0.eb8f67e5
            if "." in installed and installed.rsplit(".", 1)[1] != full[:8]:
                log.error("the FAB hash %s does not match the installed app folder %s", full, installed)
                return None
            return full
        frame = frame.f_back
    return None


def pin_check(msg: Message, context: Context, call_next, policy: AppPolicy) -> Message:
    """Refuse to run an app whose FAB hash ``policy`` does not allow."""
    if policy.any_app:
        return call_next(msg, context)
    current = running_fab_hash()
    if current is None or not policy.allows(current):
        reason = policy.refusal(current or "(whose hash cannot be determined)")
        log.error("%s", reason)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
    return call_next(msg, context)
