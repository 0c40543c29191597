"""Walking an export: all files, sorted; links out of the root refused; link loops visited once."""

from __future__ import annotations

import os

from client.ingest import reasons
from client.ingest.discovery import walk_export


def test_links_inside_are_followed_and_links_outside_refused(tmp_path):
    root, outside = tmp_path / "export", tmp_path / "elsewhere"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "b" / "IM1").write_bytes(b"x")
    (root / "top").write_bytes(b"y")
    (outside / "secret").write_bytes(b"z")
    os.symlink(outside / "secret", root / "a" / "escape_file")
    os.symlink(outside, root / "escape_dir")
    os.symlink(root / "a", root / "a" / "b" / "loop")
    os.symlink(root / "missing", root / "broken")
    found = dict(walk_export(root))
    assert found[str(root / "a" / "b" / "IM1")] is None and found[str(root / "top")] is None
    assert found[str(root / "a" / "escape_file")][0] == reasons.OUTSIDE_EXPORT_ROOT
    assert found[str(root / "escape_dir")][0] == reasons.OUTSIDE_EXPORT_ROOT
    assert found[str(root / "broken")][0] == reasons.UNREADABLE_DICOM
    assert not any("secret" in p for p in found)
    assert sum(1 for p in found if p.endswith("IM1")) == 1  # the loop does not repeat files


def test_excluded_cache_folder_is_not_walked(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.jsonl").write_text("{}")
    (tmp_path / "IM1").write_bytes(b"x")
    assert [p for p, _ in walk_export(tmp_path, exclude=tmp_path / "cache")] == [str(tmp_path / "IM1")]
