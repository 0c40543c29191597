"""Whole federated runs in one process: the real ClientApp on tiny ingested sites, over an in-process Grid."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from safetensors.numpy import save_file
from safetensors.torch import save_file as torch_save_file

from server.checkpoint import RunFolder, load_arrays_file, save_arrays
from server.federation import initial_arrays, run_federation, to_record
from server.settings import RunSettings, settings_from_run_config
from shared_models import build_model, load_arrays, load_model_config, load_preset, model_to_arrays
from shared_models import wire


NODES = (101, 102)


def message_arrays(msg: Message) -> dict:
    """The per-name arrays of a training instruction, unpacked with the layout its config carries."""
    buffers = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    return wire.unpack(buffers, str(msg.content["config"][wire.LAYOUT_KEY]))

def real_grid(inprocess_grid, sites):
    """Every node runs the real ClientApp with its own site YAML."""
    return inprocess_grid({n: None for n in NODES[: len(sites)]},
                          {n: {"site-config": str(p)} for n, p in zip(NODES, sites)})


def run_settings(preset, run_dir, **kw):
    base = dict(preset=str(preset), rounds=2, local_steps=2, min_replies=2, min_available=2, run_dir=str(run_dir),
                objectives={"clip": 1, "mae": 1}, max_update_norm=1e6)
    return RunSettings(**{**base, **kw})


def max_abs_diff(a, b):
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)), initial=0.0)) for k in a)


def test_scalar_parameters_travel_and_checkpoint_as_shape_1(tmp_path, model_yaml_writer):
    """The project's convention (shared_models.state): 0-d parameters (``logit_scale``) travel as shape (1,)."""
    model = build_model(load_model_config(str(model_yaml_writer(tmp_path / "model.yaml"))))
    arrays = model_to_arrays(model)
    assert model.logit_scale.dim() == 0 and arrays["logit_scale"].shape == (1,)
    record = to_record(arrays)
    assert {k: v.numpy().shape for k, v in record.items()} == {k: v.shape for k, v in arrays.items()}
    save_arrays(tmp_path / "a.safetensors", arrays)
    loaded = load_arrays_file(tmp_path / "a.safetensors")
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in arrays.items()}
    load_arrays(model, loaded)  # and the model takes them back


def test_two_rounds_with_the_real_client_app(tmp_path, tiny_sites, inprocess_grid):
    sites, model_yaml = tiny_sites(2)
    grid = real_grid(inprocess_grid, sites)
    s = run_settings(model_yaml, tmp_path / "run")
    summary = run_federation(grid, s)

    folder = RunFolder(s.run_dir)
    start = folder.checkpoints / "round_0000" / "global.safetensors"
    initial = load_arrays_file(start)
    final = summary["final_arrays"]
    assert summary["rounds_completed"] == 2 and summary["rounds_skipped"] == 0
    assert max_abs_diff(initial, final) > 0
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in initial.items()}
    for r in (1, 2):
        path = folder.checkpoints / f"round_{r:04d}"
        assert (path / "global.safetensors").is_file() and (path / "state.json").is_file()
        assert json.loads((path / "state.json").read_text())["round"] == r
    assert max_abs_diff(load_arrays_file(folder.checkpoints / "round_0002" / "global.safetensors"), final) == 0
    history = [json.loads(line) for line in folder.history_path.read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2]
    for h in history:
        assert not h["skipped"]
        assert h["participation"]["valid"] == 2 and h["participation"]["sampled"] == 2
        assert h["participation"]["rejected"] == [] and h["participation"]["errors"] == []
        assert h["train"]["num-examples"] == 2 * 2 * 2  # 2 sites x 2 steps x batch 2
        assert np.isfinite(h["train"]["train-loss"]) and np.isfinite(h["train"]["loss.clip"])
    assert history[0]["train"]["optimizer-resumed"] == 0 and history[1]["train"]["optimizer-resumed"] == 1
    for h in history:  # per-site training time, and the overhead on top of the slowest site
        sites = h["participation"]["sites"]
        assert len(sites) == 2 and all(x["train-seconds"] > 0 and x["num-examples"] > 0 for x in sites)
        slowest = max(x["train-seconds"] for x in sites)
        assert h["overhead_seconds"] == pytest.approx(h["wall_seconds"] - h.get("evaluation_seconds", 0) - slowest, abs=1e-2)
    assert history[0]["lr"] == pytest.approx(s.lr) and history[1]["lr"] == pytest.approx(s.lr * s.min_lr_ratio)
    # each node got each round's instructions (after the protobuf round trip)
    assert sorted(m.metadata.dst_node_id for m in grid.received) == [101, 101, 102, 102]
    assert {m.content["config"]["local_steps"] for m in grid.received} == {2}


class ServerKilled(Exception):
    pass


class CrashingGrid:
    """Wraps a grid: the server process 'dies' after the nodes trained in round ``crash_round``."""

    def __init__(self, grid, crash_round):
        self.grid, self.crash_round = grid, crash_round

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def push_messages(self, messages):
        messages = list(messages)
        ids = self.grid.push_messages(messages)  # the in-process nodes train as their messages arrive
        if messages and int(messages[0].content["config"]["server_round"]) == self.crash_round:
            raise ServerKilled(f"server killed in round {self.crash_round}")
        return ids


def test_a_stopped_and_extended_run_resumes_and_ends_where_an_uninterrupted_run_ends(
        tmp_path, tiny_sites, inprocess_grid):
    """A: 4 rounds straight. B: 2 rounds; extended to 4, the server dies after the nodes trained round 3;
    restarted, it resumes at round 3 and ends with A's arrays.

    Each run has its own run key, so the sites keep separate optimizer states for A and B. The learning
    rate schedule spans ``rounds`` (a run planned for 2 rounds ends its cosine at round 2), so both runs
    use a flat schedule here to make the extension comparable.
    """
    sites, model_yaml = tiny_sites(2)
    flat = dict(min_lr_ratio=1.0)
    a = run_federation(real_grid(inprocess_grid, sites), run_settings(model_yaml, tmp_path / "A", rounds=4, **flat))
    assert a["rounds_completed"] == 4

    folder = RunFolder(tmp_path / "B")
    run_federation(real_grid(inprocess_grid, sites), run_settings(model_yaml, folder.root, rounds=2, **flat))
    assert folder.latest().round == 2
    b_settings = run_settings(model_yaml, folder.root, rounds=4, **flat)
    with pytest.raises(ServerKilled):
        run_federation(CrashingGrid(real_grid(inprocess_grid, sites), crash_round=3), b_settings)
    assert folder.latest().round == 2 and len(folder.history()) == 2

    grid = real_grid(inprocess_grid, sites)
    b = run_federation(grid, b_settings)
    assert b["rounds_completed"] == 4
    assert sorted(int(m.content["config"]["server_round"]) for m in grid.received) == [3, 3, 4, 4]
    history = folder.history()
    assert [h["round"] for h in history] == [1, 2, 3, 4] and not any(h["skipped"] for h in history)
    assert history[2]["train"]["optimizer-resumed"] == 1  # the sites found their round-2 optimizer state
    keys = {json.loads((p / "state.json").read_text())["run_key"] for p in folder.checkpoints.glob("round_*")}
    key_a = json.loads((tmp_path / "A" / "checkpoints" / "round_0004" / "state.json").read_text())["run_key"]
    assert len(keys) == 1 and keys != {key_a}
    final = load_arrays_file(folder.checkpoints / "round_0004" / "global.safetensors")
    assert max_abs_diff(a["final_arrays"], b["final_arrays"]) < 1e-5
    assert max_abs_diff(a["final_arrays"], final) < 1e-5


def echo(msg, context):
    """A node that sends the global arrays back unchanged (no training)."""
    arrays = msg.content["arrays"]
    return Message(RecordDict({"arrays": ArrayRecord(array_dict={k: Array(v.numpy()) for k, v in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


def test_a_crash_between_checkpoint_and_history_loses_no_history_line(tmp_path, inprocess_grid, model_yaml_writer,
                                                                      monkeypatch):
    """history.jsonl is the record of every round: a stop while round 2 is being recorded must not leave
    round 2 out of it once the run resumes (today the checkpoint is written first, then the history line)."""
    model_yaml = model_yaml_writer(tmp_path / "model.yaml")
    s = run_settings(model_yaml, tmp_path / "run", rounds=3)
    real_append = RunFolder.append_history

    def dying_append(self, record):
        if record["round"] == 2:
            raise ServerKilled("killed while writing the history")
        real_append(self, record)

    monkeypatch.setattr(RunFolder, "append_history", dying_append)
    with pytest.raises(ServerKilled):
        run_federation(inprocess_grid({101: echo, 102: echo}), s)
    monkeypatch.setattr(RunFolder, "append_history", real_append)
    assert RunFolder(s.run_dir).latest().round in (1, 2)
    summary = run_federation(inprocess_grid({101: echo, 102: echo}), s)
    assert summary["rounds_completed"] == 3
    assert [h["round"] for h in RunFolder(s.run_dir).history()] == [1, 2, 3]


def test_init_checkpoint_is_the_starting_point(tmp_path, inprocess_grid, model_yaml_writer, caplog):
    model_yaml = model_yaml_writer(tmp_path / "model.yaml")
    torch.manual_seed(123)
    released = model_to_arrays(build_model(load_model_config(str(model_yaml))))
    save_file(dict(released), str(tmp_path / "released.safetensors"))
    s = run_settings(model_yaml, tmp_path / "run", rounds=1, init_checkpoint=str(tmp_path / "released.safetensors"))
    fresh = initial_arrays(run_settings(model_yaml, tmp_path / "unused"))
    assert max_abs_diff(fresh, released) > 0

    grid = inprocess_grid({101: echo, 102: echo})
    run_federation(grid, s)
    round0 = load_arrays_file(RunFolder(s.run_dir).checkpoints / "round_0000" / "global.safetensors")
    assert {k: v.shape for k, v in round0.items()} == {k: v.shape for k, v in released.items()}
    assert max_abs_diff(round0, released) == 0
    sent = message_arrays(grid.received[0])
    assert max_abs_diff(sent, released) == 0

    # a released encoder without some arrays: those start fresh, and the log says so
    partial = {k: v for k, v in released.items() if not k.startswith("report_decoder.")}
    save_file(partial, str(tmp_path / "encoder.safetensors"))
    with caplog.at_level(logging.WARNING, logger="server.federation"):
        arrays = initial_arrays(run_settings(model_yaml, tmp_path / "x",
                                             init_checkpoint=str(tmp_path / "encoder.safetensors")))
    assert "init_checkpoint lacks" in caplog.text and "report_decoder." in caplog.text
    assert all(np.array_equal(arrays[k], released[k]) for k in partial)
    assert all(np.array_equal(arrays[k], fresh[k]) for k in released if k.startswith("report_decoder."))

    # arrays of another shape are refused, naming the file and the preset
    bad = {**released, "vision.patch_embed.weight": np.zeros((1, 2), np.float32)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="bad.safetensors: 1 arrays have other shapes than preset"):
        initial_arrays(run_settings(model_yaml, tmp_path / "y", init_checkpoint=str(tmp_path / "bad.safetensors")))


def test_an_init_checkpoint_exported_from_a_torch_state_dict_is_accepted(tmp_path, model_yaml_writer):
    """``safetensors.torch.save_file(model.state_dict())`` keeps ``logit_scale`` 0-d; model arrays have it as (1,)."""
    model_yaml = model_yaml_writer(tmp_path / "model.yaml")
    torch.manual_seed(7)
    state = build_model(load_model_config(str(model_yaml))).state_dict()
    torch_save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(tmp_path / "torch.safetensors"))
    s = run_settings(model_yaml, tmp_path / "run", init_checkpoint=str(tmp_path / "torch.safetensors"))
    assert max_abs_diff(initial_arrays(s), model_to_arrays(state)) == 0


def shrunken_preset(model_yaml_writer, path, preset):
    """A seed preset at test size: its own vision kind, blocks, attention, objectives, loss and vocabulary."""
    if preset == "tiny":
        return model_yaml_writer(path)
    cfg = load_preset(preset)
    size = [2 * p for p in cfg.vision.patch_size] if cfg.vision.kind == "vit" else [32, 32, 32]
    return model_yaml_writer(
        path, preset=preset,
        vision={"depth": min(cfg.vision.depth, 3), "width": 48, "heads": 3, "resnet_layers": [1, 1, 1, 1]},
        preprocess={"size": size}, multiview={"num_views": 2, "view_size": size},
    )


@pytest.mark.parametrize("recipe", ["colipri", "t3d", "hlip", "supervised_clip", "tiny"])
def test_each_recipe_runs_a_federated_round(recipe, tmp_path, tiny_sites, inprocess_grid, model_yaml_writer):
    from server.settings import load_recipe

    plan = load_recipe(recipe)
    model_yaml = shrunken_preset(model_yaml_writer, tmp_path / f"{recipe}.yaml", plan["preset"])
    model_cfg = load_model_config(str(model_yaml))
    seed_cfg = load_preset(plan["preset"])
    assert (model_cfg.vision.kind, model_cfg.vision.resnet_block, model_cfg.vision.study_attention_every,
            model_cfg.objectives, model_cfg.clip_loss, model_cfg.vocabulary) == \
        (seed_cfg.vision.kind, seed_cfg.vision.resnet_block, seed_cfg.vision.study_attention_every,
         seed_cfg.objectives, seed_cfg.clip_loss, seed_cfg.vocabulary)
    sites, _ = tiny_sites(2, model_yaml=model_yaml)  # ingested with this model's preprocessing
    s = settings_from_run_config({"recipe": recipe, "preset": str(model_yaml), "num-rounds": 1, "local-steps": 1,
                                  "run-dir": str(tmp_path / "run"), "min-available": 2})
    assert (s.strategy, s.objectives) == (plan["strategy"], {k: float(v) for k, v in plan["objectives"].items()})

    grid = real_grid(inprocess_grid, sites)
    summary = run_federation(grid, s)
    history = RunFolder(s.run_dir).history()
    assert summary["rounds_completed"] == 1 and len(history) == 1
    assert not history[0]["skipped"], history[0]["participation"]
    assert history[0]["participation"]["valid"] == 2
    used = {k[len("loss."):] for k in history[0]["train"] if k.startswith("loss.")}
    active = {k for k, w in s.objectives.items() if w > 0}
    if s.mae_alternate:  # one local step: the vision-language batch (MAE has the next one)
        assert used == ({k for k in active if k != "mae"} or {"mae"})
    else:  # MAE runs on every batch beside the rest
        assert used == active
    checkpoint = RunFolder(s.run_dir).checkpoints / "round_0001"
    if s.strategy == "fedadam":
        state = load_arrays_file(checkpoint / "strategy.safetensors")
        assert {k.split("/", 1)[0] for k in state} == {"m_t", "v_t"}
        assert any(np.abs(v).sum() > 0 for k, v in state.items() if k.startswith("m_t/"))
    else:
        assert not (checkpoint / "strategy.safetensors").exists()
    mu = {m.content["config"]["proximal_mu"] for m in grid.received}
    assert mu == ({plan["proximal_mu"]} if s.strategy == "fedprox" else {0.0})
    if s.strategy == "fedprox":
        assert plan["proximal_mu"] > 0


def test_a_locked_text_tower_stays_at_the_sites_and_only_the_rest_travels(tmp_path, tiny_sites, inprocess_grid,
                                                                          model_yaml_writer):
    """With the text tower locked (the tiny preset's MiniLM, trainable_layers 0) its arrays never travel:
    each site builds them from its own copy and checks them against the round's digest."""
    from shared_models import arrays_digest, frozen_keys

    model_yaml = model_yaml_writer(tmp_path / "locked.yaml", text={"trainable_layers": 0})  # the shipped MiniLM
    sites, _ = tiny_sites(2, model_yaml=model_yaml)
    grid = real_grid(inprocess_grid, sites)
    s = run_settings(model_yaml, tmp_path / "run", rounds=1, local_steps=1)
    summary = run_federation(grid, s)
    initial = load_arrays_file(RunFolder(s.run_dir).checkpoints / "round_0000" / "global.safetensors")
    frozen = set(frozen_keys(build_model(load_model_config(str(model_yaml)))))
    assert frozen and all(k.startswith("text.") for k in frozen)
    for m in grid.received:
        assert set(m.content.array_records["arrays"]) == {"packed.float32"}  # one buffer on the wire
        sent = set(message_arrays(m))
        assert sent == set(initial) - frozen
        assert m.content["config"]["frozen_digest"] == arrays_digest(initial, sorted(frozen))
    history = RunFolder(s.run_dir).history()
    assert not history[0]["skipped"] and history[0]["participation"]["valid"] == 2
    assert history[0]["bytes_sent_per_site"] == sum(initial[k].nbytes for k in set(initial) - frozen)
    assert history[0]["bytes_sent_per_site"] < 0.5 * sum(a.nbytes for a in initial.values())
    final = summary["final_arrays"]
    assert set(final) == set(initial)  # the checkpoint is the whole model
    assert all(np.array_equal(final[k], initial[k]) for k in frozen)
    assert max_abs_diff({k: final[k] for k in set(final) - frozen}, {k: initial[k] for k in set(final) - frozen}) > 0
