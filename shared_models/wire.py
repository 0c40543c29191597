"""The model's arrays packed into one flat buffer per dtype for a round's messages.

Flower 1.41 stores and moves every array of a message as its own objects, one HTTPS request each
(pull-object / push-object through the SuperLink): the ``tiny`` model's ~115 trainable arrays made ~230
requests per message and ~1,500 per round with three sites, about 50 s of a round's fixed cost on
loopback at the SuperLink's ~30 requests a second. Packed, a message carries one array per dtype (Flower
splits an array above 5 MiB into chunks of its own), so a round moves the same bytes in a few dozen requests.

The layout (names, dtypes, shapes, in order) travels in the round's config as a JSON string; a site
replies with the packed buffers only, which the server unpacks with the layout it sent, so nothing in
a reply names or shapes an array. Pure numpy: used by the server and the sites alike.
"""

from __future__ import annotations

import json
import math

import numpy as np

LAYOUT_KEY = "wire-layout"  # the round config's key
PREFIX = "packed."          # the packed buffers' names: "packed.float32", ...


def layout_of(arrays: dict[str, np.ndarray]) -> str:
    """The JSON layout of ``arrays``: ``[[name, dtype, shape], ...]`` in their order."""
    return json.dumps([[k, np.dtype(v.dtype).str, list(v.shape)] for k, v in arrays.items()], separators=(",", ":"))


def _parse(layout: str) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    try:
        entries = json.loads(layout)
        parsed = [(str(k), np.dtype(d), tuple(int(n) for n in shape)) for k, d, shape in entries]
    except (TypeError, ValueError) as err:
        raise ValueError(f"the round config's {LAYOUT_KEY!r} is not a valid array layout: {err}") from None
    names = [k for k, _, _ in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"the round config's {LAYOUT_KEY!r} names an array twice.")
    if any(n < 0 for _, _, shape in parsed for n in shape):
        raise ValueError(f"the round config's {LAYOUT_KEY!r} holds a negative dimension.")
    return parsed


def buffer_name(dtype: np.dtype) -> str:
    return PREFIX + np.dtype(dtype).name


def pack(arrays: dict[str, np.ndarray], layout: str | None = None) -> dict[str, np.ndarray]:
    """One flat buffer per dtype, arrays concatenated in the layout's order (default: their own).
    With ``layout``, every array it names must be in ``arrays`` with its shape; it is cast to the
    layout's dtype."""
    entries = _parse(layout) if layout is not None else [(k, v.dtype, v.shape) for k, v in arrays.items()]
    groups: dict[str, list[np.ndarray]] = {}
    for key, dtype, shape in entries:
        if key not in arrays:
            raise KeyError(f"array {key!r} of the layout is missing.")
        value = np.asarray(arrays[key])
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"array {key!r} has shape {tuple(value.shape)}, the layout says {tuple(shape)}.")
        groups.setdefault(buffer_name(dtype), []).append(value.astype(dtype, copy=False).ravel())
    return {name: np.concatenate(parts) for name, parts in groups.items()}


def unpack(buffers: dict[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    """The arrays of ``layout`` read back from packed ``buffers`` (views into them when the dtypes agree;
    a floating buffer of another precision, a half-precision reply, is cast to the layout's dtype).
    ValueError when a buffer is missing, is not 1-D of the layout's length, or is not floating where
    the layout's dtype is."""
    entries = _parse(layout)
    offsets: dict[str, int] = {}
    need: dict[str, int] = {}
    for _, dtype, shape in entries:
        need[buffer_name(dtype)] = need.get(buffer_name(dtype), 0) + math.prod(shape)
    for name, n in need.items():
        if name not in buffers:
            raise ValueError(f"packed buffer {name!r} is missing (got {sorted(buffers)}).")
        got = np.asarray(buffers[name])
        want = np.dtype(name[len(PREFIX):])
        same_kind = got.dtype == want or (np.issubdtype(want, np.floating) and _floating(got.dtype))
        if got.ndim != 1 or got.shape[0] != n or not same_kind:
            raise ValueError(f"packed buffer {name!r} should be {n} values of {want}, got {got.dtype} {got.shape}.")
        buffers = {**buffers, name: got.astype(want, copy=False)}
    out = {}
    for key, dtype, shape in entries:
        name, size = buffer_name(dtype), math.prod(shape)
        start = offsets.get(name, 0)
        out[key] = buffers[name][start:start + size].reshape(shape)
        offsets[name] = start + size
    return out


def _floating(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype).name == "bfloat16"  # ml_dtypes' bfloat16
