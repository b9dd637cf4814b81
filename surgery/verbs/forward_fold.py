"""Forward folding: a BatchNormalization folded into the Dense or conv AFTER it.

A BN that follows an activation (Conv -> ReLU -> BN -> Conv, common in
Keras 2-era models) cannot fold backwards, but its affine map
`x * s + t` can go into the linear layer that consumes it:
`W (x * s + t) + b = (W * s) x + (b + W t)`. For a Dense layer that is exact
algebra. For a convolution it holds only where every window sees real
inputs: with `padding="valid"`. With `"same"` padding the zeros added at the
border would have been `t` after the BN, so it folds only when `t == 0`
(AIMET's rule as well). The new weights are computed in float64 and cast
once.
"""

from __future__ import annotations

import keras
import numpy as np

L = keras.layers
CONSUMERS = (L.Dense, L.Conv1D, L.Conv2D, L.Conv3D)  # kernel (..., in, out)


def check(graph, bn, calls, consumers_of, shift) -> tuple[object, str | None]:
    """The layer `bn` can fold forward into, and None; or None and why not.

    Args:
        graph: the Functional graph holding `bn`.
        bn: the BatchNormalization layer (called once in `graph`).
        calls: call counts of every layer, by id.
        consumers_of: maps a tensor to the nodes that take it as input and
            whether it is a model output.
        shift: `beta - mean * s` of `bn` (float64, per unit).
    """
    from surgery.graph.spots import nodes_of

    tensor = nodes_of(graph, bn)[0].outputs[0]
    nodes, is_output = consumers_of(tensor)
    if is_output or len(nodes) != 1:
        return None, "its output goes to a model output or several layers"
    node = nodes[0]
    layer = node.operation
    name = f"{type(layer).__name__} '{layer.name}'"
    if type(layer) not in CONSUMERS:
        return None, f"it feeds {name}, not a Dense or convolution layer"
    if calls[id(layer)] > 1:
        return None, f"the {name} it feeds is shared (called {calls[id(layer)]} times)"
    if getattr(layer, "lora_enabled", False) or layer.quantization_mode:
        return None, f"the {name} it feeds is quantized or has LoRA enabled"
    rank = len(tensor.shape)
    channel = 1 if getattr(layer, "data_format", None) == "channels_first" else -1
    if bn.axis % rank != channel % rank:
        return None, f"it normalises another axis than the input channels of {name}"
    if getattr(layer, "groups", 1) != 1:
        return None, f"the {name} it feeds is a grouped convolution"
    if getattr(layer, "padding", "valid") != "valid" and np.any(shift != 0):
        return None, (
            f"the {name} it feeds pads with zeros (padding='{layer.padding}'), "
            "which the BN's shift would have moved; only valid padding folds"
        )
    if channel == 1 and _misplaced_bias(node.outputs[0]):
        return None, f"{name} is channels_first with as many columns as channels"
    return layer, None


def _misplaced_bias(tensor) -> bool:
    from surgery.verbs.fold import _misplaced_bias

    return _misplaced_bias(tensor)


def folded_weights(layer, scale, shift, weights) -> list[np.ndarray]:
    """`layer`'s kernel and bias (float64) with `x * scale + shift` folded in."""
    kernel = weights[0]
    bias = weights[1] if layer.use_bias else np.zeros(kernel.shape[-1])
    per_input = scale.reshape((-1, 1))  # the input-channel axis is second to last
    windows = kernel.reshape((-1, *kernel.shape[-2:]))  # (positions, in, out)
    new_bias = bias + np.einsum("pio,i->o", windows, shift)
    return [kernel * per_input, new_bias]
