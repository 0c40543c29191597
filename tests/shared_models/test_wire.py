"""The packed wire format of a round's arrays (shared_models.wire)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared_models import wire


def arrays():
    rng = np.random.default_rng(0)
    return {"a.weight": rng.normal(size=(3, 4)).astype(np.float32), "steps": np.arange(5, dtype=np.int64),
            "a.bias": rng.normal(size=(4,)).astype(np.float32), "scalar": np.array(2.5, dtype=np.float32)}


def test_round_trip_keeps_names_shapes_dtypes_and_values():
    src = arrays()
    layout = wire.layout_of(src)
    buffers = wire.pack(src)
    assert sorted(buffers) == ["packed.float32", "packed.int64"]
    assert buffers["packed.float32"].shape == (12 + 4 + 1,)
    back = wire.unpack(buffers, layout)
    assert list(back) == list(src)
    for key, value in src.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert np.array_equal(back[key], value)


def test_pack_with_a_layout_follows_its_order_and_casts_to_its_dtypes():
    src = arrays()
    layout = wire.layout_of(src)
    reordered = {k: src[k].astype(np.float64) if src[k].dtype == np.float32 else src[k] for k in reversed(list(src))}
    buffers = wire.pack(reordered, layout)
    assert buffers["packed.float32"].dtype == np.float32
    assert np.array_equal(buffers["packed.float32"], wire.pack(src)["packed.float32"])


def test_pack_refuses_a_missing_or_reshaped_array():
    src = arrays()
    layout = wire.layout_of(src)
    with pytest.raises(KeyError, match="a.bias"):
        wire.pack({k: v for k, v in src.items() if k != "a.bias"}, layout)
    with pytest.raises(ValueError, match="a.weight"):
        wire.pack({**src, "a.weight": src["a.weight"].T}, layout)


def test_unpack_refuses_buffers_that_do_not_fit_the_layout():
    src = arrays()
    layout = wire.layout_of(src)
    buffers = wire.pack(src)
    with pytest.raises(ValueError, match="packed.float32"):
        wire.unpack({**buffers, "packed.float32": buffers["packed.float32"][:-1]}, layout)
    with pytest.raises(ValueError, match="missing"):
        wire.unpack({"packed.float32": buffers["packed.float32"]}, layout)
    with pytest.raises(ValueError, match="packed.int64"):  # integers do not stand in for another dtype
        wire.unpack({**buffers, "packed.int64": buffers["packed.int64"].astype(np.float32)}, layout)
    with pytest.raises(ValueError, match="wire-layout"):
        wire.unpack(buffers, "not json")
    twice = json.dumps([["a", "<f4", [1]], ["a", "<f4", [1]]])
    with pytest.raises(ValueError, match="twice"):
        wire.unpack({"packed.float32": np.zeros(2, np.float32)}, twice)


def test_a_half_precision_buffer_reads_back_in_the_layout_dtype():
    src = {"w": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)}
    layout = wire.layout_of(src)
    half = {"packed.float32": wire.pack(src)["packed.float32"].astype(np.float16)}
    back = wire.unpack(half, layout)
    assert back["w"].dtype == np.float32
    assert np.allclose(back["w"], src["w"], atol=1e-3)
