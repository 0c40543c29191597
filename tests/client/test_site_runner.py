"""The site runner's decision for one task, with real FABs and a real app process (no SuperNode):
which FABs run, and what of their reply may leave."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.common.serde import message_to_proto

from client.site_runner import APP_ERROR, APP_FAILED, SiteRunner

REPORT = "Moderate right pleural effusion with adjacent compressive atelectasis of the right lower lobe."
ARRAYS = {"a.weight": np.ones((2, 3), np.float32), "b.bias": np.zeros(3, np.float32)}


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def site(tmp_path, site_yaml_writer):
    """``site(privacy)``: a site YAML with a cache holding one report; returns (yaml, cache folder)."""
    def make(privacy: dict) -> tuple[Path, Path]:
        cache = tmp_path / "cache"
        cache.mkdir(exist_ok=True)
        (cache / "manifest.jsonl").write_text(json.dumps({"study_uid": "1.2.3", "report": REPORT}) + "\n")
        return site_yaml_writer(tmp_path, privacy={"egress_log": str(tmp_path / "egress.jsonl"), **privacy}), cache
    return make


def fab_of(folder: Path) -> SimpleNamespace:
    import tomllib

    content = build_fab_from_disk(folder)
    config = tomllib.loads((folder / "pyproject.toml").read_text())
    return SimpleNamespace(content=content, hash_str=hashlib.sha256(content).hexdigest(), version=config["project"]["version"],
                           fab_id=f"{config['tool']['flwr']['app']['publisher']}/{config['project']['name']}")


def task_for(fab, site_yaml: Path):
    message = Message(RecordDict({"arrays": ArrayRecord(array_dict={k: Array(v) for k, v in ARRAYS.items()}),
                                  "config": ConfigRecord({"server_round": 1})}), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={"site-config": str(site_yaml)}, state=RecordDict(),
                      run_config={})
    run = SimpleNamespace(fab_hash=fab.hash_str, fab_id=fab.fab_id, fab_version=fab.version)
    return message, context, run


def decide(site_yaml: Path, fab, run=None):
    message, context, default_run = task_for(fab, site_yaml)
    reply, _ = SiteRunner(site_yaml, "127.0.0.1:1").decide(5, message, context, run or default_run, fab)
    return reply


@pytest.mark.parametrize("privacy,reason", [
    ({"allowed_fab_hashes": ["0" * 64]}, "allows only the app versions 000000000000..."),
    ({}, "it has approved no app version yet"),  # an empty allowlist runs nothing
])
def test_a_fab_the_site_did_not_allow_is_never_extracted_or_imported(tmp_path, site, hostile_app_writer, privacy, reason):
    site_yaml, cache = site(privacy)
    fab = fab_of(hostile_app_writer(tmp_path / "app", tmp_path / "markers"))
    reply = decide(site_yaml, fab)
    assert reply.has_error() and f"refuses to run FAB {fab.hash_str}" in reply.error.reason and reason in reply.error.reason
    assert not (tmp_path / "markers").exists()  # nothing of the app was imported
    assert not (cache / "site_runner").exists()  # nor written to disk
    (entry,) = [json.loads(x) for x in (tmp_path / "egress.jsonl").read_text().splitlines()]
    assert entry["fab_hash"] == fab.hash_str and "refuses" in entry["error"]["reason"]


def test_a_site_that_allows_any_app_sends_only_the_filtered_reply(tmp_path, site, hostile_app_writer):
    site_yaml, cache = site({"allowed_fab_hashes": "any"})
    fab = fab_of(hostile_app_writer(tmp_path / "app", tmp_path / "markers"))
    reply = decide(site_yaml, fab)
    sentence = next((tmp_path / "markers").glob("ran-*")).read_text()
    assert sentence in REPORT and len(sentence) > 40  # the app did read the report
    assert not reply.has_error()
    assert list(reply.content.array_records.keys()) == ["arrays"] and not reply.content.config_records
    assert list(reply.content["arrays"].keys()) == list(ARRAYS)
    assert all(np.array_equal(reply.content["arrays"][k].numpy(), v) for k, v in ARRAYS.items())
    assert dict(reply.content.metric_records["metrics"]) == {"num-examples": 1}
    wire = message_to_proto(reply).SerializeToString()
    assert sentence.encode() not in wire and b"exfiltrated" not in wire
    (marker,) = (tmp_path / "markers").glob("imported-*")
    assert int(marker.name.split("-")[1]) != os.getpid()  # the app ran in a child process, not in the runner
    assert str(cache / "site_runner") in marker.read_text()  # from the FAB installed for this task
    assert not (cache / "site_runner" / "task-5").exists()  # and that folder is gone
    (entry,) = [json.loads(x) for x in (tmp_path / "egress.jsonl").read_text().splitlines()]
    assert entry["metrics"] == {"num-examples": 1} and set(entry["arrays"]) == set(ARRAYS)
    assert {"array arrays.exfiltrated-report-bytes", "config record 'exfiltrated-config'",
            "array record 'exfiltrated-arrays'", "metric metrics.train-loss (list)"} <= set(entry["dropped"])


def write_app(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text('[project]\nname = "plain"\nversion = "1.0.0"\n[tool.flwr.app]\n'
                                           'publisher = "site"\n[tool.flwr.app.components]\n'
                                           'serverapp = "plain_app:server"\nclientapp = "plain_app:app"\n')
    (folder / "plain_app.py").write_text("from flwr.app import Error, Message\nfrom flwr.clientapp import ClientApp\n"
                                         "app = ClientApp()\n\n@app.train()\ndef train(msg, context):\n" + body)
    return folder


@pytest.mark.parametrize("body,expected", [
    ("    raise FileNotFoundError('/pacs/PAT-0042/1.2.840.113619 ACC123456')\n", APP_FAILED),
    ("    return Message(Error(code=0, reason='PAT-0042 ACC123456'), reply_to=msg)\n", APP_ERROR),
    ("    import os; os._exit(3)\n", APP_FAILED),
])
def test_an_app_failure_reaches_the_server_as_a_fixed_text(tmp_path, site, body, expected):
    site_yaml, _ = site({"allowed_fab_hashes": "any"})
    reply = decide(site_yaml, fab_of(write_app(tmp_path / "app", body)))
    assert reply.has_error() and reply.error.reason == expected


def test_a_fab_whose_content_does_not_match_the_runs_hash_is_refused(tmp_path, site, hostile_app_writer):
    site_yaml, _ = site({"allowed_fab_hashes": "any"})
    fab = fab_of(hostile_app_writer(tmp_path / "app", tmp_path / "markers"))
    reply = decide(site_yaml, fab, run=SimpleNamespace(fab_hash="f" * 64, fab_id="x/y", fab_version="1"))
    assert reply.has_error() and "does not match its hash" in reply.error.reason
    assert not (tmp_path / "markers").exists()
