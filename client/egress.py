"""The egress guard: a ClientApp mod that decides what may leave the site.

A training reply goes out only as:
- ``arrays``: exactly the arrays the server sent (same names, shapes, floating dtypes), finite;
- ``metrics``: ``num-examples`` and the metric names of :data:`ALLOWED_METRICS`, each a finite int or
  float (no lists, no strings).
Anything else in the reply (other records, other metric names, non-scalar values) is dropped and
logged at the site. A reply whose arrays do not match is withheld entirely. A ClientApp failure
becomes a reply that names only the exception's type: its message (which may hold a path, a UID or a
line of a report) stays in the site's log. With ``privacy.egress_log`` in the site YAML, every reply
that leaves is also recorded there (one JSON line: array names, shapes, dtypes and SHA-256 digests,
the metrics, or the error), so an ethics board can audit what was sent.

The guard checks structure, not content: weights could in principle encode anything, which is why the
site also pins the app versions it runs (:mod:`client.fab_pinning`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from shared_models.config import OBJECTIVES

from .site_config import SiteConfig

log = logging.getLogger(__name__)

ALLOWED_METRICS = frozenset({
    "num-examples", "train-loss", "local-steps", "train-seconds", "volumes-per-second", "data-wait-fraction",
    "volumes", "optimizer-resumed", "dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-max-grad-norm",
    *(f"loss.{name}" for name in OBJECTIVES),
})
"""Metric names a site may send: aggregates of its local training, never per-study values."""


def _failure(msg: Message, what: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=what), reply_to=msg)


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _arrays_problem(sent: ArrayRecord, reply: ArrayRecord) -> str | None:
    if list(sent.keys()) != list(reply.keys()):
        return "its array names differ from the global model's"
    for key in sent.keys():
        a, b = sent[key], reply[key]
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            return f"array {key!r} has shape {tuple(b.shape)} {b.dtype}, expected {tuple(a.shape)} {a.dtype}"
        value = b.numpy()
        if not np.issubdtype(value.dtype, np.floating):
            return f"array {key!r} is not floating point"
        if not np.isfinite(value).all():
            return f"array {key!r} holds non-finite values"
    return None


def filter_reply(msg: Message, reply: Message) -> tuple[Message, list[str]]:
    """The reply as it may leave, and what was dropped (for the site's log)."""
    if reply.has_error():
        # Flower's own errors (e.g. a mod's) are fixed texts; ours were sanitized by the caller
        return reply, []
    dropped: list[str] = []
    content = reply.content
    sent = msg.content.array_records.get("arrays")
    arrays = content.array_records.get("arrays")
    if sent is None or arrays is None:
        return _failure(msg, "reply withheld by the site's egress guard: no 'arrays' record"), ["the whole reply"]
    problem = _arrays_problem(sent, arrays)
    if problem:
        return _failure(msg, f"reply withheld by the site's egress guard: {problem}"), ["the whole reply"]
    metrics: dict[str, int | float] = {}
    for record_name, record in content.metric_records.items():
        for name, value in record.items():
            if record_name == "metrics" and name in ALLOWED_METRICS and _scalar(value):
                metrics[name] = value
            else:
                dropped.append(f"metric {record_name}.{name} ({type(value).__name__})")
    for record_name in content.array_records.keys():
        if record_name != "arrays":
            dropped.append(f"array record {record_name!r}")
    for record_name in content.config_records.keys():
        dropped.append(f"config record {record_name!r}")
    if "num-examples" not in metrics:
        return _failure(msg, "reply withheld by the site's egress guard: no scalar 'num-examples'"), dropped
    clean = RecordDict({"arrays": ArrayRecord(array_dict={k: Array(arrays[k].numpy()) for k in arrays.keys()}),
                        "metrics": MetricRecord(metrics)})
    return Message(clean, reply_to=msg), dropped


def audit(path: str | Path, msg: Message, reply: Message) -> None:
    """Append what left the site to the egress log (digests of arrays, not their bytes)."""
    entry: dict = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": msg.metadata.run_id,
                   "message_type": msg.metadata.message_type}
    if reply.has_error():
        entry["error"] = {"code": int(reply.error.code), "reason": reply.error.reason}
    else:
        entry["arrays"] = {k: {"shape": list(a.shape), "dtype": str(a.dtype),
                               "sha256": hashlib.sha256(a.data).hexdigest()}
                           for k, a in reply.content.array_records["arrays"].items()}
        entry["metrics"] = dict(reply.content.metric_records["metrics"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


def guard(msg: Message, context: Context, call_next, site_cfg: SiteConfig | None) -> Message:
    """Run the app; let out only the whitelisted reply (see the module docstring)."""
    try:
        reply = call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - every failure must be sanitized before it leaves
        log.exception("the ClientApp failed; the server is told only the exception type")
        reply = _failure(msg, f"site training failed ({type(err).__name__}); the site's log has the details")
    else:
        reply, dropped = filter_reply(msg, reply)
        for item in dropped:
            log.warning("egress guard dropped %s from the reply", item)
    if site_cfg is not None and site_cfg.privacy.egress_log:
        audit(site_cfg.privacy.egress_log, msg, reply)
    return reply
