"""Where a held-out cohort's cache is: a cache folder, its manifest, or a site YAML naming it."""

from __future__ import annotations

from pathlib import Path

import yaml

from shared_models.cohort import MANIFEST


def resolve_cohort(path: str | Path) -> Path:
    """The cache folder of ``path`` (a cache folder, a ``manifest.jsonl`` or a site YAML)."""
    path = Path(path).expanduser().resolve()
    if path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if "cache_dir" not in data:
            raise ValueError(f"{path}: a site YAML needs cache_dir to be used as an evaluation cohort.")
        path = (path.parent / data["cache_dir"]).resolve()
    elif path.name == MANIFEST:
        path = path.parent
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"no ingested cohort at {path} (no {MANIFEST}); ingest it with fedvlp-site ingest.")
    return path
