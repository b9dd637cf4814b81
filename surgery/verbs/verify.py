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

    `noise_ulp` is the first model's own spread in the same mode: its outputs
    on the first batch run whole and in two halves. Compilers may compute a
    batch of another size differently, so a difference at or below it is
    within what the platform does to the unchanged model.

    `nonfinite_mismatches` counts elements where the outputs differ and one
    of them is NaN or inf. Those have no meaningful distance: `max_abs_diff`
    is then inf, and such outputs never pass a ulp tolerance.

    `cpu` is the kind of CPU it was measured on (`surgery.runtime.machine`):
    compiled kernels, and so exactness, can differ between CPU kinds.
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

    `mode` is how both run: `"eager"` (`model(x)`), `"graph"` (compiled, as
    `predict` runs without XLA), `"xla"` (`jit_compile=True`), or `"auto"`,
    the mode `model_a.predict` uses on this machine.
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
