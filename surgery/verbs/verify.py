"""`verify`: stream two models over the same data and compare outputs."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import backend, tree

from surgery.data.batches import Batches, batch_length, check_inputs, progress
from surgery.errors import SurgeryError
from surgery.numerics.compare import Comparison, Report, compare_outputs
from surgery.runtime.progress import quiet_retracing
from surgery.validate import check_not_empty

MODES = ("eager", "graph", "xla")


def verify(
    model_a: keras.Model,
    model_b: keras.Model,
    data: Any,
    *,
    batch_size: int | None = None,
    steps: int | None = None,
    max_samples: int | None = None,
    verbose: int | str = "auto",
    mode: str = "auto",
) -> Report:
    """Compare the inference outputs of two models, batch by batch.

    Both models run on the same batches of `data` in the same mode, and every
    output element is compared: `identical` means bit-identical
    (`np.array_equal`, NaN equal to NaN), and the distances say by how much
    they are not. Only the current batch is in memory. The report also gives
    the first model's own batch-size noise, so a difference can be judged
    against what the platform does to the unchanged model.

    Args:
        model_a: The reference `keras.Model`, usually the original.
        model_b: The `keras.Model` to compare with it, e.g. the result of
            `insert_identity_bn`; same inputs, and outputs of the same number
            and shapes (dtypes may differ: both are compared in the wider).
        data: The model inputs: anything `model.predict` accepts as `x`
            (NumPy arrays, a list or dict of them for several inputs, a
            `tf.data.Dataset`, a `keras.utils.PyDataset`, a generator), or a
            path or on-disk array that `surgery.sources.open_source` opens
            (image folder, `.npy`, `.npz`, `.h5`, zarr, bcolz). Labels in
            `(x, y)` or `(x, y, sample_weight)` batches are ignored. It is
            read one batch at a time, never whole.
        batch_size: Samples per batch for arrays, paths and on-disk arrays.
            Defaults to `None`: 32, as in `model.predict`. Datasets,
            generators and `PyDataset`s keep their own batches.
        steps: Stop after this many batches. Defaults to `None`: every batch
            the data gives.
        max_samples: Stop after this many samples, cutting the last batch
            short; at least 1. Defaults to `None`: every sample the data
            gives.
        verbose: `"auto"` (the default) or 1: a Keras progress bar; 2: one
            line when the pass ends; 0: silent.
        mode: How both models run: `"eager"` (`model(x)`), `"graph"`
            (compiled, as `predict` runs without XLA), `"xla"`
            (`jit_compile=True`), or `"auto"` (the default), the mode
            `model_a.predict` uses on this machine: eager on torch, XLA on JAX
            or for a model compiled with `jit_compile=True`, else graph.
            Compilers may round differently from eager execution, so a model
            can be exact in one mode and not in another.

    Returns:
        A `Report`: whether the outputs were identical, the largest absolute
        and ulp differences, NaN/inf mismatches, the samples compared, the
        mode, the first model's batch-size noise and the CPU kind.

    Raises:
        SurgeryError: `mode` is not one of the values above; the two models'
            outputs differ in number or shape; the data is missing,
            unreadable, empty or does not fit `model_a`'s inputs; or
            `max_samples` is below 1.

    Example:

    ```python
    import keras
    import numpy as np
    import surgery

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="fc")])
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    new = surgery.insert_identity_bn(model, after="fc", data=x, verbose=0)
    report = surgery.verify(model, new, x, verbose=0)
    print(report.identical, report.max_ulp_diff, report.samples)  # True 0 64
    ```
    """
    return compare(
        model_a,
        model_b,
        data,
        batch_size=batch_size,
        steps=steps,
        max_samples=max_samples,
        verbose=verbose,
        mode=mode,
    )[0]


def compare(
    model_a, model_b, data, *, labels: bool = False, mode: str = "auto", **stream
) -> tuple[Report, tuple[float, float] | None]:
    """`verify`'s report, and with `labels` both models' top-1 accuracy.

    The accuracies are None unless every batch has labels (class indices,
    or one-hot rows) for a model with one output of class scores.
    """
    verbose = stream.pop("verbose", "auto")
    mode = resolve_mode(model_a, mode)
    run_a, run_b = runner(model_a, mode), runner(model_b, mode)
    batches = Batches(data, model=model_a, labels=labels, **stream)
    comparison, noise = Comparison(), 0
    correct, scored = [0, 0], True
    for step, item in enumerate(progress(batches, verbose, "verify")):
        x, y = item if labels else (item, None)
        if step == 0:
            check_inputs(model_a, x)
        a = flat_outputs(run_a(x))
        if step == 0:
            noise = batch_size_noise(run_a, x, a)
        b = flat_outputs(run_b(x))
        comparison.add(a, b, batch_length(x))
        if labels and scored:
            hits = [_top1_hits(out, y) for out in (a, b)]
            scored = None not in hits
            if scored:
                correct = [c + h for c, h in zip(correct, hits, strict=True)]
    check_not_empty(comparison.samples)
    report = comparison.report(mode, noise)
    n = comparison.samples
    accuracy = (correct[0] / n, correct[1] / n) if labels and scored else None
    return report, accuracy


def _top1_hits(outputs: list, y) -> int | None:
    """How many rows' largest score is the label, or None if not a classifier."""
    if y is None or len(outputs) != 1 or outputs[0].ndim != 2:
        return None
    scores, y = outputs[0], np.asarray(y)
    if scores.shape[1] < 2:
        return None
    if y.shape == scores.shape:
        y = y.argmax(axis=1)
    elif y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.number):
        return None
    return int((scores.argmax(axis=1) == y).sum())


def batch_difference(model, new, x, mode: str) -> tuple[bool, float, int, int]:
    """How far `new` is from `model` on one batch `x` in `mode`.

    Returns whether they are bit-identical, the max abs and ulp difference,
    and (only when they differ, else 0) the original's own batch-size noise.
    """
    run = runner(model, mode)
    reference = flat_outputs(run(x))
    same, diff, ulp, _ = compare_outputs(reference, flat_outputs(runner(new, mode)(x)))
    noise = 0 if same else batch_size_noise(run, x, reference)
    return same, diff, ulp, noise


def resolve_mode(model, mode: str) -> str:
    """`mode`, with `"auto"` made the mode `model.predict` runs in."""
    if mode == "auto":
        if backend.backend() == "torch":
            return "eager"
        return "xla" if backend.backend() == "jax" or model.jit_compile else "graph"
    if mode not in MODES:
        raise SurgeryError(
            f"unknown mode {mode!r}; use one of: auto, {', '.join(MODES)}"
        )
    return mode


def runner(model, mode: str):
    """A function from a batch to `model`'s inference outputs in `mode`.

    On TensorFlow, graph and XLA modes trace `model` in a `tf.function` of
    their own, compiled as `predict` compiles it, without changing the
    model's `jit_compile` setting. Other backends run `predict_on_batch`
    (JAX always compiles with XLA), or the model eagerly.
    """
    if mode == "eager":
        return lambda x: model(x, training=False)
    if backend.backend() != "tensorflow":
        return model.predict_on_batch
    import tensorflow as tf

    compiled = tf.function(
        lambda x: model(x, training=False),
        jit_compile=mode == "xla",
        autograph=False,
        reduce_retracing=True,
    )

    def run(x):
        # Each runner is a new tf.function of this same lambda, traced once
        # per model, which TensorFlow's heuristic reports as retracing.
        with quiet_retracing():
            return compiled(x)

    return run


def batch_size_noise(run, x, outputs: list) -> int:
    """Max ulp between `outputs` (of `x` whole) and `x` run in two halves."""
    n = batch_length(x)
    if n < 2:
        return 0
    halves = [
        flat_outputs(run(_rows(x, s))) for s in (slice(0, n // 2), slice(n // 2, n))
    ]
    joined = [np.concatenate(parts) for parts in zip(*halves, strict=True)]
    return compare_outputs(outputs, joined)[2]


def _rows(x, rows: slice):
    return tree.map_structure(lambda t: t[rows], x)


def flat_outputs(result) -> list:
    """A model's outputs as a flat list of NumPy arrays."""
    return [_to_numpy(t) for t in tree.flatten(result)]


def _to_numpy(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    if backend.backend() == "tensorflow":
        return np.asarray(t.numpy())  # Keras' np.array(t) warns on bfloat16
    return np.asarray(keras.ops.convert_to_numpy(t))
