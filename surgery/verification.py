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
    """How far apart two models' outputs were over the data."""

    identical: bool
    max_abs_diff: float
    max_ulp_diff: int
    samples: int

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"identical: {self.identical} (max abs diff {self.max_abs_diff:.3g}, "
            f"max ulp diff {self.max_ulp_diff}, {self.samples} samples)"
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
    identical, max_abs, max_ulp, samples = True, 0.0, 0, 0
    for step, x in enumerate(progress(batches, verbose, "verify")):
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
            diff = np.abs(p.astype(np.float64) - q.astype(np.float64))
            max_abs = max(max_abs, float(np.nanmax(diff)) if diff.size else 0.0)
            max_ulp = max(max_ulp, ulp_distance(p, q))
        samples += batch_length(x)
    if samples == 0:
        raise SurgeryError(
            "data is empty: it produced no samples; pass a non-empty data set"
        )
    return Report(identical, max_abs, max_ulp, samples)


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
