"""Run settings: a run recipe (``server/recipes/NAME.yaml``) overridden by Flower's run config.

``flwr run . CONN --run-config "recipe='tiny' num-rounds=4 run-dir='/abs/runs/x'"``: keys are the
fields below in kebab case (``num-rounds`` is ``rounds``; ``weight-NAME`` sets an objective's weight);
an empty string (and 0 for ``num-rounds``/``local-steps``) keeps the recipe's value. Unknown keys are
errors that name the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from shared_models.config import build_dataclass, load_model_config
from shared_models.objectives import check_weights

STRATEGIES = ("fedavg", "fedprox", "fedadam")
DP_MODES = ("none", "server", "client")
ALIASES = {"num-rounds": "rounds"}


@dataclass
class RunSettings:
    """Everything the server needs for one federated run.

    Args:
        recipe: the recipe these settings started from. preset: the model preset all sites build.
        rounds / local_steps: the run's length; lr: the peak local learning rate, on a cosine schedule
            over the whole run (``warmup_rounds`` linear warm-up, down to ``min_lr_ratio * lr``).
        objectives: objective weights sent to the sites; mae_alternate: COLIPRI's vision-only MAE batches.
        strategy: fedavg | fedprox (``proximal_mu``) | fedadam (``server_lr``).
        min_replies: valid replies a round needs to update the global model (else it is skipped).
        min_available: sites to wait for before a round starts; fraction_train: share sampled per round.
        round_timeout_s: how long a round waits for replies; late sites are left out of that round.
        max_update_norm: a reply whose L2 distance from the global model is larger is rejected.
        evaluate_every: central evaluation every k rounds (and after the last one) on ``eval_cohort``.
        init_checkpoint: start from these weights (a safetensors file) instead of a fresh model.
        dp: client-level DP-FedAvg: ``none``, ``server`` (server-side fixed clipping) or ``client`` (sites
            clip); ``dp_noise_multiplier``, ``dp_clipping_norm`` (L2 bound of a site's update),
            ``dp_sites_per_round`` (sites sampled each round, all must reply), ``dp_target_delta``, and
            ``dp_max_epsilon`` (0: no limit; else the run stops before a round that would pass it).
        run_dir: checkpoints, history and reports; a restart with the same folder resumes.
        metrics_port: > 0: the ServerApp serves Prometheus metrics on this port while the run goes on
            (``metrics_address``: the interface, all by default).
        keep_checkpoints: how many round checkpoints to keep (the latest ones).
    """

    recipe: str = "tiny"
    preset: str = "tiny"
    rounds: int = 3
    local_steps: int = 8
    lr: float = 3e-4
    warmup_rounds: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    objectives: dict[str, float] = field(default_factory=lambda: {"clip": 1.0})
    mae_alternate: bool = True
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    server_lr: float = 0.01
    min_replies: int = 2
    min_available: int = 2
    fraction_train: float = 1.0
    round_timeout_s: float = 600.0
    max_update_norm: float = 1000.0
    evaluate_every: int = 1
    eval_cohort: str = ""
    eval_batches: int = 4
    init_checkpoint: str = ""
    dp: str = "none"
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_sites_per_round: int = 2
    dp_target_delta: float = 1e-5
    dp_max_epsilon: float = 0.0
    run_dir: str = "runs/default"
    keep_checkpoints: int = 3
    seed: int = 0
    metrics_port: int = 0
    metrics_address: str = "0.0.0.0"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy should be one of {STRATEGIES}, got {self.strategy!r}.")
        for name in ("rounds", "local_steps", "min_replies", "evaluate_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} should be >= 1, got {getattr(self, name)}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr should be a positive number, got {self.lr}.")
        if not self.max_update_norm > 0:
            raise ValueError(f"max_update_norm should be > 0, got {self.max_update_norm}.")
        if not self.round_timeout_s > 0:
            raise ValueError(f"round_timeout_s should be > 0, got {self.round_timeout_s}.")
        if self.dp not in DP_MODES:
            raise ValueError(f"dp should be one of {DP_MODES}, got {self.dp!r}.")
        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"fraction_train should be in (0, 1], got {self.fraction_train}.")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port should be a TCP port (1-65535), or 0 for no exporter; got {self.metrics_port}.")
        self.objectives = check_weights(self.objectives)
        load_model_config(self.preset)  # an unknown preset fails here, naming it

    def lr_at(self, server_round: int) -> float:
        """Learning rate of a round: linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
        if server_round <= self.warmup_rounds:
            return self.lr * server_round / (self.warmup_rounds + 1)
        span = max(1, self.rounds - self.warmup_rounds - 1)
        progress = min(1.0, (server_round - self.warmup_rounds - 1) / span)
        low = self.lr * self.min_lr_ratio
        return low + (self.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def available_recipes() -> list[str]:
    folder = resources.files("server") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    path = Path(name)
    if not path.suffix:
        if name not in available_recipes():
            raise ValueError(f"unknown recipe {name!r}; available: {', '.join(available_recipes())}.")
        path = Path(str(resources.files("server") / "recipes" / f"{name}.yaml"))
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of settings.")
    return data


def settings_from_run_config(run_config: dict[str, Any]) -> RunSettings:
    """Recipe values overridden by non-empty run-config values (kebab-case keys)."""
    run_config = dict(run_config)
    recipe = str(run_config.pop("recipe", "") or "tiny")
    data = load_recipe(recipe)
    data["recipe"] = recipe
    names = {f.name for f in dataclasses.fields(RunSettings)}
    for key, value in run_config.items():
        name = ALIASES.get(key, key.replace("-", "_"))
        if name.startswith("weight_") and name not in names:
            if value != "":
                data.setdefault("objectives", {})
                data["objectives"] = {**data["objectives"], name[len("weight_"):]: float(value)}
            continue
        if name not in names:
            raise ValueError(f"run config key {key!r} is not a run setting; known: "
                             f"{', '.join(sorted(k.replace('_', '-') for k in names))}.")
        if value in ("", None) or (value == 0 and name in ("rounds", "local_steps")):
            continue
        data[name] = value
    return build_dataclass(RunSettings, data, f"recipe {recipe} with run config")
