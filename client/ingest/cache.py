"""The site's preprocessed cache: one float16 ``.npy`` per series (memory-mappable) and the manifest.

Layout under ``cache_dir``::

    manifest.jsonl        one row per ingested series (study, modality, report text, findings, cache file)
    ingest_report.json    what happened to every input (counts, reasons, examples)
    quarantine.jsonl      every input that was not ingested: path, reason, detail
    file_index.json       per-file header cache for incremental re-ingest
    volumes/<key>.npy     preprocessed volume [D, H, W], float16

Everything here stays at the site: it holds paths, UIDs and report text.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from shared_models.cohort import INGEST_REPORT, MANIFEST, load_volume, read_manifest  # noqa: F401 (re-exported)

QUARANTINE = "quarantine.jsonl"
FILE_INDEX = "file_index.json"
VOLUMES = "volumes"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_line(row: dict[str, Any]) -> str:
    """One JSON line, UTF-8 as it is; a row holding a file name that is not valid UTF-8 (old PACS exports:
    Python decodes such names with lone surrogates, which UTF-8 cannot encode) is written with ASCII
    escapes instead, which read back as the same name."""
    text = json.dumps(row, ensure_ascii=False, sort_keys=True)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(row, sort_keys=True)
    return text + "\n"


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(_json_line(row) for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def volume_path(cache_dir: str | Path, series_key: str) -> Path:
    return Path(cache_dir) / VOLUMES / f"{series_key}.npy"


def write_volume(cache_dir: str | Path, series_key: str, volume: np.ndarray) -> str:
    """Save a preprocessed ``[D, H, W]`` volume as float16; returns its path relative to ``cache_dir``."""
    path = volume_path(cache_dir, series_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, np.ascontiguousarray(volume, dtype=np.float16))
    os.replace(tmp, path)
    return str(path.relative_to(cache_dir))
