"""Model state to and from the named arrays Flower sends, in one stable key order.

Sites may train a wrapped model: opacus's ``GradSampleModule`` (``_module.``), ``torch.compile``
(``_orig_mod.``) or DDP (``module.``). What travels always uses the bare model's keys, so every site
and the server agree byte for byte whatever wrappers a site uses.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

WRAPPER_PREFIXES = ("_module.", "_orig_mod.", "module.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside opacus, ``torch.compile`` and DDP wrappers (any nesting)."""
    while True:
        for attr in ("_module", "_orig_mod", "module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def strip_wrapper_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def model_to_arrays(model: nn.Module | Mapping[str, torch.Tensor]) -> "OrderedDict[str, np.ndarray]":
    """Named float32/int arrays of a model (or state dict), keys sorted, wrapper prefixes removed.

    Scalar parameters (the logit scale) become shape ``(1,)``.
    Sorting makes the order independent of how a site wrapped or built its model.
    """
    state = unwrap_model(model).state_dict() if isinstance(model, nn.Module) else model
    arrays = {}
    for key, tensor in state.items():
        name = strip_wrapper_prefixes(key)
        if name in arrays:
            raise ValueError(f"two state entries map to {name!r} after removing wrapper prefixes.")
        t = tensor.detach().to("cpu")
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        # scalars travel as shape (1,): Flower's Array does not keep 0-d shapes consistently
        arrays[name] = t.numpy().copy().reshape(-1) if t.dim() == 0 else t.numpy().copy()
    return OrderedDict((k, arrays[k]) for k in sorted(arrays))


def arrays_to_state_dict(
    arrays: Mapping[str, np.ndarray | torch.Tensor], reference: nn.Module | Mapping[str, torch.Tensor]
) -> "OrderedDict[str, torch.Tensor]":
    """Tensors for ``reference``'s keys from named arrays, checking names, shapes and finiteness.

    Raises ValueError naming missing, unexpected or mis-shaped keys, or non-finite values.
    """
    ref = unwrap_model(reference).state_dict() if isinstance(reference, nn.Module) else reference
    ref = {strip_wrapper_prefixes(k): v for k, v in ref.items()}
    missing = sorted(set(ref) - set(arrays))
    unexpected = sorted(set(arrays) - set(ref))
    if missing or unexpected:
        raise ValueError(
            f"arrays do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"({len(missing)}), unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})."
        )
    out = OrderedDict()
    for key, target in ref.items():
        value = torch.as_tensor(np.asarray(arrays[key]) if not isinstance(arrays[key], torch.Tensor) else arrays[key])
        if target.dim() == 0 and tuple(value.shape) == (1,):
            value = value.reshape(())  # scalars travel as shape (1,) (see model_to_arrays)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"array {key!r} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}.")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"array {key!r} holds non-finite values.")
        out[key] = value.to(dtype=target.dtype)
    return out


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Load named arrays into ``model`` (wrapped or not), after :func:`arrays_to_state_dict`'s checks."""
    bare = unwrap_model(model)
    bare.load_state_dict(arrays_to_state_dict(arrays, bare), strict=True)


def frozen_keys(model: nn.Module) -> list[str]:
    """State-dict keys (as :func:`model_to_arrays` names them) of what cannot train: parameters with
    ``requires_grad`` False, and the buffers of modules whose parameters are all frozen (a locked text
    tower's position ids). They need not travel between sites and server: both build them alike."""
    bare = unwrap_model(model)
    frozen = {strip_wrapper_prefixes(n) for n, p in bare.named_parameters() if not p.requires_grad}
    for name, _ in bare.named_buffers():
        owner = bare.get_submodule(name.rsplit(".", 1)[0]) if "." in name else bare
        params = list(owner.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.add(strip_wrapper_prefixes(name))
    return sorted({strip_wrapper_prefixes(k) for k in bare.state_dict()} & frozen)


def arrays_digest(arrays: Mapping[str, np.ndarray], keys: Iterable[str] | None = None) -> str:
    """SHA-256 over the named arrays (``keys``, default all) in sorted order: names, dtypes, shapes, bytes."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(arrays if keys is None else keys):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
