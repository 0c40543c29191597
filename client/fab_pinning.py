"""App pinning: a site runs only the app versions (FAB hashes) its site YAML lists.

    privacy:
      allowed_fab_hashes: [eb8f67e5dc...]   # full SHA-256 of each FAB the site reviewed and agreed to

``fedvlp-site fab-hash PROJECT_DIR`` prints the hash of the FAB that ``flwr run PROJECT_DIR`` sends (FAB
builds are deterministic), so a site can pin exactly the code it reviewed.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

log = logging.getLogger(__name__)


def fab_hash_of_project(project_dir: str | Path) -> str:
    """The hash of the FAB that ``flwr run`` builds from ``project_dir``."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(project_dir))).hexdigest()


def running_fab_hash() -> str | None:
    """The full hash of the FAB this ClientApp process runs, or None outside a SuperNode.

    Flower 1.41 gives a ClientApp no public handle on its FAB: the hash lives only in the ``fab`` local of
    ``flwr.supernode.runtime.run_clientapp.run_clientapp``, which calls the app (and so every mod) and is
    still on the stack. We read it there (flwr is pinned to 1.41.x) and cross-check it against the
    folder Flower installed the app into, which is named after the hash's first 8 characters.
    """
    frame = sys._getframe(1)
    while frame is not None:
        fab = frame.f_locals.get("fab") if frame.f_code.co_name == "run_clientapp" else None
        if fab is not None and isinstance(getattr(fab, "hash_str", None), str):
            full = fab.hash_str
            installed = Path(__file__).resolve().parents[1].name  # e.g. fedvlp.fedvlp.0.1.0.eb8f67e5
            if "." in installed and installed.rsplit(".", 1)[1] != full[:8]:
                log.error("the FAB hash %s does not match the installed app folder %s", full, installed)
                return None
            return full
        frame = frame.f_back
    return None


def pin_check(msg: Message, context: Context, call_next, allowed: list[str]) -> Message:
    """Refuse to run any app whose FAB hash is not in ``allowed`` (no-op when the list is empty)."""
    if not allowed:
        return call_next(msg, context)
    current = running_fab_hash()
    if current is None or current.lower() not in {a.lower() for a in allowed}:
        what = f"FAB {current}" if current else "an app whose FAB hash cannot be determined"
        reason = (f"this site refuses to run {what}: its site config allows only the app versions "
                  f"{', '.join(a[:12] + '...' for a in allowed)} (privacy.allowed_fab_hashes)")
        log.error("%s", reason)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
    return call_next(msg, context)
