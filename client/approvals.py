"""Which app versions (FABs) this site runs, and how a reviewer approves a new one.

A site's allowlist is the union of
- ``privacy.allowed_fab_hashes`` in the site YAML: a list of FAB hashes, or the word ``any`` (every app
  version runs; only when the YAML says so: an empty list runs nothing), and
- the versions recorded in ``privacy.approvals_dir`` (default ``approved_apps/`` beside the site YAML) by

      fedvlp-site approve PROJECT_DIR --config /etc/fedvlp/site.yaml     # or a .fab file

  which prints what a reviewer needs (the FAB hash, every file in it with its digest, the diff against
  the last approved version) and, once confirmed, appends a line to ``approved.jsonl`` (hash, time,
  reviewer, source, file count) and keeps the approved FAB as ``HASH.fab`` for the next review's diff.

The site runner (:mod:`client.site_runner`) checks a FAB's SHA-256 against :func:`site_policy` before
anything of the FAB is extracted; the in-FAB pinning mod (:mod:`client.fab_pinning`) applies the same
policy again, as defence in depth.
"""

from __future__ import annotations

import difflib
import getpass
import hashlib
import io
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .site_config import ANY_APP, SiteConfig

LEDGER = "approved.jsonl"


@dataclass(frozen=True)
class AppPolicy:
    """The app versions a site runs: every one (``any_app``) or those in ``hashes`` (lower-case)."""

    any_app: bool
    hashes: frozenset[str]

    def allows(self, fab_hash: str) -> bool:
        return self.any_app or fab_hash.lower() in self.hashes

    def refusal(self, fab_hash: str) -> str:
        """Why ``fab_hash`` does not run here, in words the federation operator can act on."""
        if not self.hashes:
            return (f"this site refuses to run FAB {fab_hash}: it has approved no app version yet "
                    "(privacy.allowed_fab_hashes is empty; the site approves one with fedvlp-site approve)")
        shown = ", ".join(sorted(h[:12] + "..." for h in self.hashes))
        return (f"this site refuses to run FAB {fab_hash}: its site config allows only the app versions {shown} "
                "(privacy.allowed_fab_hashes and fedvlp-site approve)")


def approvals(approvals_dir: str | Path) -> list[dict]:
    """The approvals recorded in ``approvals_dir`` (oldest first); none if the folder does not exist."""
    ledger = Path(approvals_dir) / LEDGER
    if not ledger.is_file():
        return []
    entries = []
    for number, line in enumerate(ledger.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{ledger}: line {number} is not JSON; fix or remove it "
                                 "(it was written by fedvlp-site approve).") from None
    return entries


def site_policy(cfg: SiteConfig) -> AppPolicy:
    listed = cfg.privacy.allowed_fab_hashes
    if listed == ANY_APP:
        return AppPolicy(any_app=True, hashes=frozenset())
    hashes = {str(h).lower() for h in listed} | {e["hash"].lower() for e in approvals(cfg.privacy.approvals_dir)}
    return AppPolicy(any_app=False, hashes=frozenset(hashes))


# --- review ----------------------------------------------------------------------------------------

def read_fab(source: str | Path) -> bytes:
    """The FAB of a project folder (what ``flwr run FOLDER`` sends: builds are deterministic) or a .fab file."""
    source = Path(source)
    if source.is_file():
        return source.read_bytes()
    if not (source / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{source} is neither a .fab file nor a Flower app folder (no pyproject.toml)")
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(source)


def fab_files(fab: bytes) -> dict[str, bytes]:
    """Path -> content of the files a FAB installs (its ``.info/`` manifest left out)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        return {name: archive.read(name) for name in sorted(archive.namelist())
                if not name.startswith(".info/") and not name.endswith("/")}


def _text(content: bytes) -> list[str] | None:
    try:
        return content.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def review(fab: bytes, previous: tuple[dict, bytes] | None) -> list[str]:
    """What a reviewer reads before approving ``fab``: hash, files, and the diff against ``previous``
    (the last approved version's ledger entry and FAB), or a note that there is none."""
    files = fab_files(fab)
    old = fab_files(previous[1]) if previous else {}
    lines = [f"FAB hash: {hashlib.sha256(fab).hexdigest()}",
             f"{len(files)} files, {sum(len(c) for c in files.values())} bytes:"]
    for name, content in files.items():
        mark = " " if not previous else ("+" if name not in old else ("~" if old[name] != content else " "))
        lines.append(f"  {mark} {hashlib.sha256(content).hexdigest()[:12]} {len(content):9d}  {name}")
    if not previous:
        lines.append("No earlier version was approved at this site: review every file listed above.")
        return lines
    entry = previous[0]
    lines.append(f"Changes since the last approved version {entry['hash'][:12]}... "
                 f"(approved {entry.get('time', '?')} by {entry.get('reviewer', '?')}):")
    removed = sorted(set(old) - set(files))
    changed = [n for n in files if n in old and old[n] != files[n]]
    added = [n for n in files if n not in old]
    if not (removed or changed or added):
        lines.append("  none: the same files")
    lines += [f"  removed: {name}" for name in removed] + [f"  added: {name}" for name in added]
    for name in added + changed:
        before, after = _text(old.get(name, b"")), _text(files[name])
        if before is None or after is None:
            lines.append(f"  {name}: binary content changed")
            continue
        lines += [line.rstrip("\n") for line in difflib.unified_diff(
            before, after, fromfile=f"approved/{name}", tofile=f"new/{name}")]
    return lines


def last_approved(approvals_dir: str | Path) -> tuple[dict, bytes] | None:
    """The most recent approval whose FAB is kept in ``approvals_dir``, with that FAB."""
    for entry in reversed(approvals(approvals_dir)):
        path = Path(approvals_dir) / f"{entry['hash']}.fab"
        if path.is_file():
            return entry, path.read_bytes()
    return None


def record_approval(approvals_dir: str | Path, fab: bytes, source: str) -> dict:
    """Add ``fab`` to the site's approvals (ledger line + the FAB kept for later diffs)."""
    folder = Path(approvals_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fab_hash = hashlib.sha256(fab).hexdigest()
    (folder / f"{fab_hash}.fab").write_bytes(fab)
    entry = {"hash": fab_hash, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reviewer": getpass.getuser(),
             "source": str(source), "files": len(fab_files(fab))}
    with (folder / LEDGER).open("a", encoding="utf-8") as ledger:
        ledger.write(json.dumps(entry, sort_keys=True) + "\n")
    return entry
