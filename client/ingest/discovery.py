"""Walk a PACS export: every file under the root, whatever its name; links that escape the root refused."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from . import reasons


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def walk_export(root: str | Path, exclude: str | Path | None = None) -> Iterator[tuple[str, tuple[str, str] | None]]:
    """Yield ``(path, None)`` for each file to read, or ``(path, (reason, detail))`` for one to refuse.

    Symbolic links are followed while they stay inside the export root; a link (to a file or a folder)
    that resolves outside it is refused with ``OUTSIDE_EXPORT_ROOT``, a broken link as unreadable, and
    link loops are visited once. A folder that cannot be listed (no permission, a path beyond the
    system's limit) is refused with ``UNREADABLE_FOLDER``: its files are not silently left out.
    Paths are absolute; order is sorted, so runs are reproducible.
    """
    root_real = os.path.realpath(root)
    exclude_real = os.path.realpath(exclude) if exclude else None
    visited: set[str] = set()
    unreadable: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root_real, followlinks=True, onerror=unreadable.append):
        yield from _refused_folders(unreadable)
        real_dir = os.path.realpath(dirpath)
        if real_dir in visited:
            dirnames[:] = []
            continue
        visited.add(real_dir)
        kept = []
        for name in sorted(dirnames):
            full = os.path.join(dirpath, name)
            target = os.path.realpath(full)
            if not _inside(target, root_real):
                yield full, (reasons.OUTSIDE_EXPORT_ROOT, f"folder link to {target}")
            elif exclude_real and _inside(target, exclude_real):
                continue  # the site's own cache inside the export
            elif target not in visited:
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            target = os.path.realpath(full)
            if not os.path.exists(full):
                yield full, (reasons.UNREADABLE_DICOM, f"broken link to {target}")
            elif not _inside(target, root_real):
                yield full, (reasons.OUTSIDE_EXPORT_ROOT, f"file link to {target}")
            elif os.path.isfile(full):
                yield full, None
    yield from _refused_folders(unreadable)


def _refused_folders(errors: list[OSError]) -> Iterator[tuple[str, tuple[str, str]]]:
    while errors:
        err = errors.pop(0)
        yield str(err.filename), (reasons.UNREADABLE_FOLDER, f"{err.strerror or err}: the files in it cannot be "
                                  "seen; give the user running fedvlp-site read access to it, or shorten the path")
