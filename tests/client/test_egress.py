"""The ClientApp's mods: the egress guard (what may leave a site) and app pinning (which FABs may run)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.app import dp_clipping_mod, egress_guard_mod
from client.approvals import AppPolicy
from client.egress import ALLOWED_METRICS, filter_reply, guard
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
    ({**ARRAYS, "b.bias": np.zeros(4, np.float32)}, "'b.bias' does not have the shape (3,)"),
    ({**ARRAYS, "b.bias": np.array([0, np.nan, 0], np.float32)}, "non-finite"),
    ({**ARRAYS, "b.bias": np.zeros(3, np.float64)}, "'b.bias' is not of dtype float32 or float16 or bfloat16"),
    ({**ARRAYS, "b.bias": np.zeros(3, np.int32)}, "'b.bias' is not of dtype float32"),
    ({"c": np.zeros(1, np.float32)}, "none of the global model's arrays"),
])
def test_a_reply_whose_arrays_differ_from_the_global_models_is_withheld(arrays, problem):
    reply = guard(instruction(), context(), replying(arrays=arrays), None)
    assert reply.has_error() and not reply.has_content()
    assert "withheld by the site's egress guard" in reply.error.reason and problem in reply.error.reason


def bfloat16(values) -> Array:
    """bfloat16 on the wire: the uint16 bit patterns of float32 values, labelled bfloat16 (client/egress.py)."""
    bits = (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return Array(dtype="bfloat16", shape=bits.shape, stype="numpy.ndarray", data=Array(bits).data)


def reply_with(arrays: dict[str, Array], metrics=None) -> Message:
    content = RecordDict({"arrays": ArrayRecord(array_dict=arrays),
                          "metrics": MetricRecord(metrics or {"num-examples": 4})})
    return Message(content, reply_to=instruction())


def test_partial_and_half_precision_replies_pass():
    sent = instruction()
    extra = {"c": Array(np.zeros(1, np.float32))}
    reply, dropped = filter_reply(sent, reply_with({"b.bias": bfloat16([1.5, -2.0, 0.0]),
                                                    "a.weight": Array(np.ones((2, 3), np.float16)), **extra}))
    assert not reply.has_error() and dropped == ["array arrays.c"]
    arrays = reply.content["arrays"]
    assert list(arrays.keys()) == ["a.weight", "b.bias"]  # the server's order, the extra name dropped
    assert arrays["a.weight"].dtype == "float16" and arrays["a.weight"].numpy().dtype == np.float16
    assert arrays["b.bias"].dtype == "bfloat16"
    restored = (arrays["b.bias"].numpy().astype(np.uint32) << 16).view(np.float32)
    assert restored.tolist() == [1.5, -2.0, 0.0]
    partial, _ = filter_reply(sent, reply_with({"b.bias": Array(np.ones(3, np.float32))}))
    assert list(partial.content["arrays"].keys()) == ["b.bias"]


@pytest.mark.parametrize("array,problem", [
    (bfloat16([1.0, np.inf, 0.0]), "non-finite"),
    (Array(dtype="bfloat16", shape=(3,), stype="numpy.ndarray", data=Array(np.zeros(3, np.float32)).data),
     "not a plain bfloat16 array"),
    (Array(dtype="float32", shape=(3,), stype="raw-bytes", data=b"\0" * 12), "not a plain float32 array"),
])
def test_a_malformed_half_or_opaque_array_is_withheld(array, problem):
    reply, _ = filter_reply(instruction(), reply_with({"a.weight": Array(ARRAYS["a.weight"]), "b.bias": array}))
    assert reply.has_error() and problem in reply.error.reason


def test_bytes_hidden_behind_an_arrays_data_do_not_leave():
    sent = Array(ARRAYS["b.bias"])
    smuggled = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=sent.data + b"PAT-0042 ACC123456")
    assert np.array_equal(smuggled.numpy(), ARRAYS["b.bias"])  # numpy reads past nothing: the tail rides along
    reply, _ = filter_reply(instruction(), reply_with({"a.weight": Array(ARRAYS["a.weight"]), "b.bias": smuggled}))
    assert b"PAT-0042" not in reply.content["arrays"]["b.bias"].data  # re-serialized by the site


@pytest.mark.parametrize("num_examples,ok", [(8, True), (100, True), (101, False), (0, False), (8.0, False)])
def test_num_examples_must_be_an_int_within_the_sites_bound(num_examples, ok):
    reply, _ = filter_reply(instruction(), replying(metrics={"num-examples": num_examples})(instruction(), None),
                            max_num_examples=100)
    assert reply.has_error() != ok
    if not ok:
        assert "within 1..100 (privacy.max_num_examples)" in reply.error.reason


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


def policy(*hashes: str, any_app: bool = False) -> AppPolicy:
    return AppPolicy(any_app=any_app, hashes=frozenset(h.lower() for h in hashes))


def run_clientapp(fab, msg, allowed):
    """Named as Flower's app process, whose ``fab`` local ``running_fab_hash`` reads."""
    return pin_check(msg, context(), replying(), allowed)


def run_installed_app(fab, msg, allowed):
    """Named as the site runner's app process (client/app_process.py), read the same way."""
    return pin_check(msg, context(), replying(), allowed)


@pytest.mark.parametrize("caller", [run_clientapp, run_installed_app])
def test_a_pinned_site_runs_only_the_fab_hashes_it_allows(caller):
    good, other = "a" * 64, "b" * 64
    assert not caller(FakeFab(good), instruction(), policy(good)).has_error()
    assert not caller(FakeFab(good), instruction(), policy(good.upper(), other)).has_error()
    refused = caller(FakeFab(other), instruction(), policy(good))
    assert refused.has_error() and f"refuses to run FAB {other}" in refused.error.reason
    assert "privacy.allowed_fab_hashes" in refused.error.reason
    assert "approved no app version" in caller(FakeFab(other), instruction(), policy()).error.reason


def test_without_a_known_fab_only_a_site_that_allows_any_app_runs_it():
    assert running_fab_hash() is None
    assert pin_check(instruction(), context(), replying(), policy("a" * 64)).has_error()
    assert pin_check(instruction(), context(), replying(), policy()).has_error()
    assert not pin_check(instruction(), context(), replying(), policy(any_app=True)).has_error()


def test_the_fab_hash_of_the_project_is_stable_and_well_formed():
    first, second = fab_hash_of_project(REPO), fab_hash_of_project(REPO)
    assert first == second and len(first) == 64 and int(first, 16) >= 0


@pytest.mark.parametrize("value,problem", [
    (["1.0.0"], "not a FAB hash"),
    ("all", "a list of FAB hashes or the word 'any'"),
    ({"hash": "a" * 64}, "a list of FAB hashes or the word 'any'"),
])
def test_allowed_fab_hashes_are_checked_in_the_site_yaml(tmp_path, site_yaml_writer, value, problem):
    (tmp_path / "dicom").mkdir()
    (tmp_path / "reports.csv").write_text("AccessionNumber,ReportText\n")
    with pytest.raises(SiteConfigError, match=f"privacy.allowed_fab_hashes.*{problem}"):
        load_site_config(site_yaml_writer(tmp_path, privacy={"allowed_fab_hashes": value}))
    for fine in ("any", ["A" * 64], [], None):
        load_site_config(site_yaml_writer(tmp_path, privacy={"allowed_fab_hashes": fine}))


def test_the_site_cli_prints_the_fab_hash(capsys, tmp_path):
    from client.cli import main

    assert main(["fab-hash", str(REPO)]) == 0
    assert capsys.readouterr().out.strip() == fab_hash_of_project(REPO)
    assert main(["fab-hash", str(tmp_path)]) == 2
