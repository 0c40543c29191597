"""State dicts to and from named arrays: stable order, wrappers removed, mismatches refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shared_models.state import arrays_to_state_dict, load_arrays, model_to_arrays, unwrap_model


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_round_trip_restores_every_value():
    source, target = small_model(0), small_model(1)
    load_arrays(target, model_to_arrays(source))
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)


def test_keys_are_sorted_and_wrappers_are_removed():
    from opacus import GradSampleModule

    model = small_model()
    plain = model_to_arrays(model)
    assert list(plain) == sorted(plain)
    for wrapped in (GradSampleModule(model), torch.compile(model), nn.parallel.DataParallel(model)):
        assert unwrap_model(wrapped) is model
        arrays = model_to_arrays(wrapped)
        assert list(arrays) == list(plain)
        assert all(np.array_equal(arrays[k], plain[k]) for k in plain)


def test_loading_into_a_wrapped_model_reaches_the_bare_model():
    from opacus import GradSampleModule

    source, target = small_model(0), small_model(1)
    load_arrays(GradSampleModule(target), model_to_arrays(source))
    assert torch.equal(target[0].weight, source[0].weight)


def test_bfloat16_state_travels_as_float32():
    arrays = model_to_arrays(small_model().to(torch.bfloat16))
    assert all(a.dtype == np.float32 for a in arrays.values())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.pop("0.weight"), "missing \\['0.weight'\\]"),
        (lambda a: a.__setitem__("extra", np.zeros(1)), "unexpected \\['extra'\\]"),
        (lambda a: a.__setitem__("0.bias", np.zeros(5, np.float32)), "'0.bias' has shape \\(5,\\), the model expects \\(4,\\)"),
        (lambda a: a["2.bias"].__setitem__(0, np.nan), "'2.bias' holds non-finite values"),
    ],
)
def test_mismatched_arrays_are_refused_with_the_key(mutate, message):
    model = small_model()
    arrays = model_to_arrays(model)
    mutate(arrays)
    with pytest.raises(ValueError, match=message):
        arrays_to_state_dict(arrays, model)


def test_scalars_that_travelled_as_shape_one_load_back():
    model = nn.Module()
    model.scale = nn.Parameter(torch.tensor(2.5))
    arrays = model_to_arrays(model)
    assert arrays["scale"].shape == (1,)  # no 0-d arrays on the wire
    state = arrays_to_state_dict(arrays, model)
    assert state["scale"].shape == () and state["scale"].item() == 2.5


class HalfFrozen(nn.Module):
    """A trainable head beside a frozen tower that owns a buffer (as a locked text tower owns position ids)."""

    def __init__(self):
        super().__init__()
        self.tower = nn.Linear(3, 4)
        self.tower.register_buffer("ids", torch.arange(4))
        self.tower.requires_grad_(False)
        self.head = nn.Linear(4, 2)
        self.head.register_buffer("scale", torch.ones(1))


def test_frozen_keys_are_the_frozen_parameters_and_the_buffers_of_all_frozen_modules():
    from shared_models.state import frozen_keys

    model = HalfFrozen()
    assert frozen_keys(model) == ["tower.bias", "tower.ids", "tower.weight"]
    wrapped = nn.Module()
    wrapped.module = model  # as DDP wraps a model
    assert frozen_keys(wrapped) == frozen_keys(model)
    model.tower.bias.requires_grad_(True)  # a module with one trainable parameter keeps its buffers travelling
    assert frozen_keys(model) == ["tower.weight"]
    assert frozen_keys(small_model()) == []


def test_arrays_digest_covers_names_dtypes_shapes_and_bytes():
    from shared_models.state import arrays_digest

    arrays = model_to_arrays(HalfFrozen())
    keys = ["tower.bias", "tower.weight"]
    digest = arrays_digest(arrays, keys)
    assert digest == arrays_digest(dict(reversed(list(arrays.items()))), list(reversed(keys)))  # order-free
    assert digest != arrays_digest(arrays)  # other keys, other digest
    changed = {**arrays, "tower.bias": arrays["tower.bias"].copy()}
    changed["tower.bias"][0] = np.nextafter(changed["tower.bias"][0], np.float32(np.inf))
    assert arrays_digest(changed, keys) != digest  # one ulp
    assert arrays_digest({**arrays, "tower.bias": arrays["tower.bias"].astype(np.float64)}, keys) != digest
    assert arrays_digest({**arrays, "tower.weight": arrays["tower.weight"].reshape(3, 4)}, keys) != digest
    assert arrays_digest({"tower.weight": arrays["tower.weight"], "tower.bias": arrays["tower.bias"]}) == digest
