"""A layer's weights and config with some of its channels removed.

Each `Use` kind (see `surgery.pruning.flow`) says where a layer's weights
hold its input and output channels. `sliced(use, keep_in, keep_out)` gives
the weights, in `get_weights()` order, and the config changes that go with
them (`units`, `filters`, `groups`, `output_dim`, `target_shape`).
"""

from __future__ import annotations

import numpy as np

from surgery.errors import SurgeryError
from surgery.pruning.flow import Use

# (variable name, axis of its input channels, axis of its output channels);
# axes count from the end, None where the variable has no such channels
LAYOUTS = {
    "dense": {"kernel": (-2, -1), "bias": (None, -1)},
    "conv": {"kernel": (-2, -1), "bias": (None, -1)},
    "transpose": {"kernel": (-1, -2), "bias": (None, -1)},
    "separable": {
        "depthwise_kernel": (-2, None),
        "pointwise_kernel": ("depth", -1),
        "bias": (None, -1),
    },
    "depthwise": {"kernel": (-2, None), "bias": (None, -1)},
    "grouped": {"kernel": (None, -1), "bias": (None, -1)},
    "embedding": {"embeddings": (None, -1)},
    "norm": {
        name: (-1, None) for name in ("gamma", "beta", "moving_mean", "moving_variance")
    },
}
SIZE = {
    "dense": "units",
    "conv": "filters",
    "transpose": "filters",
    "separable": "filters",
    "embedding": "output_dim",
    "grouped": "filters",
}


def sliced(
    use: Use, keep_in: np.ndarray | None, keep_out: np.ndarray | None
) -> tuple[list[np.ndarray], dict]:
    """The layer's weights with only the kept channels, and its config changes.

    `keep_in` and `keep_out` are boolean masks over the channels it reads
    and writes (`None`: all kept).
    """
    layer = use.layer
    if use.kind == "reshape":
        return [], {"target_shape": _target_shape(use, keep_out)}
    changes = {}
    if use.kind in SIZE and keep_out is not None:
        changes[SIZE[use.kind]] = int(keep_out.sum())
    if "size" in use.detail and keep_in is not None:
        changes[use.detail["size"]] = int(keep_in.sum())
    if use.kind == "grouped" and keep_in is not None:
        changes["groups"] = int(keep_in.sum())
    weights = []
    for variable, value in zip(layer.weights, layer.get_weights(), strict=True):
        name = weight_name(variable)
        weights.append(_slice_variable(use, name, value, keep_in, keep_out))
    return weights, changes


def weight_name(variable) -> str:
    """A variable's own name in its layer (`kernel`, `bias`, `gamma`, ...)."""
    return variable.path.rsplit("/", 1)[-1]


def _slice_variable(use, name, value, keep_in, keep_out) -> np.ndarray:
    if use.kind == "norm":  # every weight holds one value per channel
        return _keep(value, -1, keep_in)
    if use.kind == "prelu":
        axis = use.detail["axis"] - 1
        if keep_in is not None and value.shape[axis] == len(keep_in):
            return np.compress(keep_in, value, axis=axis)
        return value
    layout = LAYOUTS.get(use.kind, {}).get(name)
    if layout is None:
        raise SurgeryError(
            f"cannot remove channels of layer '{use.path}' "
            f"({type(use.layer).__name__}): its weight '{name}' is not one "
            "channel pruning knows how to slice"
        )
    in_axis, out_axis = layout
    if in_axis == "depth":
        m = use.layer.depth_multiplier
        value = _keep(value, -2, None if keep_in is None else np.repeat(keep_in, m))
    else:
        value = _keep(value, in_axis, keep_in)
    return _keep(value, out_axis, keep_out)


def _keep(value, axis, mask) -> np.ndarray:
    if axis is None or mask is None:
        return value
    return np.compress(mask, value, axis=axis)


def _target_shape(use: Use, keep_out) -> tuple:
    target = tuple(use.layer.target_shape)
    kept = int(len(use.outputs[0]) if keep_out is None else keep_out.sum())
    if not use.detail["last"]:
        return (kept,)
    return (*target[:-1], kept)
