"""The ClientApp's mods: the egress guard (what may leave a site) and app pinning (which FABs may run)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.app import dp_clipping_mod, egress_guard_mod
from client.egress import ALLOWED_METRICS, guard
from client.fab_pinning import fab_hash_of_project, pin_check, running_fab_hash
from client.site_config import SiteConfigError, load_site_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def task_identity():
    """What a ClientApp process has set before it builds messages."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
ARRAYS = {"a.weight": np.ones((2, 3), np.float32), "b.bias": np.zeros(3, np.float32)}


def instruction(arrays=ARRAYS, config=None) -> Message:
    content = RecordDict({"arrays": ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord(config or {"server_round": 1})})
    return Message(content, dst_node_id=7, message_type="train")


def context(site_yaml: Path | None = None) -> Context:
    node_config = {"site-config": str(site_yaml)} if site_yaml else {}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def replying(arrays=ARRAYS, metrics=None, extra: dict | None = None):
    def app(msg, ctx):
        content = RecordDict({"arrays": ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord(metrics if metrics is not None else {"num-examples": 4}),
                              **(extra or {})})
        return Message(content, reply_to=msg)
    return app


def test_only_the_arrays_and_whitelisted_scalar_metrics_leave(caplog):
    metrics = {"num-examples": 8, "train-loss": 1.5, "loss.clip": 0.7, "dp-epsilon": 2.0,
               "patient-count": 3, "loss.per_study": [0.1, 0.2]}
    extra = {"config": ConfigRecord({"study": "1.2.840.1234"}), "debug": MetricRecord({"train-loss": 1.0}),
             "more": ArrayRecord(array_dict={"x": Array(np.zeros(2, np.float32))})}
    with caplog.at_level(logging.WARNING, logger="client.egress"):
        reply = guard(instruction(), context(), replying(metrics=metrics, extra=extra), None)
    assert not reply.has_error()
    assert set(reply.content.array_records.keys()) == {"arrays"}
    assert list(reply.content.config_records.keys()) == []
    assert dict(reply.content.metric_records["metrics"]) == {"num-examples": 8, "train-loss": 1.5, "loss.clip": 0.7,
                                                             "dp-epsilon": 2.0}
    assert set(reply.content.metric_records.keys()) == {"metrics"}
    for dropped in ("metrics.patient-count", "metrics.loss.per_study", "debug.train-loss", "'more'", "'config'"):
        assert dropped in caplog.text
    assert np.array_equal(reply.content["arrays"]["a.weight"].numpy(), ARRAYS["a.weight"])


@pytest.mark.parametrize("arrays,problem", [
    ({"a.weight": ARRAYS["a.weight"]}, "array names differ"),
    ({**ARRAYS, "c": np.zeros(1, np.float32)}, "array names differ"),
    ({**ARRAYS, "b.bias": np.zeros(4, np.float32)}, "'b.bias' has shape (4,)"),
    ({**ARRAYS, "b.bias": np.array([0, np.nan, 0], np.float32)}, "non-finite"),
    ({**ARRAYS, "b.bias": np.zeros(3, np.float64)}, "'b.bias' has shape (3,) float64"),
])
def test_a_reply_whose_arrays_differ_from_the_global_models_is_withheld(arrays, problem):
    reply = guard(instruction(), context(), replying(arrays=arrays), None)
    assert reply.has_error() and not reply.has_content()
    assert "withheld by the site's egress guard" in reply.error.reason and problem in reply.error.reason


def test_a_reply_without_num_examples_is_withheld():
    reply = guard(instruction(), context(), replying(metrics={"train-loss": 1.0}), None)
    assert reply.has_error() and "num-examples" in reply.error.reason


def test_a_failure_is_reported_by_its_type_only_and_logged_in_full_at_the_site(caplog):
    def failing(msg, ctx):
        raise FileNotFoundError("no cache in /secure/pacs/PAT-0042/1.2.840.113619.2.55 for ACC123456")

    with caplog.at_level(logging.ERROR, logger="client.egress"):
        reply = guard(instruction(), context(), failing, None)
    assert reply.has_error()
    assert reply.error.reason == "site training failed (FileNotFoundError); the site's log has the details"
    assert "PAT-0042" in caplog.text  # the detail stays with the site operator


def test_a_broken_site_config_does_not_leak_its_path(tmp_path):
    bad = tmp_path / "secret-hospital-name" / "site.yaml"
    reply = egress_guard_mod(instruction(), context(bad), lambda m, c: (_ for _ in ()).throw(
        SiteConfigError(f"site config not found: {bad}")))
    assert reply.has_error() and "secret-hospital-name" not in reply.error.reason


def test_the_egress_log_records_what_left(tmp_path, site_yaml_writer):
    (tmp_path / "dicom").mkdir()
    (tmp_path / "reports.csv").write_text("AccessionNumber,ReportText\n")
    cfg = load_site_config(site_yaml_writer(tmp_path, privacy={"egress_log": "audit/egress.jsonl"}))
    guard(instruction(), context(), replying(metrics={"num-examples": 4, "secret": 1}), cfg)
    guard(instruction(), context(), lambda m, c: 1 / 0, cfg)
    lines = [json.loads(x) for x in (tmp_path / "audit" / "egress.jsonl").read_text().splitlines()]
    assert [("arrays" in x, "error" in x) for x in lines] == [(True, False), (False, True)]
    assert lines[0]["metrics"] == {"num-examples": 4}
    assert lines[0]["arrays"]["a.weight"]["shape"] == [2, 3] and len(lines[0]["arrays"]["a.weight"]["sha256"]) == 64
    assert "ZeroDivisionError" in lines[1]["error"]["reason"]


def test_the_whitelist_holds_aggregates_only():
    assert "num-examples" in ALLOWED_METRICS and "loss.clip" in ALLOWED_METRICS
    assert not any(word in name for name in ALLOWED_METRICS for word in ("patient", "study", "uid", "path", "accession"))
    from shared_models.config import OBJECTIVES

    assert {n[5:] for n in ALLOWED_METRICS if n.startswith("loss.")} == set(OBJECTIVES)  # loss.report: the objective


def test_client_side_clipping_runs_only_when_the_server_asks_for_it():
    sent = instruction(config={"server_round": 1})
    big = {k: v + 10 for k, v in ARRAYS.items()}
    untouched = dp_clipping_mod(sent, context(), replying(arrays=big))
    assert np.array_equal(untouched.content["arrays"]["a.weight"].numpy(), big["a.weight"])
    clipped = dp_clipping_mod(instruction(config={"server_round": 1, "clipping_norm": 1.0}), context(),
                              replying(arrays=big))
    update = np.concatenate([(clipped.content["arrays"][k].numpy() - ARRAYS[k]).ravel() for k in ARRAYS])
    assert np.linalg.norm(update) == pytest.approx(1.0, rel=1e-5)


# --- app pinning ---------------------------------------------------------------------------------

class FakeFab:
    def __init__(self, hash_str: str) -> None:
        self.hash_str = hash_str


def run_clientapp(fab, msg, allowed):
    """Named as Flower's runner, whose ``fab`` local ``running_fab_hash`` reads."""
    return pin_check(msg, context(), replying(), allowed)


def test_a_pinned_site_runs_only_the_fab_hashes_it_allows():
    good, other = "a" * 64, "b" * 64
    assert not run_clientapp(FakeFab(good), instruction(), [good]).has_error()
    assert not run_clientapp(FakeFab(good), instruction(), [good.upper(), other]).has_error()
    refused = run_clientapp(FakeFab(other), instruction(), [good])
    assert refused.has_error() and f"refuses to run FAB {other}" in refused.error.reason
    assert "privacy.allowed_fab_hashes" in refused.error.reason


def test_without_a_known_fab_a_pinned_site_refuses_and_an_unpinned_one_runs():
    assert running_fab_hash() is None
    assert pin_check(instruction(), context(), replying(), ["a" * 64]).has_error()
    assert not pin_check(instruction(), context(), replying(), []).has_error()


def test_the_fab_hash_of_the_project_is_stable_and_well_formed():
    first, second = fab_hash_of_project(REPO), fab_hash_of_project(REPO)
    assert first == second and len(first) == 64 and int(first, 16) >= 0


def test_allowed_fab_hashes_are_checked_in_the_site_yaml(tmp_path, site_yaml_writer):
    (tmp_path / "dicom").mkdir()
    (tmp_path / "reports.csv").write_text("AccessionNumber,ReportText\n")
    with pytest.raises(SiteConfigError, match="privacy.allowed_fab_hashes.*not a FAB hash"):
        load_site_config(site_yaml_writer(tmp_path, privacy={"allowed_fab_hashes": ["1.0.0"]}))


def test_the_site_cli_prints_the_fab_hash(capsys, tmp_path):
    from client.cli import main

    assert main(["fab-hash", str(REPO)]) == 0
    assert capsys.readouterr().out.strip() == fab_hash_of_project(REPO)
    assert main(["fab-hash", str(tmp_path)]) == 2
