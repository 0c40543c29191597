"""Per-file header cache, so that re-ingesting an unchanged export reads no DICOM file again.

A file's entry is reused while its size and modification time are unchanged; it holds either the
file's header summary or the reason it was refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .cache import FILE_INDEX, write_atomic

INDEX_VERSION = 1


class FileIndex:
    def __init__(self, cache_dir: str | Path) -> None:
        self.path = Path(cache_dir) / FILE_INDEX
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("version") == INDEX_VERSION:
                    self.entries = data["files"]
            except (ValueError, KeyError, AttributeError):
                self.entries = {}  # a damaged index only costs a full re-read
        self.fresh: dict[str, dict[str, Any]] = {}

    def lookup(self, path: str, size: int, mtime_ns: int) -> dict[str, Any] | None:
        entry = self.entries.get(path)
        if entry and entry["size"] == size and entry["mtime_ns"] == mtime_ns:
            self.fresh[path] = entry
            return entry
        return None

    def record(self, path: str, size: int, mtime_ns: int, header: dict | None, reason: str = "", detail: str = "") -> None:
        self.fresh[path] = {"size": size, "mtime_ns": mtime_ns, "header": header, "reason": reason, "detail": detail}

    def save(self) -> None:
        """Keep only files seen in this run (deleted files drop out)."""
        write_atomic(self.path, json.dumps({"version": INDEX_VERSION, "files": self.fresh}))
