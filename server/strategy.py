"""Flower strategies (FedAvg, FedProx, FedAdam) that check every reply before aggregating.

A reply is rejected, logged and left out of the round when it carries an error, lacks the arrays or
``num-examples``, has other keys or shapes than the global model, holds non-finite values, or moved
farther from the global model than ``max_update_norm``. A round with fewer than ``min_replies`` valid
replies keeps the global model (the round is logged as skipped).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from .privacy import check_dp_settings, dp_wrapper_class, make_accountant
from .settings import RunSettings

log = logging.getLogger(__name__)
SITE_DP_METRICS = ("dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-max-grad-norm")


def check_reply(content, reference: dict[str, np.ndarray], max_update_norm: float) -> str | None:
    """Why a training reply cannot be aggregated, or None when it can."""
    if "arrays" not in content.array_records:
        return "no 'arrays' in the reply"
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return (f"expected one array record and one metric record, got {sorted(content.array_records)} and "
                f"{sorted(content.metric_records)}")
    metrics = content.metric_records.get("metrics")
    if metrics is None or "num-examples" not in metrics:
        return "no 'num-examples' metric in the reply"
    if not (isinstance(metrics["num-examples"], (int, float)) and metrics["num-examples"] > 0):
        return f"num-examples should be > 0, got {metrics['num-examples']!r}"
    arrays = content.array_records["arrays"]
    missing, unexpected = set(reference) - set(arrays), set(arrays) - set(reference)
    if missing or unexpected:
        return f"keys differ from the global model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
    total = 0.0
    for key, ref in reference.items():
        value = arrays[key].numpy()
        if value.shape != ref.shape:
            return f"array {key!r} has shape {value.shape}, the global model's is {ref.shape}"
        if np.issubdtype(value.dtype, np.floating):
            if not np.isfinite(value).all():
                return f"array {key!r} holds non-finite values"
            total += float(np.sum((value.astype(np.float64) - ref) ** 2))  # one array in float64 at a time
    norm = total ** 0.5
    if norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds the bound {max_update_norm:.4g}"
    return None


class LenientMetrics:
    """Mixin: sites may report different metric names (``aggregate_metrics`` handles that), which
    Flower's consistency check refuses; ``check_reply`` checks the rest of what it would."""

    def _check_and_log_replies(self, replies, is_train: bool, validate: bool = True):
        return super()._check_and_log_replies(replies, is_train, validate=False)


class StreamingMean:
    """The ``num-examples``-weighted mean of the replies' arrays, accumulated as replies arrive.

    The server then holds one reply at a time plus this float64 sum, however many sites reply, instead
    of every reply until the round ends (what ``Strategy.aggregate_train`` over a list of replies needs).
    """

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.total = 0.0
        self.metrics: list[RecordDict] = []  # each reply's metric record only (a few scalars)

    def add(self, content: RecordDict) -> None:
        metrics = content.metric_records["metrics"]
        weight = float(metrics["num-examples"])
        for key, array in content.array_records["arrays"].items():
            value = array.numpy()
            if key in self.sums:
                self.sums[key] += value * weight  # in place, in float64
            else:
                self.sums[key] = value.astype(np.float64) * weight
        self.total += weight
        self.metrics.append(RecordDict({"metrics": MetricRecord(dict(metrics))}))

    def mean(self, dtypes: dict[str, np.dtype]) -> ArrayRecord:
        return ArrayRecord(array_dict={k: Array(np.ascontiguousarray((v / self.total).astype(dtypes[k])))
                                       for k, v in self.sums.items()})


class CheckedReplies:
    """Mixin for a Flower Message-API strategy: validate replies, require a minimum of valid ones.

    Two ways to aggregate: ``aggregate_train(round, replies)`` over a list (Flower's contract; the DP
    wrappers need it), or streaming: :meth:`accept` each reply as it arrives into a :class:`StreamingMean`,
    then :meth:`aggregate_streamed` (FedAvg, FedProx and FedAdam; see :mod:`server.federation`).
    """

    min_replies: int = 1
    max_update_norm: float = float("inf")
    streams: bool = True  # False for the DP wrappers, which clip and noise a list of replies

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.reference = {k: v.numpy() for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.participation: dict[str, Any] = {"sampled": len(messages), "replied": 0, "valid": 0, "rejected": [],
                                              "errors": [], "sites": []}
        return messages

    def accept(self, server_round: int, msg: Message) -> bool:
        """Check one reply and record the site's participation; True when it can be aggregated."""
        node = msg.metadata.src_node_id
        self.participation["replied"] += 1
        if msg.has_error():
            self.participation["errors"].append({"node": node, "reason": str(msg.error.reason)[:300]})
            log.warning("round %d: node %s replied with an error: %s", server_round, node, msg.error.reason)
            return False
        problem = check_reply(msg.content, self.reference, self.max_update_norm)
        if problem:
            self.participation["rejected"].append({"node": node, "reason": problem})
            log.warning("round %d: rejected the reply of node %s: %s", server_round, node, problem)
            return False
        metrics = msg.content.metric_records["metrics"]
        site = {"node": node, "num-examples": metrics["num-examples"], "train-seconds": metrics.get("train-seconds")}
        site.update({k: metrics[k] for k in SITE_DP_METRICS if k in metrics})
        self.participation["sites"].append(site)
        self.participation["valid"] += 1
        return True

    def _enough(self, server_round: int) -> bool:
        if self.participation["valid"] < self.min_replies:
            log.warning("round %d skipped: %d valid replies, %d needed; the global model is kept",
                        server_round, self.participation["valid"], self.min_replies)
            return False
        return True

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid = [msg for msg in replies if self.accept(server_round, msg)]
        if not self._enough(server_round):
            return None, None
        return super().aggregate_train(server_round, valid)

    def aggregate_streamed(self, server_round: int, mean: StreamingMean, instruction: Message):
        """The round's result from the streamed mean: the strategy's own aggregation (FedAdam's server
        step included) applied to one reply that carries the mean, and the sites' metrics aggregated."""
        if not self._enough(server_round):
            return None, None
        content = RecordDict({"arrays": mean.mean({k: v.dtype for k, v in self.reference.items()}),
                              "metrics": MetricRecord({"num-examples": mean.total})})
        arrays, _ = super().aggregate_train(server_round, [Message(content, reply_to=instruction)])
        return arrays, aggregate_metrics(mean.metrics, "num-examples")

    # -- state for checkpoints (FedAdam's moments, the DP accountant's ledger) ------------------------
    def accountant_state(self) -> dict[str, Any] | None:
        accountant = getattr(self, "accountant", None)
        return None if accountant is None else accountant.state_dict()

    def load_accountant_state(self, state: dict[str, Any] | None) -> None:
        accountant = getattr(self, "accountant", None)
        if accountant is None:
            if state:
                raise ValueError("this run's checkpoint holds a DP accountant but the settings have dp: none; "
                                 "resume with the run's DP settings.")
            return
        if not state:
            raise ValueError("the settings ask for DP but this run's checkpoint has no accountant state: the "
                             "rounds already run were not accounted; start a new run folder for a DP run.")
        try:
            accountant.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"cannot resume the DP budget: {err} Resume with the run's DP settings "
                             f"(dp-target-delta, dp-sites-per-round, dp-max-epsilon).") from None

    def state_arrays(self) -> dict[str, np.ndarray]:
        state = {}
        for name in ("m_t", "v_t"):
            for key, value in (getattr(self, name, None) or {}).items():
                state[f"{name}/{key}"] = np.asarray(value)
        return state

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        for name in ("m_t", "v_t"):
            part = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(name + "/")}
            if part:
                setattr(self, name, part)


class CheckedFedAvg(CheckedReplies, LenientMetrics, FedAvg):
    pass


class CheckedFedProx(CheckedReplies, LenientMetrics, FedProx):
    pass


class CheckedFedAdam(CheckedReplies, LenientMetrics, FedAdam):
    pass


# inside a DP wrapper: no aggregate_train override (Flower's accountant requires FedAvg's own)
class LenientFedAvg(LenientMetrics, FedAvg):
    pass


class LenientFedProx(LenientMetrics, FedProx):
    pass


def _build_dp_strategy(settings: RunSettings) -> CheckedReplies:
    """FedAvg/FedProx inside Flower's fixed-clipping DP wrapper with the RDP accountant, reply checks outside.

    Each round samples exactly ``dp_sites_per_round`` sites and needs all of them to reply validly.
    """
    check_dp_settings(settings)
    k = settings.dp_sites_per_round
    # a tiny fraction makes FedAvg sample exactly min_train_nodes = k sites
    common = dict(fraction_train=1e-9, fraction_evaluate=0.0, min_train_nodes=k,
                  min_available_nodes=max(k, settings.min_available), train_metrics_aggr_fn=aggregate_metrics)
    inner = (LenientFedProx(proximal_mu=settings.proximal_mu, **common) if settings.strategy == "fedprox"
             else LenientFedAvg(**common))
    wrapper = dp_wrapper_class(settings)
    checked = type(f"Checked{wrapper.__name__}", (CheckedReplies, wrapper), {"streams": False})
    strategy = checked(inner, settings.dp_noise_multiplier, settings.dp_clipping_norm, k,
                       accountant=make_accountant(settings))
    strategy.min_replies = k
    # server-side clipping bounds every update to dp_clipping_norm: a large update is clipped, as DP-FedAvg
    # intends, not rejected (rejecting it would skip the round). With client-side clipping the bound stays:
    # a site's update larger than the bound did not clip, and is refused.
    strategy.max_update_norm = float("inf") if settings.dp == "server" else settings.max_update_norm
    if settings.min_replies != k:
        log.info("dp: every round needs all %d sampled sites to reply (min_replies %d is not used)", k,
                 settings.min_replies)
    return strategy


def build_strategy(settings: RunSettings) -> CheckedReplies:
    """The run's strategy: FedAvg, FedProx (``proximal_mu``) or FedAdam (``server_lr``), with reply checks;
    FedAvg/FedProx inside Flower's DP wrapper when ``settings.dp`` is ``server`` or ``client``."""
    if settings.dp != "none":
        return _build_dp_strategy(settings)
    common = dict(fraction_train=settings.fraction_train, fraction_evaluate=0.0,
                  min_train_nodes=settings.min_available, min_available_nodes=settings.min_available,
                  train_metrics_aggr_fn=aggregate_metrics)
    if settings.strategy == "fedprox":
        strategy = CheckedFedProx(proximal_mu=settings.proximal_mu, **common)
    elif settings.strategy == "fedadam":
        strategy = CheckedFedAdam(eta=settings.server_lr, eta_l=settings.lr, **common)
    else:
        strategy = CheckedFedAvg(**common)
    strategy.min_replies = settings.min_replies
    strategy.max_update_norm = settings.max_update_norm
    return strategy


def aggregate_metrics(contents: list, weight_key: str) -> MetricRecord:
    """Example-weighted means of the sites' metrics (each site reports only whitelisted aggregates)."""
    weights = [float(c.metric_records["metrics"][weight_key]) for c in contents]
    total = sum(weights)
    names = sorted({k for c in contents for k in c.metric_records["metrics"]} - {weight_key})
    out = {weight_key: total}
    for name in names:
        pairs = [(w, c.metric_records["metrics"][name]) for w, c in zip(weights, contents)
                 if name in c.metric_records["metrics"]]
        out[name] = sum(w * float(v) for w, v in pairs) / sum(w for w, _ in pairs)
    return MetricRecord(out)
