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
