"""Keras 1/2 whole-model `.h5` files of the fast.ai era, rebuilt with stock layers.

The classic course model is a Keras 1 `Sequential` VGG16 saved with
`model.save`: a `Lambda(vgg_preprocess)` first layer, Theano (`th`) channel
ordering, `ZeroPadding2D` + `Convolution2D` blocks and Keras 1 config keys
(`nb_filter`, `border_mode`, `output_dim`). Keras 3 cannot load it, and could
not run it on a CPU anyway (TensorFlow's CPU convolutions are channels_last
only). This module reads the config and weights with h5py and builds the
same network from stock Keras 3 layers:

- `Lambda(vgg_preprocess)` (`x - [123.68, 116.779, 103.939]`, then RGB to
  BGR), recognised by the function's name in its stored code, becomes a
  `Normalization(mean, variance=1)` (`(x - mean) / 1`) and a frozen
  permutation `Dense(3)` (one product by 1 and two by 0 per channel): the
  same float32 values bit for bit, and no custom objects or code to trust.
  Any other Lambda is refused; under `unsafe=True` its code is loaded with
  `marshal` (only for files written by the same Python version) and run on
  the legacy `(N, C, H, W)` layout it was written for.
- The model is rebuilt channels_last, so it takes `(H, W, 3)` RGB images in
  0..255 (transpose `(N, 3, H, W)` arrays first); a `Permute` before
  `Flatten` keeps the Dense weights in their `th` order.
- `th` kernels `(out, in, rows, cols)` become `(rows, cols, in, out)`, and
  are rotated by 180° when they were trained with Theano, whose conv2d is a
  true convolution (file attribute `backend`, assumed Theano when absent).
"""

from __future__ import annotations

import base64
import binascii
import json
import marshal
import types

import h5py
import keras
import numpy as np

from surgery.errors import SurgeryError
from surgery.files.h5 import name_list, text

L = keras.layers
VGG_MEAN_RGB = (123.68, 116.779, 103.939)
_SUPPORTED = (
    "Lambda, ZeroPadding2D, Convolution2D/Conv2D, MaxPooling2D, Flatten, Dense, "
    "Dropout, Activation"
)


def is_legacy(attrs, config) -> bool:
    """A Keras 1 Sequential, or a Keras 2 one that starts with `vgg_preprocess`.

    Other Keras 2 files are left to Keras' own legacy loader.
    """
    version = text(attrs.get("keras_version", b""))
    layers = _layer_configs(config)
    if not layers:
        return False
    return version.startswith("1.") or _is_vgg_lambda(layers[0])


def _is_vgg_lambda(layer) -> bool:
    if layer.get("class_name") != "Lambda":
        return False
    function = layer.get("config", {}).get("function")
    code = function[0] if isinstance(function, (list, tuple)) else function
    return b"vgg_preprocess" in _code_bytes(code)


def load(path: str, *, unsafe: bool = False) -> keras.Model:
    """Rebuilds a Keras 1/2 Sequential `.h5` with stock Keras 3 layers."""
    with h5py.File(path, "r") as f:
        config = json.loads(text(f.attrs["model_config"]))
        theano = text(f.attrs.get("backend", b"theano")) == "theano"
        weights = _read_weights(path, f["model_weights"] if "model_weights" in f else f)
    layers = _layer_configs(config)
    builder = _Builder(path, theano, weights, unsafe, _channels_first(layers))
    for layer in layers:
        builder.add(layer["class_name"], layer["config"])
    return builder.finish(config.get("config", {}))


def _layer_configs(config):
    if config.get("class_name") != "Sequential":
        return None
    inner = config.get("config")
    return inner if isinstance(inner, list) else (inner or {}).get("layers")


def _channels_first(layers) -> bool:
    """The data order, from the first layer that states one (Lambda does not)."""
    for layer in layers:
        c = layer.get("config", {})
        order = c.get("dim_ordering", c.get("data_format"))
        if order is not None:
            return order in ("th", "channels_first")
    return False


def _read_weights(path, group) -> dict[str, list[np.ndarray]]:
    found = {}
    for name in name_list(group.attrs, "layer_names"):
        layer = group[name]
        found[name] = [layer[w][()] for w in name_list(layer.attrs, "weight_names")]
    return found


class _Builder:
    """Adds one stock layer (or a few) per legacy layer config."""

    def __init__(self, path, theano, weights, unsafe, channels_first):
        self.path, self.theano, self.unsafe = path, theano, unsafe
        self.weights = weights
        self.inputs = self.x = None
        self.channels_first = channels_first  # of the legacy data at this point
        self.pending: list[tuple[keras.layers.Layer, list[np.ndarray]]] = []

    def add(self, kind, c):
        name = c.get("name")
        if self.x is None:
            self._start(c)
        if kind == "Lambda":
            self._lambda(name, c)
        elif kind in ("Convolution2D", "Conv2D"):
            self._conv(name, c)
        elif kind == "ZeroPadding2D":
            self._call(L.ZeroPadding2D(_pair(c.get("padding", 1)), name=name))
        elif kind == "MaxPooling2D":
            pool = c.get("pool_size", (2, 2))
            padding = c.get("border_mode", c.get("padding", "valid"))
            strides = c.get("strides") or pool
            self._call(L.MaxPooling2D(pool, strides, padding=padding, name=name))
        elif kind == "Flatten":
            if self.channels_first:  # keep the legacy (C, H, W) flatten order
                self._call(L.Permute((3, 1, 2), name=f"{name}_th_order"))
                self.channels_first = False
            self._call(L.Flatten(name=name))
        elif kind == "Dense":
            units = c.get("units", c.get("output_dim"))
            bias = c.get("use_bias", c.get("bias", True))
            dense = L.Dense(units, c.get("activation"), use_bias=bias, name=name)
            self._call(dense, self.weights.get(name, []))
        elif kind == "Dropout":
            self._call(L.Dropout(c.get("rate", c.get("p", 0.5)), name=name))
        elif kind == "Activation":
            self._call(L.Activation(c["activation"], name=name))
        elif kind != "InputLayer":
            raise SurgeryError(
                f"{self.path}: legacy layer {name!r} is a {kind}, which surgery "
                f"cannot rebuild yet (supported: {_SUPPORTED}); load it with "
                "Keras 2 and save it as .keras"
            )

    def _start(self, c):
        shape = c.get("batch_input_shape") or c.get("batch_shape")
        if shape is None:
            raise SurgeryError(f"{self.path}: the first layer has no input shape")
        shape = list(shape[1:])
        self.channels_first &= len(shape) == 3
        if self.channels_first:
            shape = shape[1:] + shape[:1]
        self.inputs = self.x = keras.Input(tuple(shape), name="input")

    def _call(self, layer, weights=()):
        self.x = layer(self.x)
        if weights:
            self.pending.append((layer, list(weights)))

    def _conv(self, name, c):
        filters = c.get("filters", c.get("nb_filter"))
        size = c.get("kernel_size") or (c["nb_row"], c["nb_col"])
        conv = L.Conv2D(
            filters,
            size,
            strides=c.get("strides", c.get("subsample", (1, 1))),
            padding=c.get("padding", c.get("border_mode", "valid")),
            dilation_rate=c.get("dilation_rate", (1, 1)),
            activation=c.get("activation"),
            use_bias=c.get("use_bias", c.get("bias", True)),
            name=name,
        )
        weights = list(self.weights.get(name, []))
        if weights and c.get("dim_ordering") == "th":  # Keras 1 th kernel layout
            weights[0] = th_kernel(weights[0], flip=self.theano)
        self._call(conv, weights)

    def _lambda(self, name, c):
        if _is_vgg_lambda({"class_name": "Lambda", "config": c}):
            self._vgg_preprocess(name)
            return
        function = c.get("function")
        code = function[0] if isinstance(function, (list, tuple)) else function
        if not self.unsafe:
            raise SurgeryError(
                f"{self.path}: Lambda {name!r} is not VGG preprocessing and its "
                "code cannot be rebuilt from stock layers; pass --unsafe "
                "(unsafe=True) to load that code, only if you trust the file"
            )
        function = _load_function(self.path, name, code)
        if not self.channels_first or len(self.x.shape) != 4:
            self._call(L.Lambda(function, name=name))
            return
        # The code expects the legacy (N, C, H, W) layout: give it that.
        self._call(L.Permute((3, 1, 2), name=f"{name}_to_th"))
        self._call(L.Lambda(function, name=name))
        self._call(L.Permute((2, 3, 1), name=f"{name}_from_th"))

    def _vgg_preprocess(self, name):
        """`x - VGG_MEAN_RGB`, then RGB -> BGR, as bit-exact stock layers."""
        mean = L.Normalization(
            axis=-1, mean=VGG_MEAN_RGB, variance=(1.0, 1.0, 1.0), name=f"{name}_mean"
        )
        self._call(mean)
        bgr = L.Dense(3, use_bias=False, trainable=False, name=f"{name}_bgr")
        self._call(bgr, [np.eye(3, dtype=np.float32)[::-1].copy()])

    def finish(self, config):
        name = config.get("name", "legacy") if isinstance(config, dict) else "legacy"
        model = keras.Model(self.inputs, self.x, name=name or "legacy")
        for layer, weights in self.pending:
            try:
                layer.set_weights(weights)
            except ValueError as e:
                got = [w.shape for w in weights]
                want = [tuple(w.shape) for w in layer.weights]
                raise SurgeryError(
                    f"{self.path}: layer {layer.name!r} expects weights {want}, "
                    f"the file has {got}"
                ) from e
        return model


def _pair(value):
    if isinstance(value, int):
        return (value, value)
    value = list(value)
    if len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    return tuple(tuple(v) for v in value)


def th_kernel(kernel: np.ndarray, *, flip: bool) -> np.ndarray:
    """A Theano-ordered `(out, in, rows, cols)` kernel as `(rows, cols, in, out)`.

    Theano's conv2d is a true convolution, so a kernel trained with it is
    rotated by 180° (`flip=True`) to give the same result as the
    cross-correlation every Keras 3 backend computes.
    """
    if flip:
        kernel = kernel[:, :, ::-1, ::-1]
    return np.ascontiguousarray(kernel.transpose(2, 3, 1, 0))


def _code_bytes(code) -> bytes:
    """The marshalled code of a stored function: Keras 2 base64, or Keras 1 raw."""
    if not isinstance(code, str):
        return b""
    try:
        return base64.b64decode(code.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return code.encode("raw_unicode_escape")


def _load_function(path, name, code):
    try:
        compiled = marshal.loads(_code_bytes(code))
    except (ValueError, EOFError, TypeError) as e:
        raise SurgeryError(
            f"{path}: the code of Lambda {name!r} was written by another Python "
            f"version and cannot be loaded ({e}); rebuild that layer in Python"
        ) from None
    return types.FunctionType(compiled, {"np": np, "keras": keras})
