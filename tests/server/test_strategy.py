"""Checked strategies: every bad reply is rejected with its reason, valid ones are averaged by examples."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from server.checkpoint import RunFolder, load_arrays_file, save_arrays
from server.federation import round_config, run_federation
from server.settings import RunSettings
from server.strategy import (CheckedFedAdam, CheckedFedAvg, CheckedFedProx, aggregate_metrics, build_strategy,
                             check_reply)

DEAD = "dead"  # a node that never replies (see conftest.InProcessGrid)

REFERENCE = {
    "encoder.weight": np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32),
    "encoder.bias": np.random.default_rng(1).normal(size=(5,)).astype(np.float32),
    "head.weight": np.random.default_rng(2).normal(size=(2, 2, 2)).astype(np.float32),
}


def record(arrays):
    return ArrayRecord(array_dict={k: Array(np.asarray(v)) for k, v in arrays.items()})


def delta(seed, scale=0.01):
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in REFERENCE.items()}


def replying(arrays_fn, metrics=None, records=None):
    """A node handler that replies with ``arrays_fn(global arrays)`` and ``metrics``."""

    def handler(msg, context):
        received = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        content = {"arrays": record(arrays_fn(received))}
        if metrics is not None:
            content["metrics"] = MetricRecord(metrics)
        content.update(records or {})
        return Message(RecordDict(content), reply_to=msg)

    return handler


def raising(msg, context):
    raise RuntimeError("site disk full")


def plus(d):
    return lambda a: {k: a[k] + d[k] for k in a}


def settings(tmp_path, **kw):
    base = dict(preset="tiny", min_replies=2, min_available=2, max_update_norm=10.0, run_dir=str(tmp_path / "run"))
    return RunSettings(**{**base, **kw})


def run_round(strategy, grid, server_round=1, arrays=None):
    arrays = REFERENCE if arrays is None else arrays
    messages = strategy.configure_train(server_round, record(arrays), ConfigRecord({"lr": 0.1}), grid)
    return strategy.aggregate_train(server_round, list(grid.send_and_receive(messages, timeout=10)))


# -- check_reply --------------------------------------------------------------------------------------------


def content(arrays, metrics={"num-examples": 4}):
    return RecordDict({"arrays": record(arrays), "metrics": MetricRecord(metrics)})


@pytest.mark.parametrize("arrays, metrics, reason", [
    ({**REFERENCE, "encoder.bias": np.full(5, np.nan, np.float32)}, {"num-examples": 4},
     "array 'encoder.bias' holds non-finite values"),
    ({**REFERENCE, "encoder.bias": np.full(5, np.inf, np.float32)}, {"num-examples": 4}, "non-finite"),
    ({**REFERENCE, "encoder.weight": np.zeros((3, 4), np.float32)}, {"num-examples": 4},
     "array 'encoder.weight' has shape (3, 4), the global model's is (4, 3)"),
    ({k: v for k, v in REFERENCE.items() if k != "head.weight"}, {"num-examples": 4}, "missing ['head.weight']"),
    ({**REFERENCE, "extra.weight": np.zeros(2, np.float32)}, {"num-examples": 4}, "unexpected ['extra.weight']"),
    ({k: v + 100.0 for k, v in REFERENCE.items()}, {"num-examples": 4}, "update norm 500 exceeds the bound 10"),
    (REFERENCE, {"train-loss": 1.0}, "no 'num-examples' metric"),
    (REFERENCE, {"num-examples": 0}, "num-examples should be > 0, got 0"),
])
def test_check_reply_names_the_problem(arrays, metrics, reason):
    reference = {k: v.astype(np.float64) for k, v in REFERENCE.items()}
    problem = check_reply(content(arrays, metrics), reference, max_update_norm=10.0)
    assert problem is not None and reason in problem


def test_check_reply_accepts_a_bounded_update_and_measures_the_l2_distance():
    reference = {k: v.astype(np.float64) for k, v in REFERENCE.items()}
    moved = {k: v + 1.0 for k, v in REFERENCE.items()}  # L2 distance sqrt(12 + 5 + 8) = 5
    assert check_reply(content(moved), reference, max_update_norm=5.01) is None
    assert "update norm 5 exceeds the bound 4.99" in check_reply(content(moved), reference, max_update_norm=4.99)
    assert check_reply(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reference, 1.0) == \
        "no 'arrays' in the reply"


# -- a round with every kind of bad reply ----------------------------------------------------------------


def test_bad_replies_are_rejected_logged_and_left_out_of_the_average(tmp_path, inprocess_grid, caplog):
    good = {101: (delta(1), 3, 0.5), 102: (delta(2), 5, 1.5)}  # node: (update, examples, loss)
    nan = {**REFERENCE, "encoder.bias": np.full(5, np.nan, np.float32)}
    bad = {"num-examples": 7, "train-loss": 9.0}  # would pull the average if it were let in
    handlers = {
        101: replying(plus(good[101][0]), {"num-examples": 3, "train-loss": 0.5}),
        102: replying(plus(good[102][0]), {"num-examples": 5, "train-loss": 1.5}),
        103: replying(lambda a: nan, bad),
        104: replying(lambda a: {**a, "head.weight": np.zeros((2, 2), np.float32)}, bad),
        105: replying(lambda a: {k: v for k, v in a.items() if k != "encoder.weight"}, bad),
        106: replying(lambda a: {k: v + 2000.0 for k, v in a.items()}, bad),  # 2000 * sqrt(25): 1000x the bound
        107: replying(plus(delta(7)), {"train-loss": 9.0}),
        108: raising,
        109: DEAD,
    }
    grid = inprocess_grid(handlers)
    strategy = build_strategy(settings(tmp_path, min_available=len(handlers)))
    assert isinstance(strategy, CheckedFedAvg)
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, metrics = run_round(strategy, grid)

    p = strategy.participation
    assert (p["sampled"], p["replied"], p["valid"]) == (9, 8, 2)
    rejected = {r["node"]: r["reason"] for r in p["rejected"]}
    assert set(rejected) == {103, 104, 105, 106, 107}
    assert "array 'encoder.bias' holds non-finite values" in rejected[103]
    assert "array 'head.weight' has shape (2, 2), the global model's is (2, 2, 2)" in rejected[104]
    assert "missing ['encoder.weight']" in rejected[105]
    assert "update norm 1e+04 exceeds the bound 10" in rejected[106]
    assert "no 'num-examples' metric" in rejected[107]
    assert [(e["node"], "site disk full" in e["reason"]) for e in p["errors"]] == [(108, True)]
    for node in (103, 104, 105, 106, 107):
        assert f"round 1: rejected the reply of node {node}: {rejected[node]}" in caplog.text
    assert "round 1: node 108 replied with an error" in caplog.text and "site disk full" in caplog.text

    expected = {k: (3 * (v.astype(np.float64) + good[101][0][k]) + 5 * (v.astype(np.float64) + good[102][0][k])) / 8
                for k, v in REFERENCE.items()}
    assert set(arrays.keys()) == set(REFERENCE)
    for key, value in expected.items():
        np.testing.assert_allclose(arrays[key].numpy(), value, rtol=1e-6, atol=1e-6)
    assert metrics["num-examples"] == 8
    assert metrics["train-loss"] == pytest.approx((3 * 0.5 + 5 * 1.5) / 8)


def test_a_reply_with_extra_records_is_rejected_instead_of_failing_the_round(tmp_path, inprocess_grid):
    """Flower's FedAvg raises InconsistentMessageReplies for a reply that has more than one ArrayRecord or
    MetricRecord: one such reply (a buggy or hostile site) must not stop the server."""
    handlers = {
        101: replying(plus(delta(1)), {"num-examples": 2}),
        102: replying(plus(delta(2)), {"num-examples": 2}),
        103: replying(plus(delta(3)), {"num-examples": 2}, records={"more": record(REFERENCE)}),
        104: replying(plus(delta(4)), {"num-examples": 2}, records={"extra": MetricRecord({"x": 1.0})}),
    }
    strategy = build_strategy(settings(tmp_path, min_available=4))
    arrays, _ = run_round(strategy, inprocess_grid(handlers))
    assert arrays is not None
    assert strategy.participation["valid"] == 2
    assert {r["node"] for r in strategy.participation["rejected"]} == {103, 104}


def test_sites_reporting_different_metrics_are_still_aggregated(tmp_path, inprocess_grid):
    """aggregate_metrics averages each metric over the sites that report it; a site with an extra metric
    (another client version, a site-only measurement) must not make the round fail."""
    handlers = {
        101: replying(plus(delta(1)), {"num-examples": 2, "train-loss": 1.0}),
        102: replying(plus(delta(2)), {"num-examples": 6, "train-loss": 3.0, "loss.mae": 0.5}),
    }
    strategy = build_strategy(settings(tmp_path))
    arrays, metrics = run_round(strategy, inprocess_grid(handlers))
    assert arrays is not None
    assert metrics["train-loss"] == pytest.approx(2.5) and metrics["loss.mae"] == pytest.approx(0.5)


# -- min_replies ---------------------------------------------------------------------------------------------


def test_too_few_valid_replies_skip_the_aggregation(tmp_path, inprocess_grid, caplog):
    handlers = {101: replying(plus(delta(1)), {"num-examples": 3}), 102: raising, 103: DEAD}
    strategy = build_strategy(settings(tmp_path, min_replies=2, min_available=3))
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        assert run_round(strategy, inprocess_grid(handlers)) == (None, None)
    assert strategy.participation["valid"] == 1 and strategy.participation["replied"] == 2
    assert "round 1 skipped: 1 valid replies, 2 needed" in caplog.text


def fake_training(node, failing_rounds=()):
    """A handler that moves every float array by a node-specific step, and raises in ``failing_rounds``."""

    def handler(msg, context):
        rnd = int(msg.content["config"]["server_round"])
        if rnd in failing_rounds:
            raise RuntimeError(f"node {node} is down in round {rnd}")
        arrays = {}
        for key, value in msg.content["arrays"].items():
            a = value.numpy()
            floating = np.issubdtype(a.dtype, np.floating)
            arrays[key] = np.array(a + 0.001 * (node - 100), dtype=a.dtype) if floating else a
        return Message(RecordDict({"arrays": ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
                                   "metrics": MetricRecord({"num-examples": node - 100, "train-loss": float(rnd)})}),
                       reply_to=msg)

    return handler


def test_a_skipped_round_keeps_the_global_model_and_the_run_goes_on(tmp_path, inprocess_grid, model_yaml_writer):
    preset = model_yaml_writer(tmp_path / "model.yaml")
    grid = inprocess_grid({101: fake_training(101), 102: fake_training(102, failing_rounds=(2,))})
    s = settings(tmp_path, preset=str(preset), rounds=3, max_update_norm=1e6)
    summary = run_federation(grid, s)

    assert (summary["rounds_completed"], summary["rounds_skipped"]) == (3, 1)
    folder = RunFolder(s.run_dir, keep=10)
    history = folder.history()
    assert [h["round"] for h in history] == [1, 2, 3]
    assert [h["skipped"] for h in history] == [False, True, False]
    assert history[1]["participation"]["valid"] == 1 and history[1]["train"] == {}
    assert "node 102 is down in round 2" in history[1]["participation"]["errors"][0]["reason"]
    assert history[2]["participation"]["valid"] == 2 and history[2]["train"]["train-loss"] == pytest.approx(3.0)
    ckpt = {r: load_arrays_file(folder.checkpoints / f"round_{r:04d}" / "global.safetensors") for r in (0, 1, 2, 3)}
    key = "vision.patch_embed.weight"
    step = (1 * 0.001 + 2 * 0.002) / 3  # the example-weighted mean move of nodes 101 and 102
    np.testing.assert_allclose(ckpt[1][key] - ckpt[0][key], step, atol=1e-6)
    assert all(np.array_equal(ckpt[2][k], ckpt[1][k]) for k in ckpt[1])  # the skipped round kept the model
    np.testing.assert_allclose(ckpt[3][key] - ckpt[2][key], step, atol=1e-6)
    assert all(np.array_equal(summary["final_arrays"][k], ckpt[3][k]) for k in ckpt[3])
    assert json.loads((folder.checkpoints / "round_0002" / "state.json").read_text())["round"] == 2


# -- FedAdam and FedProx -----------------------------------------------------------------------------------


def test_fedadam_state_round_trips_through_a_checkpoint_file(tmp_path, inprocess_grid):
    handlers = {101: replying(plus(delta(1, 0.1)), {"num-examples": 2}),
                102: replying(plus(delta(2, 0.1)), {"num-examples": 1})}
    s = settings(tmp_path, strategy="fedadam", server_lr=0.05)
    first = build_strategy(s)
    assert isinstance(first, CheckedFedAdam) and first.eta == 0.05 and first.eta_l == s.lr
    assert first.state_arrays() == {}
    arrays, _ = run_round(first, inprocess_grid(handlers), 1)
    arrays = {k: v.numpy() for k, v in arrays.items()}
    state = first.state_arrays()
    assert set(state) == {f"{m}/{k}" for m in ("m_t", "v_t") for k in REFERENCE}
    assert any(np.abs(v).sum() > 0 for v in state.values())

    save_arrays(tmp_path / "strategy.safetensors", state)
    second = build_strategy(s)
    second.load_state_arrays(load_arrays_file(tmp_path / "strategy.safetensors"))
    for name in ("m_t", "v_t"):
        assert set(getattr(second, name)) == set(REFERENCE)
        for k in REFERENCE:
            np.testing.assert_array_equal(getattr(second, name)[k], getattr(first, name)[k])
    # the restored strategy's next step is the one the uninterrupted strategy takes
    after_first, _ = run_round(first, inprocess_grid(handlers), 2, arrays)
    after_second, _ = run_round(second, inprocess_grid(handlers), 2, arrays)
    fresh, _ = run_round(build_strategy(s), inprocess_grid(handlers), 2, arrays)
    for k in REFERENCE:
        np.testing.assert_allclose(after_second[k].numpy(), after_first[k].numpy(), rtol=0, atol=1e-7)
    assert any(not np.allclose(fresh[k].numpy(), after_first[k].numpy()) for k in REFERENCE)


def test_fedadam_keeps_the_global_models_float32(tmp_path, inprocess_grid, model_yaml_writer):
    """Flower's FedAdam step mixes in a NumPy float64 scalar: the aggregate must still be the model's dtype,
    or every later download and checkpoint doubles in size."""
    preset = model_yaml_writer(tmp_path / "model.yaml")
    grid = inprocess_grid({101: fake_training(101), 102: fake_training(102)})
    s = settings(tmp_path, preset=str(preset), rounds=2, strategy="fedadam", max_update_norm=1e6)
    summary = run_federation(grid, s)
    assert summary["rounds_skipped"] == 0
    assert {str(v.dtype) for v in summary["final_arrays"].values()} == {"float32"}
    folder = RunFolder(s.run_dir)
    assert {str(v.dtype) for v in load_arrays_file(folder.checkpoints / "round_0002" / "global.safetensors").values()} \
        == {"float32"}
    sent = [h["bytes_sent_per_site"] for h in folder.history()]
    assert sent[0] == sent[1] == sum(v.nbytes for v in load_arrays_file(
        folder.checkpoints / "round_0000" / "global.safetensors").values())


def test_fedprox_sends_proximal_mu_in_the_round_config(tmp_path, inprocess_grid):
    handlers = {101: replying(plus(delta(1)), {"num-examples": 2}), 102: replying(plus(delta(2)), {"num-examples": 2})}
    for name, mu, expected in (("fedprox", 0.25, 0.25), ("fedavg", 0.25, 0.0)):
        s = settings(tmp_path, strategy=name, proximal_mu=mu)
        strategy = build_strategy(s)
        assert isinstance(strategy, CheckedFedProx) == (name == "fedprox")
        grid = inprocess_grid(handlers)
        messages = strategy.configure_train(1, record(REFERENCE), round_config(s, 1, "key"), grid)
        assert strategy.aggregate_train(1, grid.send_and_receive(messages))[0] is not None
        configs = [m.content["config"] for m in grid.received]
        assert len(configs) == 2 and all(c["proximal_mu"] == expected for c in configs)
        assert all(c["run_key"] == "key" and c["server_round"] == 1 for c in configs)


# -- metrics ---------------------------------------------------------------------------------------------------


def test_aggregate_metrics_are_example_weighted_means_over_the_sites_that_report_them():
    contents = [
        RecordDict({"metrics": MetricRecord({"num-examples": 2, "train-loss": 1.0, "loss.clip": 4.0})}),
        RecordDict({"metrics": MetricRecord({"num-examples": 6, "train-loss": 3.0, "loss.mae": 0.5})}),
        RecordDict({"metrics": MetricRecord({"num-examples": 12, "train-loss": 0.0, "loss.clip": 2.0})}),
    ]
    out = aggregate_metrics(contents, "num-examples")
    assert set(out.keys()) == {"num-examples", "train-loss", "loss.clip", "loss.mae"}
    assert out["num-examples"] == 20
    assert out["train-loss"] == pytest.approx((2 * 1.0 + 6 * 3.0 + 12 * 0.0) / 20)
    assert out["loss.clip"] == pytest.approx((2 * 4.0 + 12 * 2.0) / 14)
    assert out["loss.mae"] == pytest.approx(0.5)


# -- streaming aggregation -----------------------------------------------------------------------------------


def streamed_round(strategy, grid, server_round=1, arrays=None):
    """The federation loop's path: each reply checked and folded in as it arrives."""
    from server.federation import _Fold, receive_replies

    arrays = REFERENCE if arrays is None else arrays
    messages = strategy.configure_train(server_round, record(arrays), ConfigRecord({"lr": 0.1}), grid)
    fold = _Fold(strategy, server_round)
    receive_replies(grid, messages, 1.0, fold)
    return strategy.aggregate_streamed(server_round, fold.mean, messages[0])


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam"])
def test_streamed_aggregation_equals_flowers_aggregation_over_the_list(name, tmp_path, inprocess_grid):
    handlers = {101: replying(plus(delta(1)), {"num-examples": 3, "train-loss": 0.5}),
                102: replying(plus(delta(2)), {"num-examples": 5, "train-loss": 1.5}),
                103: replying(lambda a: {k: v + np.nan for k, v in a.items()}, {"num-examples": 9}),
                104: DEAD}
    results = []
    for streamed in (False, True):
        strategy = build_strategy(settings(tmp_path, strategy=name, min_available=4, proximal_mu=0.1))
        grid = inprocess_grid(handlers)
        arrays, metrics = (streamed_round if streamed else run_round)(strategy, grid)
        results.append(({k: v.numpy() for k, v in arrays.items()}, dict(metrics), dict(strategy.participation)))
    (listed, listed_metrics, listed_part), (stream, stream_metrics, stream_part) = results
    for key in REFERENCE:
        assert listed[key].shape == stream[key].shape  # (FedAdam returns float64; the federation loop casts back)
        np.testing.assert_allclose(stream[key], listed[key], rtol=1e-6, atol=1e-7)
    assert stream_metrics == pytest.approx(listed_metrics)
    assert stream_metrics["train-loss"] == pytest.approx((3 * 0.5 + 5 * 1.5) / 8)
    for field in ("sampled", "replied", "valid"):
        assert stream_part[field] == listed_part[field]
    assert [r["node"] for r in stream_part["rejected"]] == [103]
    if name != "fedadam":  # the example-weighted mean itself
        expected = {k: REFERENCE[k] + (3 * delta(1)[k] + 5 * delta(2)[k]) / 8 for k in REFERENCE}
        for key in REFERENCE:
            assert stream[key].dtype == np.float32
            np.testing.assert_allclose(stream[key], expected[key], rtol=1e-6, atol=1e-7)


def test_replies_are_pulled_one_at_a_time_and_a_dead_site_costs_only_the_timeout(inprocess_grid):
    from server.federation import receive_replies

    grid = inprocess_grid({101: replying(plus(delta(1)), {"num-examples": 1}),
                           102: replying(plus(delta(2)), {"num-examples": 1}), 103: DEAD})
    pulls, seen = [], []
    pull = grid.pull_messages
    grid.pull_messages = lambda ids: pulls.append(list(ids)) or pull(ids)
    strategy = build_strategy(RunSettings(preset="tiny", min_available=3))
    messages = strategy.configure_train(1, record(REFERENCE), ConfigRecord({"lr": 0.1}), grid)
    import time

    started = time.time()
    receive_replies(grid, messages, timeout=1.5, on_reply=seen.append, poll_s=0.2)
    assert 1.5 <= time.time() - started < 10
    assert all(len(ids) == 1 for ids in pulls)  # never more than one site's arrays at a time
    assert sorted(m.metadata.src_node_id for m in seen) == [101, 102]  # each reply handed over once
