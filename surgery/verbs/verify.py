"""`verify`: stream two models over the same data and compare outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import numpy as np
from keras import backend, tree

from surgery.data.batches import Batches, batch_length, check_inputs, progress
from surgery.errors import SurgeryError
from surgery.runtime.machine import cpu_kind
from surgery.runtime.progress import quiet_retracing

MODES = ("eager", "graph", "xla")


@dataclass(frozen=True)
class Report:
    """How far apart two models' outputs were over the data.

    `verify` returns it, and so does `convert` (as `Conversion.report`).
    `str(report)` gives it in one line; `as_dict()` as a dict for JSON.

    Attributes:
        identical: Whether every output element was bit-identical (NaN equal
            to NaN).
        max_abs_diff: The largest absolute difference between matching
            elements finite on both sides; `inf` when there is any NaN/inf
            mismatch.
        max_ulp_diff: The largest number of representable values between
            matching elements finite on both sides (0 when identical).
        samples: The number of samples compared.
        mode: The mode both models ran in: `"eager"`, `"graph"` or `"xla"`.
        noise_ulp: The first model's own spread in the same mode: the max ulp
            between its outputs on the first batch run whole and in two
            halves. Compilers may compute a batch of another size
            differently, so a difference at or below it is within what the
            platform does to the unchanged model.
        nonfinite_mismatches: The number of elements where the outputs differ
            and one of them is NaN or inf. Those have no meaningful distance:
            `max_abs_diff` is then inf, and such outputs never pass a ulp
            tolerance.
        cpu: The kind of CPU it was measured on (`surgery.runtime.machine`):
            compiled kernels, and so exactness, can differ between CPU kinds.

    Example:

    ```python
    import keras
    import numpy as np
    import surgery

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    x = np.ones((4, 8), "float32")
    report = surgery.verify(model, model, x, verbose=0)
    print(report.as_dict()["identical"], report.nonfinite_mismatches)  # True 0
    print(report)  # identical: True (max abs diff 0, max ulp diff 0, ...)
    ```
    """

    identical: bool
    max_abs_diff: float
    max_ulp_diff: int
    samples: int
    mode: str = "graph"
    noise_ulp: int = 0
    nonfinite_mismatches: int = 0
    cpu: str = field(default_factory=cpu_kind)

    def as_dict(self) -> dict:
        """The report's fields as a dict of plain values, e.g. for `json.dumps`."""
        return asdict(self)

    def __str__(self) -> str:
        nonfinite = (
            f", {self.nonfinite_mismatches} NaN/inf mismatches"
            if self.nonfinite_mismatches
            else ""
        )
        return (
            f"identical: {self.identical} (max abs diff {self.max_abs_diff:.3g}, "
            f"max ulp diff {self.max_ulp_diff}{nonfinite}, {self.samples} samples, "
            f"{self.mode} mode on {self.cpu}; the original's own batch-size noise: "
            f"{self.noise_ulp} ulp)"
        )


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

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    new = surgery.insert_identity_bn(model, after="dense", data=x, verbose=0)
    report = surgery.verify(model, new, x, verbose=0)
    print(report.identical, report.max_ulp_diff, report.samples)  # True 0 64
    ```
    """
    mode = resolve_mode(model_a, mode)
    run_a, run_b = runner(model_a, mode), runner(model_b, mode)
    batches = Batches(
        data,
        batch_size=batch_size,
        steps=steps,
        max_samples=max_samples,
        model=model_a,
    )
    identical, max_abs, max_ulp, samples, noise = True, 0.0, 0, 0, 0
    nonfinite = 0
    for step, x in enumerate(progress(batches, verbose, "verify")):
        if step == 0:
            check_inputs(model_a, x)
        a = flat_outputs(run_a(x))
        if step == 0:
            noise = batch_size_noise(run_a, x, a)
        same, abs_diff, ulp, bad = compare_outputs(a, flat_outputs(run_b(x)))
        identical &= same
        max_abs, max_ulp = max(max_abs, abs_diff), max(max_ulp, ulp)
        nonfinite += bad
        samples += batch_length(x)
    if samples == 0:
        raise SurgeryError(
            "data is empty: it produced no samples; pass a non-empty data set"
        )
    return Report(identical, max_abs, max_ulp, samples, mode, noise, nonfinite)


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


def compare_outputs(a: list, b: list) -> tuple[bool, float, int, int]:
    """Whether two models' flat outputs are equal, and by how much not.

    Returns (identical, max abs diff, max ulp diff, NaN/inf mismatches);
    the distances are over elements finite on both sides, and the abs diff
    is inf when any NaN/inf mismatch exists.
    """
    if len(a) != len(b) or any(p.shape != q.shape for p, q in zip(a, b, strict=True)):
        raise SurgeryError("the two models' outputs differ in number or shape")
    identical, max_abs, max_ulp, nonfinite = True, 0.0, 0, 0
    for p, q in zip(a, b, strict=True):
        p, q = _common_dtype(p, q)
        identical &= bool(np.array_equal(p, q, equal_nan=True))
        bad = _nonfinite_mismatches(p, q)
        nonfinite += bad
        finite = np.isfinite(p) & np.isfinite(q) if bad else slice(None)
        diff = np.abs(p[finite].astype(np.float64) - q[finite].astype(np.float64))
        max_abs = max(max_abs, float(diff.max()) if diff.size else 0.0)
        max_ulp = max(max_ulp, ulp_distance(p[finite], q[finite]))
    if nonfinite:
        max_abs = float("inf")
    return identical, max_abs, max_ulp, nonfinite


def _nonfinite_mismatches(p, q) -> int:
    """Elements that differ where either side is NaN or inf (NaN == NaN)."""
    if not np.issubdtype(p.dtype, np.floating):
        return 0
    both_nan = np.isnan(p) & np.isnan(q)
    differ = (p != q) & ~both_nan
    return int(np.count_nonzero(differ & ~(np.isfinite(p) & np.isfinite(q))))


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


def _common_dtype(p, q):
    """Both outputs in the wider dtype, e.g. a float32 model vs its fp16 copy."""
    if p.dtype == q.dtype:
        return p, q
    common = np.result_type(p.dtype, q.dtype)
    return p.astype(common), q.astype(common)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Largest number of representable values between matching elements."""
    if a.size == 0 or not np.issubdtype(a.dtype, np.floating):
        return (
            0 if np.array_equal(a, b) else int(np.max(np.abs(a.astype(np.int64) - b)))
        )
    ints = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    return int(np.max(np.abs(_ordered(a, ints) - _ordered(b, ints))))


def _ordered(x, ints):
    i = x.view(ints).astype(np.int64)
    lowest = np.iinfo(ints).min
    return np.where(i < 0, lowest - i, i)
