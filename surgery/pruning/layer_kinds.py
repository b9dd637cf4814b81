"""Kinds of layers, as channel pruning sees them: what each does to channels.

`surgery.pruning.flow` asks these which rule a layer follows: it makes
channels, passes them through one by one, mixes them, moves them in space,
merges them element by element, or is a `keras.ops` call acting element by
element.
"""

from __future__ import annotations

import keras
import numpy as np

from surgery.graph.sites import INFERENCE_IDENTITY

L = keras.layers

# no weights, shape kept, each channel computed from itself alone
ELEMENTWISE = (L.ReLU, L.LeakyReLU, L.ELU, *INFERENCE_IDENTITY)
MIXING = (L.Softmax, L.UnitNormalization)  # each output depends on every channel
MIXING_ACTIVATIONS = {"softmax", "log_softmax"}
SPATIAL = (
    L.MaxPooling1D,
    L.MaxPooling2D,
    L.MaxPooling3D,
    L.AveragePooling1D,
    L.AveragePooling2D,
    L.AveragePooling3D,
    L.ZeroPadding1D,
    L.ZeroPadding2D,
    L.ZeroPadding3D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.UpSampling3D,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
)
GLOBAL = (
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D,
    L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D,
    L.GlobalMaxPooling3D,
)
MERGE = (L.Add, L.Subtract, L.Multiply, L.Maximum, L.Minimum, L.Average)
CONV = (L.Conv1D, L.Conv2D, L.Conv3D)
TRANSPOSE = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
NORMS = (L.BatchNormalization, L.LayerNormalization)
# `keras.ops` calls that act element by element (with scalars, or merging
# tensors as `Add` does)
ELEMENTWISE_OPS = {
    "Add",
    "Subtract",
    "Multiply",
    "Divide",
    "TrueDivide",
    "Maximum",
    "Minimum",
    "Negative",
    "Abs",
    "Square",
    "Sqrt",
    "Exp",
    "Log",
    "Power",
    "Clip",
    "Cast",
    "Relu",
    "Relu6",
    "Sigmoid",
    "HardSigmoid",
    "HardSilu",
    "Silu",
    "Tanh",
    "Gelu",
    "Elu",
    "Selu",
    "Softplus",
    "Softsign",
    "LeakyRelu",
    "Mish",
}


def channel_axis(layer, rank: int) -> int:
    first = getattr(layer, "data_format", "channels_last") == "channels_first"
    return 1 if first else rank - 1


def norm_axis(layer, rank: int) -> int | None:
    axis = layer.axis
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            return None
        axis = axis[0]
    return axis % rank


def is_layer_scale(layer) -> bool:
    """ConvNeXt's `LayerScale`: its output is `x * gamma`, per channel."""
    weights = layer.weights
    return (
        type(layer).__name__ == "LayerScale"
        and "projection_dim" in layer.get_config()
        and len(weights) == 1
        and len(weights[0].shape) == 1
    )


def is_scaled_sum(layer) -> bool:
    """InceptionResNetV2's `CustomScaleLayer`: `x + residual * scale`."""
    return type(layer).__name__ == "CustomScaleLayer" and isinstance(
        getattr(layer, "scale", None), (int, float)
    )


def is_elementwise(layer) -> bool:
    if isinstance(layer, ELEMENTWISE + MIXING):
        return True
    if isinstance(layer, L.Activation):
        return True
    if isinstance(layer, L.Rescaling):
        return np.ndim(layer.scale) == 0 and np.ndim(layer.offset) == 0
    return False


def mixes(layer) -> bool:
    if isinstance(layer, MIXING):
        return True
    if isinstance(layer, L.Activation):
        name = getattr(layer.activation, "__name__", "")
        return name in MIXING_ACTIVATIONS
    return False
