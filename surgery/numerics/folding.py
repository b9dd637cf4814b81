"""The affine algebra of folding a BatchNormalization into a linear layer.

At inference a BN is a per-channel affine map `x * s + t` with
`s = gamma / sqrt(var + eps)` and `t = beta - mean * s` (`affine`). After a
Dense or convolution with kernel `W` and bias `b` it folds backward into
kernel `W * s` and bias `b * s + t` (`fold_backward`); before one it folds
forward into kernel `W * s` (per input channel) and bias `b + W t`
(`fold_forward`). Weights are computed in float64 on the host and cast to
the variables' dtype once (`cast_weights`).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import backend, ops

from surgery.errors import SurgeryError

L = keras.layers
PLAIN = (L.Dense, L.Conv1D, L.Conv2D, L.Conv3D)  # kernel (..., in, out)
TRANSPOSED = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)  # (..., out, in)
DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)  # (..., in, mult)
SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)  # pointwise (..., in * mult, out)
PRODUCERS = PLAIN + TRANSPOSED + DEPTHWISE + SEPARABLE  # a BN folds backward into
CONSUMERS = PLAIN  # a BN folds forward into


def affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """`(s, beta - mean * s)` of `bn` at inference, s as the backend computes it.

    `ops.batch_normalization` of x = 1 with mean = offset = 0 is exactly the
    `rsqrt(var + eps) * gamma` the layer multiplies by, rounded as the layer
    rounds it; it runs on the whole vector, as in the layer (vectorised
    `rsqrt` kernels round their SIMD body and tail differently).
    """
    var = host(bn.moving_variance)
    gamma = host(bn.gamma) if bn.scale else np.ones_like(var)
    beta = host(bn.beta) if bn.center else np.zeros_like(var)
    compute = backend.result_type(bn.compute_dtype, "float32")
    units = var.shape[0]
    zeros = ops.zeros((units,), dtype=compute)
    inv = ops.batch_normalization(
        ops.ones((1, units), dtype=compute),
        zeros,
        ops.convert_to_tensor(var.astype(compute)),
        axis=-1,
        offset=zeros,
        scale=ops.convert_to_tensor(gamma.astype(compute)),
        epsilon=bn.epsilon,
    )
    scale = host(inv).reshape(-1)
    return scale, beta - host(bn.moving_mean) * scale


def fold_backward(layer, weights, scale, shift) -> list[np.ndarray]:
    """`layer`'s weights (float64, with a bias) with `x * scale + shift` after it.

    `weights` are `layer.get_weights()` in float64; the result always ends
    with a bias, so it fits a copy of `layer` with `use_bias=True`.
    """
    k = 1 if type(layer) in SEPARABLE else 0  # the kernel that mixes channels
    kernel = weights[k]
    bias = weights[k + 1] if layer.use_bias else np.zeros_like(scale)
    if type(layer) in TRANSPOSED:
        per_channel = scale[:, None]
    elif type(layer) in DEPTHWISE:
        per_channel = scale.reshape(kernel.shape[-2:])
    else:
        per_channel = scale
    return [*weights[:k], kernel * per_channel, bias * scale + shift]


def fold_forward(layer, weights, scale, shift) -> list[np.ndarray]:
    """`layer`'s kernel and bias (float64) with `x * scale + shift` before it.

    `W (x * s + t) + b = (W * s) x + (b + W t)`; the input-channel axis of a
    Dense or convolution kernel is its second to last.
    """
    kernel = weights[0]
    bias = weights[1] if layer.use_bias else np.zeros(kernel.shape[-1])
    per_input = scale.reshape((-1, 1))
    windows = kernel.reshape((-1, *kernel.shape[-2:]))  # (positions, in, out)
    new_bias = bias + np.einsum("pio,i->o", windows, shift)
    return [kernel * per_input, new_bias]


def misplaced_bias(tensor) -> bool:
    """Would TF's `ops.add(x, bias.reshape(1, C, 1, ...))` add along the last axis?

    Keras' TF `add` turns a bias-shaped add into `tf.nn.bias_add` and picks
    NHWC whenever the last dimension equals the bias length (Keras 3.15), so
    a channels_first layer with as many columns as channels adds a folded
    bias on the wrong axis.
    """
    shape = tensor.shape
    return backend.backend() == "tensorflow" and shape[1] == shape[-1] != 1


def host(x) -> np.ndarray:
    """`x` (a variable, tensor or array) as a float64 NumPy array."""
    if isinstance(x, keras.Variable):
        return np.asarray(x.numpy(), dtype=np.float64)
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def cast_weights(values: list[np.ndarray], layer) -> list[np.ndarray]:
    """Float64 `values` cast once to `layer`'s variable dtype.

    Raises `SurgeryError` when a value does not fit that dtype (inf or NaN).
    """
    dtype = backend.standardize_dtype(layer.variable_dtype)
    cast = [value.astype(dtype) for value in values]
    if not all(np.all(np.isfinite(value)) for value in cast):
        raise SurgeryError(
            f"folding gives non-finite values for '{layer.name}' in {dtype}; "
            "check the BN's moving variance and gamma, or fold a float32 copy "
            "of the model"
        )
    return cast
