"""`delete_channels`: remove channels of a layer and everything coupled to them."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from surgery.errors import SurgeryError
from surgery.graph.edits import Replace, SetWeights
from surgery.graph.rewrite import rewrite
from surgery.graph.spots import locate
from surgery.pruning.flow import ChannelFlow, trace_channels
from surgery.pruning.slicing import sliced, weight_name


def delete_channels(
    model: keras.Model, layer: str, channels: Sequence[int]
) -> keras.Model:
    """A new model without the given output channels of `layer`.

    The channels go from every layer coupled to them (see
    `surgery.channel_groups`): from the layer's own kernel and bias, from
    the BatchNormalization and depthwise convolutions after it, from the
    input of every Dense or convolution that reads them (at each position
    a `Flatten` spread them to), and, through an `Add` or another
    element-wise merge, from the other branches' layers too. Works the same
    on every backend. The input model is not modified and shares no
    variables with the result.

    Removing channels changes what the model computes unless they carried
    nothing its outputs depend on; `surgery.prune_channels` picks channels
    by a criterion and measures what changed, `surgery.verify` compares any
    two models.

    Args:
        model: A Functional or Sequential `keras.Model` (a subclassed one
            goes through `surgery.functional` first).
        layer: The path of the layer whose output channels go (`"conv1"`,
            or `"resnet50/conv1_conv"` inside a nested model). Any layer
            with one output whose channels are followed: a Dense or
            convolution, or a layer after one (a BatchNormalization, an
            activation, an `Add`).
        channels: Indices on the layer's output channel axis, counted from 0.

    Returns:
        The new model, of the same kind, with the same layer names.

    Raises:
        SurgeryError: `layer` names no layer of the model; `channels` is
            empty, repeats an index or is out of range; a channel cannot go
            (it reaches a model output, a model input makes it, or a layer
            channel pruning cannot follow reads it: the message says which);
            or a layer would be left with no channels.

    Example:

    ```python
    import keras
    import surgery

    model = keras.Sequential([
        keras.Input((16,)),
        keras.layers.Dense(8, activation="relu", name="fc1"),
        keras.layers.Dense(2, name="fc2"),
    ])
    new = surgery.delete_channels(model, "fc1", [0, 5])
    print(new.get_layer("fc1").units, new.get_layer("fc2").kernel.shape)
    # 6 (6, 2)
    ```
    """
    flow = trace_channels(model)
    atoms = _output_channels(model, flow, layer)
    picked = _checked_indices(layer, channels, len(atoms))
    roots = flow.atoms.find(atoms[picked])
    fixed = flow.atoms.class_reasons(flow.atoms.fixed)
    for index, root in zip(picked.tolist(), roots.tolist(), strict=True):
        if root in fixed:
            raise SurgeryError(
                f"channel {index} of '{layer}' cannot be removed: {fixed[root]}"
            )
    return rewrite(model, removal_edits(flow, set(roots.tolist())))


def removal_edits(
    flow: ChannelFlow, removed: set[int], bias_shift: dict | None = None
) -> list:
    """The rewrite edits that remove the channel classes `removed`.

    `bias_shift` maps a layer path to a float64 array added to its bias
    (full length, before its own channels are removed): what the removed
    channels' constant values contributed there. A layer without a bias
    gets one.
    """
    bias_shift = bias_shift or {}
    removed_roots = np.fromiter(removed, np.int64)
    edits = []
    for use in flow.uses.values():
        keep_in = _kept(flow, use.inputs[0], removed_roots) if use.inputs else None
        keep_out = _kept(flow, use.outputs[0], removed_roots)
        shift = bias_shift.get(use.path)
        if keep_in is None and keep_out is None and shift is None:
            continue
        if keep_out is not None and not keep_out.any():
            raise SurgeryError(
                f"layer '{use.path}' would have no channels left; keep at "
                "least one of its channels"
            )
        weights, changes = sliced(use, keep_in, keep_out)
        if shift is not None:
            weights, changes = _shifted(use, weights, changes, shift, keep_out)
        if changes:
            config = {**use.layer.get_config(), **changes}
            new = type(use.layer).from_config(config)
            edits.append(Replace(use.path, new, reshapes=True))
        if weights:
            edits.append(SetWeights(use.path, weights))
    return edits


def _kept(flow, atoms, removed_roots) -> np.ndarray | None:
    """Which of `atoms` stay, or None when all do."""
    if atoms is None or not len(removed_roots):
        return None
    keep = ~np.isin(flow.atoms.find(atoms), removed_roots)
    return None if keep.all() else keep


def _shifted(use, weights, changes, shift, keep_out):
    """Add `shift` to the layer's bias (creating one if it has none)."""
    shift = shift if keep_out is None else shift[keep_out]
    names = [weight_name(v) for v in use.layer.weights]
    if "bias" in names:
        i = names.index("bias")
        total = weights[i].astype(np.float64) + shift
        weights[i] = total.astype(weights[i].dtype)
        return weights, changes
    dtype = weights[names.index("kernel") if "kernel" in names else 0].dtype
    i = names.index("kernel") + 1 if "kernel" in names else len(weights)
    return [*weights[:i], shift.astype(dtype), *weights[i:]], {
        **changes,
        "use_bias": True,
    }


def _output_channels(model, flow, layer) -> np.ndarray:
    if not isinstance(layer, str) or not layer:
        raise SurgeryError(f"layer must be a layer path, got {layer!r}")
    locate(model, layer)  # a wrong name fails here, with close names
    atoms = flow.outputs.get(layer)
    if atoms is None:
        raise SurgeryError(
            f"layer '{layer}' has no fixed number of output channels to remove"
        )
    return atoms


def _checked_indices(layer, channels, count) -> np.ndarray:
    try:
        picked = np.asarray(list(channels))
    except TypeError:
        picked = np.asarray([])
    if (
        picked.size == 0
        or picked.ndim != 1
        or not np.issubdtype(picked.dtype, np.integer)
    ):
        raise SurgeryError(
            f"channels for '{layer}' must be a non-empty list of ints, got {channels!r}"
        )
    if len(set(picked.tolist())) != len(picked):
        raise SurgeryError(f"channels for '{layer}' repeat an index: {channels!r}")
    bad = picked[(picked < 0) | (picked >= count)]
    if bad.size:
        raise SurgeryError(
            f"channel {int(bad[0])} is out of range for '{layer}', which has "
            f"{count} channels (0 ... {count - 1})"
        )
    return picked
