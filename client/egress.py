"""What may leave the site: the reply whitelist, defined once and applied twice.

:func:`filter_reply` is the one definition. The site runner (:mod:`client.site_runner`, site-owned code
outside the FAB) applies it to every reply before pushing it: that is the site's guarantee. The
ClientApp's :func:`guard` mod applies it again inside the app, as defence in depth.

A training reply goes out only as:
- ``arrays``: arrays the server sent (a subset of its names; the same shapes; the same dtype, or
  float16/bfloat16 in place of a float32 array), finite, re-serialized by the site;
- ``metrics``: ``num-examples`` (an int in 1..``privacy.max_num_examples``) and the metric names of
  :data:`ALLOWED_METRICS`, each a finite int or float (no lists, no strings).
Anything else (other array names, other records, config records, other metric names, non-scalar values)
is dropped and logged at the site. A reply whose arrays of the global model are malformed (another
shape or dtype, non-finite values) or whose ``num-examples`` is missing or out of bounds is withheld
entirely. A failure becomes a reply with a fixed text: the reason (which may hold a path, a UID or a
line of a report) stays in the site's log. Error texts name only what the server sent (array names and
the expected shape or dtype), never a value the app produced.

bfloat16 on the wire: numpy has no bfloat16, so such an array travels as ``Array(dtype="bfloat16",
stype="numpy.ndarray")`` whose data is the NPY file of its uint16 bit patterns (float32 = bits << 16).

With ``privacy.egress_log`` in the site YAML, every reply that leaves is recorded (one JSON line: array
names, shapes, dtypes and SHA-256 digests, the metrics, what was dropped, or the error), so an ethics
board can audit what was sent. The guard checks structure, not content: weights and the whitelisted
scalars could in principle encode anything, which is why the site also decides which app versions run
(:mod:`client.approvals`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode, SType

from shared_models.config import OBJECTIVES

from .site_config import SiteConfig

log = logging.getLogger(__name__)

ALLOWED_METRICS = frozenset({
    "num-examples", "train-loss", "local-steps", "train-seconds", "volumes-per-second", "data-wait-fraction",
    "volumes", "optimizer-resumed", "dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-max-grad-norm",
    *(f"loss.{name}" for name in OBJECTIVES),
})
"""Metric names a site may send: aggregates of its local training, never per-study values."""

HALF_PRECISION = ("float16", "bfloat16")  # what a float32 array of the global model may travel as
DEFAULT_MAX_NUM_EXAMPLES = 100_000  # privacy.max_num_examples when no site config is at hand
SITE_RUNNER_ENV = "FEDVLP_SITE_RUNNER"  # set by the site runner for the app it starts: it keeps the log


class Withheld(ValueError):
    """The reply may not leave at all (the reason names only what the server sent)."""


def failure(msg: Message, what: str, code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION) -> Message:
    return Message(Error(code=code, reason=what), reply_to=msg)


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def clean_array(key: str, sent: Array, got: Array) -> Array:
    """``got`` re-serialized by the site, if it is a well-formed reply to ``sent``; else :class:`Withheld`."""
    allowed = (sent.dtype, *HALF_PRECISION) if sent.dtype == "float32" else (sent.dtype,)
    if got.dtype not in allowed:
        raise Withheld(f"array {key!r} is not of dtype {' or '.join(allowed)}")
    try:
        value = got.numpy() if got.stype == SType.NUMPY else None  # np.load without pickles
    except Exception:  # noqa: BLE001 - anything numpy cannot read as a plain array is refused
        value = None
    wanted = np.dtype(np.uint16 if got.dtype == "bfloat16" else got.dtype)
    if value is None or value.dtype != wanted:
        raise Withheld(f"array {key!r} is not a plain {got.dtype} array")
    if tuple(value.shape) != tuple(sent.shape):
        raise Withheld(f"array {key!r} does not have the shape {tuple(sent.shape)}")
    if got.dtype == "bfloat16":
        finite = bool(((value & 0x7F80) != 0x7F80).all())  # exponent all ones: inf or nan
    elif np.issubdtype(value.dtype, np.floating):
        finite = bool(np.isfinite(value).all())
    else:
        raise Withheld(f"array {key!r} is not floating point")
    if not finite:
        raise Withheld(f"array {key!r} holds non-finite values")
    value = np.ascontiguousarray(value)
    return Array(dtype=got.dtype, shape=tuple(value.shape), stype=SType.NUMPY, data=_npy(value))


def filter_reply(msg: Message, reply: Message, max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES
                 ) -> tuple[Message, list[str]]:
    """The reply as it may leave, and what was dropped (for the site's log). Error replies pass as they
    are: the caller decides what an error may say."""
    if reply.has_error():
        return reply, []
    dropped: list[str] = []
    content = reply.content
    sent = msg.content.array_records.get("arrays")
    arrays = content.array_records.get("arrays")
    try:
        if sent is None or arrays is None:
            raise Withheld("no 'arrays' record")
        dropped += [f"array arrays.{key}" for key in arrays.keys() if key not in sent]
        kept = [key for key in sent.keys() if key in arrays]
        if not kept:
            raise Withheld("none of the global model's arrays")
        clean = {key: clean_array(key, sent[key], arrays[key]) for key in kept}
        metrics: dict[str, int | float] = {}
        for record_name, record in content.metric_records.items():
            for name, value in record.items():
                if record_name == "metrics" and name in ALLOWED_METRICS and _scalar(value):
                    metrics[name] = value
                else:
                    dropped.append(f"metric {record_name}.{name} ({type(value).__name__})")
        dropped += [f"array record {name!r}" for name in content.array_records.keys() if name != "arrays"]
        dropped += [f"config record {name!r}" for name in content.config_records.keys()]
        n = metrics.get("num-examples")
        if not (isinstance(n, int) and 1 <= n <= max_num_examples):
            raise Withheld(f"no integer 'num-examples' within 1..{max_num_examples} (privacy.max_num_examples)")
    except Withheld as problem:
        return failure(msg, f"reply withheld by the site's egress guard: {problem}"), [*dropped, "the whole reply"]
    out = RecordDict({"arrays": ArrayRecord(array_dict=clean), "metrics": MetricRecord(metrics)})
    return Message(out, reply_to=msg), dropped


def audit(path: str | Path, msg: Message, reply: Message, dropped: list[str] = (), **extra) -> None:
    """Append what left the site to the egress log (digests of arrays, not their bytes)."""
    entry: dict = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": msg.metadata.run_id,
                   "message_type": msg.metadata.message_type, **extra}
    if reply.has_error():
        entry["error"] = {"code": int(reply.error.code), "reason": reply.error.reason}
    else:
        entry["arrays"] = {k: {"shape": list(a.shape), "dtype": str(a.dtype),
                               "sha256": hashlib.sha256(a.data).hexdigest()}
                           for k, a in reply.content.array_records["arrays"].items()}
        entry["metrics"] = dict(reply.content.metric_records["metrics"])
    if dropped:
        entry["dropped"] = list(dropped)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


def guard(msg: Message, context: Context, call_next, site_cfg: SiteConfig | None) -> Message:
    """The in-app mod: run the app, let out only the whitelisted reply (see the module docstring)."""
    try:
        reply = call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - every failure must be sanitized before it leaves
        log.exception("the ClientApp failed; the server is told only the exception type")
        reply = failure(msg, f"site training failed ({type(err).__name__}); the site's log has the details")
    else:
        bound = site_cfg.privacy.max_num_examples if site_cfg is not None else DEFAULT_MAX_NUM_EXAMPLES
        reply, dropped = filter_reply(msg, reply, bound)
        for item in dropped:
            log.warning("egress guard dropped %s from the reply", item)
    # under the site runner, the runner (which sees what really leaves) keeps the egress log
    if site_cfg is not None and site_cfg.privacy.egress_log and not os.environ.get(SITE_RUNNER_ENV):
        audit(site_cfg.privacy.egress_log, msg, reply)
    return reply
