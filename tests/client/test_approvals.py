"""``fedvlp-site approve``: what a reviewer sees before an app version joins the site's allowlist, and what
the allowlist then is."""

from __future__ import annotations

import hashlib
import json

import pytest

from client.approvals import read_fab, site_policy
from client.cli import main
from client.site_config import load_site_config


@pytest.fixture
def site_yaml(tmp_path, site_yaml_writer):
    return site_yaml_writer(tmp_path, privacy={"allowed_fab_hashes": []})


def write_app(folder, steps: int):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text('[project]\nname = "reviewed"\nversion = "1.0.0"\n[tool.flwr.app]\n'
                                           'publisher = "site"\n[tool.flwr.app.components]\n'
                                           'serverapp = "app:server"\nclientapp = "app:client"\n')
    (folder / "app.py").write_text(f"LOCAL_STEPS = {steps}\nclient = server = None\n")
    return folder


def test_a_first_approval_lists_every_file_and_adds_the_hash(tmp_path, site_yaml, capsys):
    app = write_app(tmp_path / "app", steps=1)
    digest = hashlib.sha256(read_fab(app)).hexdigest()
    assert not site_policy(load_site_config(site_yaml, require_data=False)).allows(digest)
    assert main(["approve", str(app), "--config", str(site_yaml), "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"FAB hash: {digest}" in out and "app.py" in out and "pyproject.toml" in out
    assert "No earlier version was approved at this site" in out
    assert site_policy(load_site_config(site_yaml, require_data=False)).allows(digest)
    (entry,) = [json.loads(x) for x in (tmp_path / "approved_apps" / "approved.jsonl").read_text().splitlines()]
    assert entry["hash"] == digest and entry["files"] == 2
    assert (tmp_path / "approved_apps" / f"{digest}.fab").read_bytes() == read_fab(app)


def test_the_next_version_is_shown_as_a_diff_against_the_last_approved_one(tmp_path, site_yaml, capsys):
    app = write_app(tmp_path / "app", steps=1)
    assert main(["approve", str(app), "--config", str(site_yaml), "--yes"]) == 0
    write_app(app, steps=500)
    (app / "extra.py").write_text("import socket\n")
    capsys.readouterr()
    assert main(["approve", str(app), "--config", str(site_yaml), "--yes"]) == 0
    out = capsys.readouterr().out
    assert "Changes since the last approved version" in out and "added: extra.py" in out
    assert "-LOCAL_STEPS = 1" in out and "+LOCAL_STEPS = 500" in out and "+import socket" in out
    assert "~" in next(line for line in out.splitlines() if line.endswith(" app.py"))
    policy = site_policy(load_site_config(site_yaml, require_data=False))
    assert len(policy.hashes) == 2 and not policy.any_app  # both versions stay allowed


def test_an_approval_is_confirmed_or_not_made(tmp_path, site_yaml, capsys, monkeypatch):
    app = write_app(tmp_path / "app", steps=1)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["approve", str(app), "--config", str(site_yaml)]) == 1
    assert "pass --yes" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["approve", str(app), "--config", str(site_yaml)]) == 1
    assert not (tmp_path / "approved_apps" / "approved.jsonl").exists()
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["approve", str(app), "--config", str(site_yaml)]) == 0
    assert main(["approve", str(app), "--config", str(site_yaml)]) == 0  # a second time: already allowed
    assert "already allowed" in capsys.readouterr().out


def test_a_fab_file_can_be_reviewed_and_a_wrong_source_is_named(tmp_path, site_yaml, capsys):
    fab = tmp_path / "received.fab"
    fab.write_bytes(read_fab(write_app(tmp_path / "app", steps=3)))
    assert main(["approve", str(fab), "--config", str(site_yaml), "--yes"]) == 0
    assert main(["approve", str(tmp_path / "nothing"), "--config", str(site_yaml), "--yes"]) == 2
    assert "neither a .fab file nor a Flower app folder" in capsys.readouterr().err


def test_only_an_explicit_any_runs_every_app(tmp_path, site_yaml_writer):
    cfg = load_site_config(site_yaml_writer(tmp_path, privacy={"allowed_fab_hashes": "any"}), require_data=False)
    assert site_policy(cfg).any_app and site_policy(cfg).allows("f" * 64)
    cfg = load_site_config(site_yaml_writer(tmp_path), require_data=False)  # nothing said: nothing runs
    assert not site_policy(cfg).any_app and not site_policy(cfg).allows("f" * 64)
