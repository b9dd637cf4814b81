"""A writer of Keras 1 VGG16 files, for tests and demos.

The fast.ai course's files (a Keras 1.2 `model.save` of a th-ordered VGG16
with a `Lambda(vgg_preprocess)` first layer, or its `save_weights`) cannot be
downloaded here, so tests write their layout with random weights and check
`surgery.files.legacy` against the same weights loaded the modern way.
"""

from __future__ import annotations

import json
import marshal

import h5py
import numpy as np

from surgery.files.atomic import atomic_path
from surgery.files.legacy import VGG_MEAN_RGB
from surgery.testing.legacy_vgg16 import VGG16_BLOCKS


def vgg_preprocess(x):
    """fast.ai's VGG preprocessing on (N, 3, H, W) RGB arrays (for the writer)."""
    x = x - np.array(VGG_MEAN_RGB, dtype=np.float32).reshape((3, 1, 1))
    return x[:, ::-1]


def write_keras1_vgg16(
    path: str,
    *,
    size: int = 32,
    seed: int = 0,
    fc_units: int = 4096,
    classes: int = 1000,
    backend: str | None = None,
    weights_only: bool = False,
    include_top: bool = True,
) -> None:
    """Writes a random VGG16 as Keras 1.2 `model.save` did for the fast.ai course.

    Layout: root attributes `keras_version` "1.2.2", `model_config` (a
    Sequential list of Keras 1 layer configs, `dim_ordering` "th", a
    `Lambda(vgg_preprocess)` first layer with marshalled code) and, when
    `backend` is given, `backend`; group `model_weights` with `layer_names`
    and per layer `weight_names` `convolution2d_1_W`, `convolution2d_1_b`;
    th kernels `(out, in, rows, cols)`. `weights_only=True` writes what
    `model.save_weights` did instead: the layer groups at the root, no
    config (the fast.ai `vgg16.h5` layout); `include_top=False` stops after
    the last pooling layer.
    """
    rng = np.random.default_rng(seed)
    layers, weights = [], {}
    counts: dict[str, int] = {}

    def add(kind, config, shapes=()):
        counts[kind] = counts.get(kind, 0) + 1
        name = f"{kind.lower()}_{counts[kind]}"
        layers.append({"class_name": kind, "config": {"name": name, **config}})
        weights[name] = [_random(rng, shape) for shape in shapes]

    code = marshal.dumps(vgg_preprocess.__code__).decode("raw_unicode_escape")
    add(
        "Lambda",
        {
            "batch_input_shape": [None, 3, size, size],
            "function": [code, None, None],
            "function_type": "function",
            "output_shape": [3, size, size],
            "arguments": {},
        },
    )
    channels = 3
    for filters, convs in VGG16_BLOCKS:
        for _ in range(convs):
            add("ZeroPadding2D", {"padding": [1, 1], "dim_ordering": "th"})
            conv = {
                "nb_filter": filters,
                "nb_row": 3,
                "nb_col": 3,
                "activation": "relu",
                "border_mode": "valid",
                "subsample": [1, 1],
                "dim_ordering": "th",
                "bias": True,
            }
            add("Convolution2D", conv, [(filters, channels, 3, 3), (filters,)])
            channels = filters
        pool = {"pool_size": [2, 2], "strides": [2, 2], "dim_ordering": "th"}
        add("MaxPooling2D", {**pool, "border_mode": "valid"})
    if include_top:
        _add_top(add, channels * (size // 32) ** 2, fc_units, classes)
    config = {"class_name": "Sequential", "config": layers}
    with atomic_path(path, suffix=".h5.tmp", prefix=".keras1-") as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["keras_version"] = b"1.2.2"
            if backend is not None:
                f.attrs["backend"] = backend.encode("utf-8")
            if not weights_only:
                f.attrs["model_config"] = json.dumps(config).encode("utf-8")
            group = f if weights_only else f.create_group("model_weights")
            _write_weights(group, layers, weights)


def _add_top(add, units, fc_units, classes):
    add("Flatten", {})
    for out, activation in (
        (fc_units, "relu"),
        (fc_units, "relu"),
        (classes, "softmax"),
    ):
        add("Dense", {"output_dim": out, "activation": activation, "bias": True},
            [(units, out), (out,)])  # fmt: skip
        if activation == "relu":
            add("Dropout", {"p": 0.5})
        units = out


def _write_weights(group, layers, weights):
    group.attrs["layer_names"] = np.array(
        [layer["config"]["name"].encode() for layer in layers], dtype="S"
    )
    for name, values in weights.items():
        layer = group.create_group(name)
        names = [f"{name}_{kind}" for kind in "Wb"[: len(values)]]
        layer.attrs["weight_names"] = np.array([n.encode() for n in names], dtype="S")
        for weight_name, value in zip(names, values, strict=True):
            layer.create_dataset(weight_name, data=value)


def _random(rng, shape):
    if len(shape) == 1:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
    if len(shape) == 4:  # (out, in, rows, cols)
        fan_in, fan_out = shape[1] * shape[2] * shape[3], shape[0] * shape[2] * shape[3]
    else:
        fan_in, fan_out = shape
    scale = np.float32(np.sqrt(2.0 / (fan_in + fan_out)))
    return rng.standard_normal(shape, dtype=np.float32) * scale
