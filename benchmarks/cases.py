"""Cases 1, 3, 4 and 5: statistics overhead, taps per pass, rebuild, accuracy."""

from __future__ import annotations

import time

import keras
import numpy as np

import surgery
from benchmarks.common import (
    conv_dense_taps,
    dense_head,
    features,
    free_memory,
    images,
    interleaved,
    ratio_row,
)
from surgery.graph import tap_models
from surgery.graph.spots import find_spots
from surgery.graph.taps import tap_tensors

BATCH = 32  # activation_stats' default, used for both sides of every ratio


def bare_tap_model(model, layers: list[str]) -> keras.Model:
    """The model that outputs the tapped activations and does nothing else."""
    inputs, taps = tap_tensors(model, find_spots(model, after=layers))
    return keras.Model(inputs, [tensor for _, tensor in taps])


def bare_loop(tap_model, x):
    """The least work that produces every tapped activation of every batch."""

    def run():
        for i in range(0, len(x), BATCH):
            tap_model.predict_on_batch(x[i : i + BATCH])

    return run


def stats_pass(model, layers, x):
    return lambda: surgery.activation_stats(
        model, layers, x, batch_size=BATCH, verbose=0
    )


# -- case 1 -------------------------------------------------------------------


def overhead(n: dict, repeats: int, log=print) -> list[dict]:
    """activation_stats vs a bare compiled forward loop of the same tap model."""
    rows = []
    for name, build, layers, x, note in _overhead_models(n):
        model = build()
        layers = layers(model)
        tap_model = bare_tap_model(model, layers)
        times = interleaved(
            {
                "activation_stats": stats_pass(model, layers, x),
                "bare forward": bare_loop(tap_model, x),
            },
            repeats,
        )
        rows.append(
            ratio_row(
                "overhead",
                name,
                times,
                "activation_stats",
                "bare forward",
                1.10,
                samples=len(x),
                taps=len(layers),
                note=note,
            )
        )
        log(f"  {name}: {rows[-1]['ratio']:.3f}x")
        del model, tap_model
        free_memory()
    return rows


def _overhead_models(n):
    yield (
        "VGG16 dense head, 25088-d features",
        dense_head,
        lambda m: ["fc1", "fc2"],
        features(n["head"]),
        "taps fc1, fc2",
    )
    yield (
        "VGG16 conv trunk, 32x32",
        lambda: keras.applications.VGG16(
            weights=None, include_top=False, input_shape=(32, 32, 3)
        ),
        conv_dense_taps,
        images(n["vgg"], 32),
        "13 Conv2D taps",
    )
    yield (
        "ResNet50, 32x32",
        lambda: keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3)),
        lambda m: [
            layer.name for layer in m.layers if isinstance(layer, keras.layers.Conv2D)
        ],
        images(n["resnet"], 32),
        "every Conv2D (53 taps)",
    )


# -- case 3 -------------------------------------------------------------------


def many_taps(samples: int, repeats: int, log=print) -> list[dict]:
    """VGG16 trunk: 13 taps in one pass vs 1 tap, and vs 13 separate passes."""
    model = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    layers = conv_dense_taps(model)
    x = images(samples, 32)

    def separate():
        for layer in layers:
            surgery.activation_stats(model, [layer], x, batch_size=BATCH, verbose=0)

    # Every pass is timed warm: room in the tap-model cache for all 15 spot
    # sets, or the separate passes would evict the others' compiled models.
    cached = tap_models.PER_MODEL
    tap_models.PER_MODEL = len(layers) + 2
    try:
        times = interleaved(
            {
                "13 taps, one pass": stats_pass(model, layers, x),
                f"1 tap ({layers[-1]})": stats_pass(model, [layers[-1]], x),
                "13 separate passes": separate,
            },
            repeats,
        )
    finally:
        tap_models.PER_MODEL = cached
    one, single = "13 taps, one pass", f"1 tap ({layers[-1]})"
    rows = [
        ratio_row("taps", "VGG16 trunk 32x32: 13 taps vs 1", times, one, single, 1.15),
        ratio_row(
            "taps",
            "VGG16 trunk 32x32: 13 separate passes vs one pass",
            times,
            "13 separate passes",
            one,
            None,
        ),
    ]
    for row in rows:
        row["samples"] = samples
        log(f"  {row['name']}: {row['ratio']:.3f}x")
    free_memory()
    return rows


# -- case 4 -------------------------------------------------------------------


REBUILD_MODELS = {
    "ResNet50": keras.applications.ResNet50,
    "EfficientNetB0": keras.applications.EfficientNetB0,
    "MobileNetV2": keras.applications.MobileNetV2,
}


def rebuild(repeats: int, log=print) -> list[dict]:
    """insert_identity_bn(stats=...) vs keras.models.clone_model."""
    rows = []
    for name, build in REBUILD_MODELS.items():
        model = build(weights=None, input_shape=(32, 32, 3))
        layers = conv_dense_taps(model)
        stats = surgery.activation_stats(model, layers, images(8, 32), verbose=0)

        def copy_with_weights(model=model):
            clone = keras.models.clone_model(model)
            clone.set_weights(model.get_weights())

        def clone_and_bn_layers(model=model, layers=layers):
            # What Keras itself charges for the result: the clone, plus
            # creating, building and calling one BN layer on each tap.
            clone = keras.models.clone_model(model)
            for layer in layers:
                keras.layers.BatchNormalization()(clone.get_layer(layer).output)

        times = interleaved(
            {
                "insert_identity_bn": lambda m=model, t=layers, s=stats: (
                    surgery.insert_identity_bn(m, after=t, stats=s)
                ),
                "clone_model": lambda m=model: keras.models.clone_model(m),
                "clone_model + set_weights": copy_with_weights,
                "clone_model + BN layers alone": clone_and_bn_layers,
            },
            repeats,
        )
        for b, target in (
            ("clone_model", 1.5),
            ("clone_model + set_weights", None),
            ("clone_model + BN layers alone", 1.05),
        ):
            rows.append(
                ratio_row(
                    "rebuild",
                    f"{name} 32x32, {len(layers)} BN vs {b}",
                    times,
                    "insert_identity_bn",
                    b,
                    target,
                    taps=len(layers),
                )
            )
            log(f"  {rows[-1]['name']}: {rows[-1]['ratio']:.3f}x")
        del model, stats
        free_memory()
    return rows


# -- case 5 -------------------------------------------------------------------


def accuracy(rows_n: int, cols: int = 8, batch_size: int = 4096, log=print) -> dict:
    """Relative error of mean and variance vs numpy float64 two-pass."""
    rng = np.random.default_rng(5)
    x = (1e4 + 1e-2 * rng.standard_normal((rows_n, cols))).astype(np.float32)
    x64 = x.astype(np.float64)
    ref_mean = x64.mean(axis=0)
    ref_var = ((x64 - ref_mean) ** 2).mean(axis=0)
    del x64

    model = keras.Sequential(
        [keras.Input((cols,)), keras.layers.Identity(name="x")], name="identity"
    )
    start = time.perf_counter()
    ours = surgery.activation_stats(model, ["x"], x, batch_size=batch_size, verbose=0)
    ours_s = time.perf_counter() - start
    m32 = x.mean(axis=0)
    estimates = {
        f"surgery.activation_stats (batches of {batch_size})": (
            ours["x"].mean,
            ours["x"].var,
        ),
        "numpy float32 x.mean(0), x.var(0)": (m32, x.var(axis=0)),
        "float32 E[x^2] - E[x]^2": (m32, (x * x).mean(axis=0) - m32 * m32),
        "float64 E[x^2] - E[x]^2": (
            ref_mean,
            (x.astype(np.float64) ** 2).mean(axis=0) - ref_mean**2,
        ),
    }
    rows = []
    for method, (mean, var) in estimates.items():
        rows.append(
            {
                "method": method,
                "mean_rel_err": _rel(mean, ref_mean),
                "var_rel_err": _rel(var, ref_var),
                "var_example": float(np.asarray(var, dtype=np.float64)[0]),
            }
        )
        log(f"  {method}: var rel err {rows[-1]['var_rel_err']:.3g}")
    return {
        "rows": rows,
        "n": rows_n,
        "cols": cols,
        "reference_var_example": float(ref_var[0]),
        "reference_mean_example": float(ref_mean[0]),
        "target": 1e-9,
        "met": rows[0]["mean_rel_err"] <= 1e-9 and rows[0]["var_rel_err"] <= 1e-9,
        "ours_seconds": ours_s,
    }


def _rel(est, ref) -> float:
    est = np.asarray(est, dtype=np.float64)
    return float(np.max(np.abs(est - ref) / np.abs(ref)))
