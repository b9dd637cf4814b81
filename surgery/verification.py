"""`verify`: stream two models over the same data and compare outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import keras
import numpy as np
from keras import tree

from surgery.batches import Batches, batch_length, check_inputs, progress
from surgery.errors import SurgeryError


@dataclass(frozen=True)
class Report:
    """How far apart two models' outputs were over the data.

    `nonfinite_mismatches` counts elements where the outputs differ and one
    of them is NaN or inf. Those have no meaningful distance: `max_abs_diff`
    is then inf, and such outputs never pass a ulp tolerance.
    """

    identical: bool
    max_abs_diff: float
    max_ulp_diff: int
    samples: int
    nonfinite_mismatches: int = 0

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
            f"max ulp diff {self.max_ulp_diff}{nonfinite}, {self.samples} samples)"
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
) -> Report:
    """Compare the inference outputs of two models, batch by batch."""
    batches = Batches(
        data,
        batch_size=batch_size,
        steps=steps,
        max_samples=max_samples,
        model=model_a,
    )
    identical, max_abs, max_ulp, samples, nonfinite = True, 0.0, 0, 0, 0
    for step, x in enumerate(progress(batches, verbose)):
        if step == 0:
            check_inputs(model_a, x)
        a = tree.flatten(model_a.predict_on_batch(x))
        b = tree.flatten(model_b.predict_on_batch(x))
        if len(a) != len(b) or any(
            p.shape != q.shape for p, q in zip(a, b, strict=True)
        ):
            raise SurgeryError("the two models' outputs differ in number or shape")
        for p, q in zip(a, b, strict=True):
            p, q = _common_dtype(np.asarray(p), np.asarray(q))
            identical &= bool(np.array_equal(p, q, equal_nan=True))
            bad = _nonfinite_mismatches(p, q)
            nonfinite += bad
            finite = np.isfinite(p) & np.isfinite(q) if bad else slice(None)
            diff = np.abs(p[finite].astype(np.float64) - q[finite].astype(np.float64))
            max_abs = max(max_abs, float(diff.max()) if diff.size else 0.0)
            max_ulp = max(max_ulp, ulp_distance(p[finite], q[finite]))
        samples += batch_length(x)
    if samples == 0:
        raise SurgeryError(
            "data is empty: it produced no samples; pass a non-empty data set"
        )
    if nonfinite:
        max_abs = float("inf")
    return Report(identical, max_abs, max_ulp, samples, nonfinite)


def _nonfinite_mismatches(p, q) -> int:
    """Elements that differ where either side is NaN or inf (NaN == NaN)."""
    if not np.issubdtype(p.dtype, np.floating):
        return 0
    both_nan = np.isnan(p) & np.isnan(q)
    differ = (p != q) & ~both_nan
    return int(np.count_nonzero(differ & ~(np.isfinite(p) & np.isfinite(q))))


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
