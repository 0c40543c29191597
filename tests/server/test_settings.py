"""Run settings: recipes, Flower run-config overrides, the learning-rate schedule, errors that name the value."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path

import pytest

from server.settings import RunSettings, available_recipes, load_recipe, settings_from_run_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["colipri", "hlip", "supervised_clip", "t3d", "tiny"]


def test_every_recipe_loads_into_settings_with_its_own_values():
    assert available_recipes() == RECIPES
    for name in RECIPES:
        plan = load_recipe(name)
        s = settings_from_run_config({"recipe": name})
        assert s.recipe == name
        for key, value in plan.items():
            expected = {k: float(v) for k, v in value.items()} if key == "objectives" else value
            assert getattr(s, key) == expected, (name, key)
    assert settings_from_run_config({"recipe": "hlip"}).strategy == "fedadam"
    assert settings_from_run_config({"recipe": "t3d"}).proximal_mu > 0


def test_the_projects_default_run_config_is_the_tiny_recipe():
    """``[tool.flwr.app.config]`` as Flower hands it over: every "" and 0 keeps the recipe's value."""
    run_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    s = settings_from_run_config(run_config)
    tiny = settings_from_run_config({"recipe": "tiny"})
    assert dataclasses.replace(s, run_dir=tiny.run_dir) == tiny
    assert s.run_dir == run_config["run-dir"]


def test_run_config_overrides_with_kebab_keys_and_aliases():
    s = settings_from_run_config({
        "recipe": "colipri", "num-rounds": 7, "local-steps": 3, "run-dir": "/abs/runs/x", "max-update-norm": 50.0,
        "min-replies": 3, "min-available": 4, "round-timeout-s": 60.0, "seed": 5, "strategy": "fedprox",
        "proximal-mu": 0.1, "eval-cohort": "/abs/cohort", "weight-clip": 2.0, "weight-report": 0,
        "lr": "", "warmup-rounds": "",
    })
    assert (s.rounds, s.local_steps, s.run_dir, s.max_update_norm) == (7, 3, "/abs/runs/x", 50.0)
    assert (s.min_replies, s.min_available, s.round_timeout_s, s.seed) == (3, 4, 60.0, 5)
    assert (s.strategy, s.proximal_mu, s.eval_cohort) == ("fedprox", 0.1, "/abs/cohort")
    assert s.objectives == {"clip": 2.0, "osl": 1.0, "mae": 1.0, "report": 0.0}
    assert (s.lr, s.warmup_rounds, s.preset) == (1.0e-4, 5, "colipri")  # "" keeps the recipe's value


def test_empty_and_zero_values_keep_the_recipe():
    tiny = load_recipe("tiny")
    s = settings_from_run_config({"recipe": "", "num-rounds": 0, "local-steps": 0, "strategy": "", "lr": "",
                                  "weight-clip": "", "init-checkpoint": ""})
    assert (s.recipe, s.rounds, s.local_steps, s.strategy, s.lr) == ("tiny", tiny["rounds"], tiny["local_steps"],
                                                                     "fedavg", tiny["lr"])
    assert s.objectives["clip"] == 1.0 and s.init_checkpoint == ""


def test_weight_decay_is_a_run_setting_not_an_objective_weight():
    """``weight-decay`` must set RunSettings.weight_decay; the ``weight-`` prefix is for objective weights."""
    s = settings_from_run_config({"recipe": "tiny", "weight-decay": 0.1, "weight-mae": 0.5})
    assert s.weight_decay == 0.1
    assert s.objectives["mae"] == 0.5 and "decay" not in s.objectives


def test_unknown_run_config_keys_are_errors_that_name_the_key():
    with pytest.raises(ValueError, match="run config key 'num-round' is not a run setting; known: .*local-steps"):
        settings_from_run_config({"recipe": "tiny", "num-round": 3})
    with pytest.raises(ValueError, match=r"unknown objective\(s\) \['clipp'\]"):
        settings_from_run_config({"recipe": "tiny", "weight-clipp": 1.0})
    with pytest.raises(ValueError, match="unknown recipe 'nope'; available: colipri, hlip, supervised_clip, t3d, tiny"):
        settings_from_run_config({"recipe": "nope"})


def test_a_recipe_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: tiny\nrounds: 9\nstrategy: fedadam\nserver_lr: 0.5\n")
    s = settings_from_run_config({"recipe": str(path), "local-steps": 2})
    assert (s.recipe, s.rounds, s.strategy, s.server_lr, s.local_steps) == (str(path), 9, "fedadam", 0.5, 2)
    path.write_text("- not\n- a mapping\n")
    with pytest.raises(ValueError, match="a recipe is a mapping of settings"):
        load_recipe(str(path))
    path.write_text("preset: tiny\nround: 9\n")
    with pytest.raises(ValueError, match="unknown key\\(s\\) round"):
        settings_from_run_config({"recipe": str(path)})


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_down_to_the_minimum():
    s = RunSettings(rounds=10, warmup_rounds=2, lr=1e-3, min_lr_ratio=0.1)
    assert s.lr_at(1) == pytest.approx(1e-3 / 3) and s.lr_at(2) == pytest.approx(2e-3 / 3)
    assert s.lr_at(3) == pytest.approx(1e-3)  # the peak, the round after the warm-up
    assert s.lr_at(10) == pytest.approx(1e-4)  # the minimum at the last round
    for r in range(3, 11):  # cosine over rounds 3..10 (7 steps)
        assert s.lr_at(r) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (r - 3) / 7)))
    lrs = [s.lr_at(r) for r in range(1, 11)]
    assert lrs[:3] == sorted(lrs[:3]) and lrs[2:] == sorted(lrs[2:], reverse=True)
    assert RunSettings(rounds=1, lr=1e-3).lr_at(1) == pytest.approx(1e-3)
    flat = RunSettings(rounds=5, lr=1e-3, min_lr_ratio=1.0)
    assert {round(flat.lr_at(r), 12) for r in range(1, 6)} == {1e-3}


@pytest.mark.parametrize("changes, message", [
    ({"strategy": "fedsgd"}, re.escape("strategy should be one of ('fedavg', 'fedprox', 'fedadam'), got 'fedsgd'")),
    ({"rounds": 0}, "rounds should be >= 1, got 0"),
    ({"local_steps": -2}, "local_steps should be >= 1, got -2"),
    ({"min_replies": 0}, "min_replies should be >= 1, got 0"),
    ({"lr": float("nan")}, "lr should be a positive number, got nan"),
    ({"lr": -1.0}, "lr should be a positive number, got -1.0"),
    ({"fraction_train": 1.5}, r"fraction_train should be in \(0, 1\], got 1.5"),
    ({"objectives": {"clip": -1.0}}, "objective weight clip=-1.0 should be finite and >= 0"),
    ({"preset": "huge"}, "unknown preset 'huge'"),
])
def test_bad_values_raise_errors_that_name_the_value(changes, message):
    with pytest.raises(ValueError, match=message):
        RunSettings(**changes)


def test_bad_run_config_values_name_the_setting():
    with pytest.raises(ValueError, match="got 'fedsgd'"):
        settings_from_run_config({"recipe": "tiny", "strategy": "fedsgd"})
    with pytest.raises(TypeError, match="rounds should be int, got 'three'"):
        settings_from_run_config({"recipe": "tiny", "num-rounds": "three"})
    with pytest.raises(ValueError, match="min_replies should be >= 1, got 0"):
        settings_from_run_config({"recipe": "tiny", "min-replies": 0})


def test_settings_round_trip_through_their_dict():
    s = settings_from_run_config({"recipe": "hlip", "num-rounds": 2})
    assert RunSettings(**s.to_dict()) == s
