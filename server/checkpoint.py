"""Checkpoints of a federated run, one folder per completed round, and the run's history.

Layout under the run folder::

    checkpoints/round_0003/global.safetensors     the global model's arrays (bare model keys, sorted)
    checkpoints/round_0003/strategy.safetensors   strategy state (FedAdam's moments), if any
    checkpoints/round_0003/state.json             round, settings, run key, RNG state, accountant state
    history.jsonl                                 one line per round (participation, losses, evaluation)

A round folder is written under a temporary name and renamed when complete, so the latest folder
with a ``state.json`` is always a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    state: dict[str, Any]
    path: Path


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))


def load_arrays_file(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays of a safetensors file (a checkpoint's ``global.safetensors`` or a released encoder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return dict(sorted(load_file(str(path)).items()))


class RunFolder:
    """The checkpoints and history of one run."""

    def __init__(self, run_dir: str | Path, keep: int = 3) -> None:
        self.root = Path(run_dir)
        self.checkpoints = self.root / "checkpoints"
        self.history_path = self.root / "history.jsonl"
        self.keep = keep

    def latest(self) -> Checkpoint | None:
        if not self.checkpoints.is_dir():
            return None
        complete = sorted(p for p in self.checkpoints.glob("round_*") if (p / "state.json").is_file())
        if not complete:
            return None
        path = complete[-1]
        state = json.loads((path / "state.json").read_text())
        strategy_file = path / "strategy.safetensors"
        return Checkpoint(
            round=state["round"], arrays=load_arrays_file(path / "global.safetensors"),
            strategy_state=load_arrays_file(strategy_file) if strategy_file.is_file() else {}, state=state, path=path,
        )

    def save(self, server_round: int, arrays: dict[str, np.ndarray], strategy_state: dict[str, np.ndarray],
             state: dict[str, Any]) -> Path:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"round_{server_round:04d}"
        tmp = self.checkpoints / f".round_{server_round:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_arrays(tmp / "global.safetensors", arrays)
        if strategy_state:
            save_arrays(tmp / "strategy.safetensors", strategy_state)
        state = {**state, "round": server_round, "python_random": _encode_random_state()}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(p for p in self.checkpoints.glob("round_*") if p != final)[: -self.keep + 1 or None]:
            if old.name != "round_0000":
                shutil.rmtree(old, ignore_errors=True)
        return final

    def history(self) -> list[dict[str, Any]]:
        if not self.history_path.is_file():
            return []
        return [json.loads(line) for line in self.history_path.read_text().splitlines() if line.strip()]

    def append_history(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.history_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_history(self, last_round: int) -> None:
        """Drop history lines of rounds after ``last_round`` (a crashed round that is being re-run)."""
        kept = [r for r in self.history() if r.get("round", 0) <= last_round]
        self.root.mkdir(parents=True, exist_ok=True)
        self.history_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def _encode_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def restore_random_state(encoded: list) -> None:
    version, internal, gauss = encoded
    random.setstate((version, tuple(internal), gauss))
