"""Legacy weights-only `.h5` files (the classic `vgg16_weights_tf_dim_ordering_tf_kernels.h5`).

They hold weights without an architecture, so the model comes from a family
(`surgery.files.models.FAMILIES`). The file is read with h5py rather than
through Keras' legacy loader, whose matching has shifted between versions:
by layer NAME by default, every shape checked; or by position
(`--by-order`) for Keras 1 files whose names are not the family's
(`convolution2d_1`, `dense_1`), Theano-ordered kernels converted.
"""

from __future__ import annotations

import keras
import numpy as np

from surgery.errors import SurgeryError
from surgery.files.h5 import legacy_weight_datasets, open_h5, text, weighted_layers
from surgery.files.legacy import th_kernel

L = keras.layers


def load_by_name(path: str, family_name: str, family) -> keras.Model:
    """Builds `family` and loads a legacy weights file into it, layer by name.

    The file holds the top (`fc1`, ...) or not; the model is built to match.
    Every layer and every shape is checked before a weight is set.
    """
    with open_h5(path) as f:
        saved = legacy_weight_datasets(path, f)
        include_top = any(name in saved for name in family.top_layers)
        model = family.constructor(weights=None, include_top=include_top)
        where = f"{path} ({family_name}, include_top={include_top})"
        _check_legacy_weights(model, saved, where)
        for layer in weighted_layers(model):
            layer.set_weights([dataset[()] for dataset in saved[layer.name]])
    return model


def _check_legacy_weights(model, saved, where):
    """Raises unless `saved` fits the model's weighted layers exactly."""
    layers = weighted_layers(model)
    names = {layer.name for layer in layers}
    extra = [name for name in saved if name not in names]
    if extra:
        raise SurgeryError(
            f"{where} has weights for layer(s) the model lacks: "
            f"{', '.join(extra[:3])}{'...' if len(extra) > 3 else ''}; is it the "
            "right family? If only the names differ, pass --by-order"
        )
    for layer in layers:
        if layer.name not in saved:
            raise SurgeryError(f"{where} has no weights for layer {layer.name!r}")
        _check_layer_weights(layer, saved[layer.name], where)


def _check_layer_weights(layer, datasets, where):
    if len(datasets) != len(layer.weights):
        raise SurgeryError(
            f"{where}: layer {layer.name!r} expects {len(layer.weights)} "
            f"weight arrays, found {len(datasets)}"
        )
    for variable, dataset in zip(layer.weights, datasets, strict=True):
        if tuple(variable.shape) != dataset.shape:
            raise SurgeryError(
                f"{where}: layer {layer.name!r} weight {variable.name!r} "
                f"expected shape {tuple(variable.shape)}, found {dataset.shape}"
            )


def load_by_order(path: str, family_name: str, family) -> keras.Model:
    """Builds `family` and loads a legacy weights file's layers in order.

    For files whose layer names are not the family's (Keras 1's
    `convolution2d_1`, `dense_1`): the i-th weighted layer of the file goes
    to the i-th weighted layer of the model, with or without the top as the
    count says. Theano-ordered conv kernels `(out, in, rows, cols)` are
    recognised by shape and converted; the first Dense after them gets its
    rows reordered from the `(C, H, W)` flatten order to `(H, W, C)`.
    """
    with open_h5(path) as f:
        theano = text(f.attrs.get("backend", b"theano")) == "theano"
        saved = [[d[()] for d in ds] for ds in legacy_weight_datasets(path, f).values()]
    counts = []
    for include_top in (False, True):
        model = family.constructor(weights=None, include_top=include_top)
        layers = weighted_layers(model)
        if len(layers) == len(saved):
            break
        counts.append(str(len(layers)))
    else:
        raise SurgeryError(
            f"{path} has {len(saved)} layers with weights, {family_name} has "
            f"{' or '.join(counts)}; is it the right family?"
        )
    th = False
    for layer, weights in zip(layers, saved, strict=True):
        expected = [tuple(v.shape) for v in layer.weights]
        if isinstance(layer, L.Conv2D) and _is_th(weights[0].shape, expected[0]):
            weights[0], th = th_kernel(weights[0], flip=theano), True
        elif isinstance(layer, L.Dense) and th:
            flattened = _flattened_shape(layer)
            if flattened is not None:
                weights[0] = th_dense_rows(weights[0], flattened)
            th = False
        got = [w.shape for w in weights]
        if got != expected:
            raise SurgeryError(
                f"{path}: by order, layer {layer.name!r} expects weights "
                f"{expected}, the file's layer {len(got)} has {got}"
            )
        layer.set_weights(weights)
    return model


def _is_th(shape, expected) -> bool:
    """A th `(out, in, rows, cols)` kernel where `(rows, cols, in, out)` is due."""
    if len(shape) != 4 or tuple(shape) == tuple(expected):
        return False
    return (shape[2], shape[3], shape[1], shape[0]) == tuple(expected)


def _flattened_shape(dense):
    """`(H, W, C)` of the feature map a Flatten turned into `dense`'s input."""
    producer = dense.input._keras_history.operation
    if not isinstance(producer, L.Flatten) or len(producer.input.shape) != 4:
        return None
    return tuple(producer.input.shape[1:])


def th_dense_rows(kernel: np.ndarray, feature_shape) -> np.ndarray:
    """Rows of a Dense kernel fed by a th Flatten `(C, H, W)`, reordered for
    a channels_last Flatten of the `(H, W, C)` feature map."""
    height, width, channels = feature_shape
    rows = kernel.reshape((channels, height, width, -1)).transpose(1, 2, 0, 3)
    return np.ascontiguousarray(rows.reshape((height * width * channels, -1)))
