"""The federated run: rounds of train-and-aggregate with checks, checkpoints, resume and evaluation.

Our own loop instead of ``Strategy.start`` because a hospital federation needs what ``start`` lacks:
per-round config (learning-rate schedule), a minimum of valid replies, a checkpoint after every
round, resume from the latest complete checkpoint, and the participation record of each round.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from shared_models import arrays_digest, build_model, frozen_keys, load_model_config, model_to_arrays
from shared_models import wire

from .checkpoint import RunFolder, load_arrays_file, restore_random_state
from .metrics import ServerMetrics
from .privacy import PrivacyBudgetExhausted, privacy_state, write_privacy_report
from .settings import RunSettings
from .strategy import StreamingMean, build_strategy

log = logging.getLogger(__name__)
Evaluator = Callable[[int, dict[str, np.ndarray]], dict[str, Any]]


def initial_arrays(settings: RunSettings) -> dict[str, np.ndarray]:
    """A fresh model (seeded) or the ``init_checkpoint`` file, checked against the preset's layout."""
    torch.manual_seed(settings.seed)
    fresh = model_to_arrays(build_model(load_model_config(settings.preset)))
    if not settings.init_checkpoint:
        return dict(fresh)
    # scalars are shape (1,) on the wire and in our checkpoints; a torch state dict export has shape ()
    loaded = {k: v.reshape(-1) if v.ndim == 0 else v for k, v in load_arrays_file(settings.init_checkpoint).items()}
    missing = sorted(set(fresh) - set(loaded))
    shapes = [k for k in set(fresh) & set(loaded) if fresh[k].shape != loaded[k].shape]
    if shapes:
        raise ValueError(f"init_checkpoint {settings.init_checkpoint}: {len(shapes)} arrays have other shapes "
                         f"than preset {settings.preset!r} (e.g. {shapes[0]}).")
    if missing:  # e.g. a released encoder without heads: the heads start fresh
        log.warning("init_checkpoint lacks %d arrays (e.g. %s); they start from a fresh initialisation",
                    len(missing), missing[0])
    return {k: loaded.get(k, v) for k, v in fresh.items()}


def frozen_part(settings: RunSettings, arrays: dict[str, np.ndarray]) -> list[str]:
    """The preset's arrays that cannot train (a locked text tower) and that every site builds alike from
    its local model folder: they stay at the sites, which check them against the federation's digest;
    only the rest travels. A randomly initialised text tower, or frozen arrays an init checkpoint
    changed, cannot be rebuilt at a site, so they travel with the rest."""
    cfg = load_model_config(settings.preset)
    if cfg.text.random_init is not None:
        return []
    model = build_model(cfg)
    fresh = model_to_arrays(model)
    return [k for k in frozen_keys(model) if np.array_equal(fresh[k], arrays[k])]


def round_config(settings: RunSettings, server_round: int, run_key: str, frozen_digest: str = "") -> ConfigRecord:
    flat = {
        "frozen_digest": frozen_digest,
        "server_round": server_round, "preset": settings.preset, "local_steps": settings.local_steps,
        "lr": settings.lr_at(server_round), "run_key": run_key, "seed": settings.seed,
        "mae_alternate": settings.mae_alternate, "weight_decay": settings.weight_decay,
        "max_grad_norm": settings.max_grad_norm,
        "proximal_mu": settings.proximal_mu if settings.strategy == "fedprox" else 0.0,
        # DP-FedAvg averages unweighted: sites then report one example each
        "uniform_weights": settings.dp != "none",
    }
    flat.update({f"weight.{name}": float(w) for name, w in settings.objectives.items()})
    return ConfigRecord(flat)


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def reply_bytes(reply: Message) -> int:
    """Bytes of the arrays a reply carries (as serialized on the wire)."""
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return 0
    return sum(len(a.data) for a in reply.content.array_records["arrays"].values())


class _Fold:
    """Checks a reply and adds it to the round's streaming mean; counts bytes and the time it takes."""

    def __init__(self, strategy, server_round: int) -> None:
        self.strategy, self.server_round = strategy, server_round
        self.mean, self.bytes, self.seconds = StreamingMean(), 0, 0.0

    def __call__(self, reply: Message) -> None:
        started = time.time()
        self.bytes += reply_bytes(reply)
        if self.strategy.accept(self.server_round, reply):
            self.mean.add(reply.content)
        self.seconds += time.time() - started


def receive_replies(grid: Grid, messages: list[Message], timeout: float, on_reply: Callable[[Message], None],
                    poll_s: float = 1.0) -> None:
    """Push the round's instructions and hand each reply to ``on_reply`` as soon as it is there.

    Like ``Grid.send_and_receive`` (replies that miss the timeout are left out), but replies are pulled
    one message id at a time, so the ServerApp never holds more than one site's arrays at once.
    """
    pending = set(grid.push_messages(messages))
    deadline = time.time() + timeout
    while pending:
        for message_id in sorted(pending):
            for reply in grid.pull_messages([message_id]):
                pending.discard(reply.metadata.reply_to_message_id)
                on_reply(reply)
            reply = None  # not kept alive while the next site's reply is pulled
        if not pending or time.time() >= deadline:
            break
        time.sleep(min(poll_s, max(0.0, deadline - time.time())))
    if pending:
        log.warning("%d site(s) did not reply within the round's %.0f s timeout", len(pending), timeout)


def _warn_on_schedule_change(saved: dict[str, Any], settings: RunSettings) -> None:
    changed = {k: (saved.get(k), getattr(settings, k)) for k in ("rounds", "lr", "warmup_rounds", "min_lr_ratio",
                                                                  "local_steps", "objectives", "strategy")
               if k in saved and saved[k] != getattr(settings, k)}
    if changed:
        log.warning("resuming with other settings than the checkpoint's (saved -> now): %s; the learning-rate "
                    "schedule of the remaining rounds follows the new settings", changed)


def run_federation(grid: Grid, settings: RunSettings, evaluate: Evaluator | None = None,
                   metrics: ServerMetrics | None = None) -> dict[str, Any]:
    """Run (or resume) the federation described by ``settings``; returns a summary.

    ``metrics`` (default: a fresh :class:`ServerMetrics`, served on ``settings.metrics_port`` when set)
    follows every round.
    """
    metrics = metrics or ServerMetrics()
    if settings.metrics_port:
        metrics.start(settings.metrics_port, settings.metrics_address)
    try:
        return _run_rounds(grid, settings, evaluate, metrics)
    finally:
        metrics.stop()


def _run_rounds(grid: Grid, settings: RunSettings, evaluate: Evaluator | None, metrics: ServerMetrics) -> dict[str, Any]:
    folder = RunFolder(settings.run_dir, keep=settings.keep_checkpoints)
    strategy = build_strategy(settings)
    latest = folder.latest()
    if latest is not None:
        if latest.state.get("settings", {}).get("preset") != settings.preset:
            raise ValueError(f"{folder.root} holds a run of preset {latest.state['settings'].get('preset')!r}; "
                             f"use another run folder for preset {settings.preset!r}.")
        _warn_on_schedule_change(latest.state.get("settings", {}), settings)
        arrays, start = latest.arrays, latest.round + 1
        strategy.load_state_arrays(latest.strategy_state)
        strategy.load_accountant_state(latest.state.get("accountant"))
        restore_random_state(latest.state["python_random"])
        run_key = latest.state["run_key"]
        folder.truncate_history(latest.round)
        log.info("resuming %s from its round-%d checkpoint", folder.root, latest.round)
    else:
        random.seed(settings.seed)
        arrays, start = initial_arrays(settings), 1
        run_key = hashlib.sha256(f"{Path(settings.run_dir).resolve()}|{time.time()}".encode()).hexdigest()[:16]
        folder.save(0, arrays, {}, {"settings": settings.to_dict(), "run_key": run_key,
                                    "accountant": strategy.accountant_state()})
    frozen = set(frozen_part(settings, arrays))
    digest = arrays_digest(arrays, frozen)  # the frozen part never changes: only the rest is aggregated
    summary = {"rounds_completed": start - 1, "rounds_skipped": 0, "run_dir": str(folder.root), "stopped": None}
    metrics.run_started(settings)
    metrics.round.set(start - 1)
    for server_round in range(start, settings.rounds + 1):
        started = time.time()
        metrics.round_started(server_round)
        config = round_config(settings, server_round, run_key, digest)
        sent = {k: v for k, v in arrays.items() if k not in frozen}
        layout = wire.layout_of(sent)  # the arrays travel packed, one buffer per dtype (shared_models.wire)
        config[wire.LAYOUT_KEY] = layout
        try:
            messages = strategy.configure_train(server_round, to_record(wire.pack(sent)), config, grid)
        except PrivacyBudgetExhausted as err:  # the checkpoint of the last round is the final one
            summary["stopped"] = f"privacy budget exhausted before round {server_round}: {err}"
            log.warning("run stopped: %s; the final checkpoint is round %d's", summary["stopped"], server_round - 1)
            break
        if strategy.streams:  # each reply is checked and folded into the mean as it arrives, then dropped
            fold = _Fold(strategy, server_round)
            receive_replies(grid, messages, settings.round_timeout_s, fold)
            aggregation_started = time.time() - fold.seconds
            aggregated, train_metrics = strategy.aggregate_streamed(server_round, fold.mean, messages[0]) \
                if messages else (None, None)
            bytes_in = fold.bytes
            del fold
        else:  # Flower's DP wrappers clip and noise the list of replies
            replies: list[Message] = []
            receive_replies(grid, messages, settings.round_timeout_s, replies.append)
            bytes_in = sum(reply_bytes(r) for r in replies)
            aggregation_started = time.time()
            aggregated, train_metrics = strategy.aggregate_train(server_round, replies)
            del replies
        skipped = aggregated is None
        if not skipped:  # keep each array's dtype (FedAdam's update would make float64)
            aggregated = wire.unpack({k: v.numpy() for k, v in aggregated.items()}, layout)
            arrays = {**arrays, **{k: v.astype(arrays[k].dtype, copy=False) for k, v in aggregated.items()}}
        record: dict[str, Any] = {
            "round": server_round, "lr": config["lr"], "skipped": skipped,
            "participation": strategy.participation, "train": dict(train_metrics) if train_metrics else {},
            "bytes_received": bytes_in, "bytes_sent_per_site": sum(a.nbytes for a in sent.values()),
            "aggregation_seconds": round(time.time() - aggregation_started, 3),
        }
        if (spent := privacy_state(strategy)) is not None:
            record["privacy"] = spent
        evaluation_started = time.time()
        if evaluate and (server_round % settings.evaluate_every == 0 or server_round == settings.rounds):
            record["evaluation"] = evaluate(server_round, arrays)
            record["evaluation_seconds"] = round(time.time() - evaluation_started, 3)
        record["wall_seconds"] = round(time.time() - started, 3)
        site_seconds = [x["train-seconds"] for x in strategy.participation["sites"] if x.get("train-seconds")]
        if site_seconds:  # what federation costs on top of the slowest site's local training
            record["overhead_seconds"] = round(
                record["wall_seconds"] - record.get("evaluation_seconds", 0.0) - max(site_seconds), 3)
        # history first: a stop in between re-runs this round, and resume drops lines past the checkpoint
        folder.append_history(record)
        metrics.observe_round(record)
        folder.save(server_round, arrays, strategy.state_arrays(),
                    {"settings": settings.to_dict(), "run_key": run_key, "accountant": strategy.accountant_state()})
        write_privacy_report(folder.root, settings, folder.history())
        summary["rounds_completed"] = server_round
        summary["rounds_skipped"] += int(skipped)
        log.info("round %d/%d %s in %.1f s: %d/%d valid replies, train loss %s", server_round, settings.rounds,
                 "SKIPPED" if skipped else "done", record["wall_seconds"], strategy.participation["valid"],
                 strategy.participation["sampled"], record["train"].get("train-loss"))
        if "privacy" in record:
            log.info("round %d: client-level DP epsilon spent %.4g at delta %g", server_round,
                     record["privacy"]["epsilon"], record["privacy"]["delta"])
    write_privacy_report(folder.root, settings, folder.history(), stopped=summary["stopped"])
    summary["final_arrays"] = arrays
    return summary
