"""Net2DeeperNet: an identity-initialised copy of a Dense or convolution.

`identity_copy(layer, name)` makes a new layer of `layer`'s kind that maps
`layer`'s output to itself: a Dense with the identity matrix as kernel, a
convolution with `same` padding, stride 1 and a centred one-hot kernel, a
depthwise convolution with a centred one per channel, all with zero biases
(Chen, Goodfellow and Shlens, "Net2Net", ICLR 2016). Every output is then a
sum of its input times 1 and of exact zeros, so it is bit-identical wherever
the backend adds those zeros in float arithmetic (it does on CPUs; a GPU's
TF32 matmul rounds the input to 10 bits and is not exact).

The copy keeps `layer`'s activation when that activation is idempotent on
its own output (`relu(relu(x)) == relu(x)`), and is linear otherwise, with
a note that says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from surgery.errors import SurgeryError

L = keras.layers

# f(f(x)) == f(x) bit for bit, for every float x
IDEMPOTENT = ("linear", "relu", "relu6", "hard_tanh", "hard_shrink")

_CONVS = (L.Conv1D, L.Conv2D, L.Conv3D)
_TRANSPOSED = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
KINDS = (L.Dense, *_CONVS, *_TRANSPOSED, *_DEPTHWISE, *_SEPARABLE)


@dataclass(frozen=True)
class IdentityCopy:
    """The new layer, its identity weights (in `get_weights()` order), a note."""

    layer: keras.layers.Layer
    weights: list[np.ndarray]
    note: str | None


def identity_copy(layer: keras.layers.Layer, name: str, path: str) -> IdentityCopy:
    """An identity-initialised layer of `layer`'s kind, to call on its output.

    `path` is how the user named `layer`, for messages. Raises
    `SurgeryError` for a layer of another kind (a subclass included: its
    `call` may compute something else) or a quantized one.
    """
    if type(layer) not in KINDS:
        kinds = ", ".join(k.__name__ for k in KINDS)
        raise SurgeryError(
            f"cannot deepen '{path}': it is a {type(layer).__name__}; deepen "
            f"works after {kinds}"
        )
    if layer.dtype_policy.quantization_mode is not None:
        raise SurgeryError(
            f"cannot deepen '{path}': it is quantized "
            f"({layer.dtype_policy.name}); deepen the float model, then quantize"
        )
    activation, note = _activation(layer, name, path)
    config = {**layer.get_config(), "name": name, "activation": activation}
    config["use_bias"] = True
    config.pop("lora_rank", None)
    config.pop("lora_alpha", None)
    if isinstance(layer, L.Dense):
        new = L.Dense.from_config(config)
        return IdentityCopy(new, [_eye(layer.units), _zeros(layer.units)], note)
    kernel_size = tuple(_odd(k) for k in layer.kernel_size)
    config.update(kernel_size=kernel_size, strides=1, padding="same", dilation_rate=1)
    if isinstance(layer, _DEPTHWISE):
        config["depth_multiplier"] = 1
        channels = layer.kernel.shape[-2] * layer.depth_multiplier
        weights = [_one_hot(kernel_size, np.ones((channels, 1)))]
    elif isinstance(layer, _SEPARABLE):
        config["depth_multiplier"] = 1
        channels = layer.filters
        ones = (1,) * len(kernel_size)
        weights = [
            _one_hot(kernel_size, np.ones((channels, 1))),
            _one_hot(ones, _eye(channels)),
        ]
    else:
        if isinstance(layer, _TRANSPOSED):
            config["output_padding"] = None
        else:
            config["groups"] = 1
        channels = layer.filters
        weights = [_one_hot(kernel_size, _eye(channels))]
    new = type(layer).from_config(config)
    return IdentityCopy(new, [*weights, _zeros(channels)], note)


def _activation(layer, name, path) -> tuple[str, str | None]:
    """`layer`'s activation if idempotent, else "linear" and a note saying so."""
    given = keras.activations.serialize(layer.activation)
    if given in IDEMPOTENT:
        return given, None
    shown = given if isinstance(given, str) else layer.activation.__name__
    return "linear", (
        f"{name}: '{path}' uses activation '{shown}', which is not idempotent "
        f"({shown}({shown}(x)) != {shown}(x)), so the new layer is linear; "
        f"{', '.join(IDEMPOTENT)} are kept"
    )


def _odd(size: int) -> int:
    """A kernel size with a centre: `size` if odd, else one less."""
    return size if size % 2 else max(1, size - 1)


def _eye(n: int) -> np.ndarray:
    return np.eye(n, dtype="float32")


def _zeros(n: int) -> np.ndarray:
    return np.zeros(n, dtype="float32")


def _one_hot(kernel_size: tuple, centre: np.ndarray) -> np.ndarray:
    """A kernel of zeros but `centre` (channels in, out) at its centre tap."""
    kernel = np.zeros((*kernel_size, *centre.shape), dtype="float32")
    kernel[tuple((k - 1) // 2 for k in kernel_size)] = centre
    return kernel
