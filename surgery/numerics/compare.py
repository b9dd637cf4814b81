"""The one comparison of two models' outputs, for `verify` and `convert`.

Outputs are compared element by element: bit for bit, by absolute
difference and by ulps (representable values apart). A NaN or inf on one
side only has no distance: it is counted as a NaN/inf mismatch, and no ulp
tolerance accepts it (float32 max and inf are one bit pattern apart, not
"1 ulp" close).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from surgery.errors import SurgeryError
from surgery.runtime.machine import cpu_kind

# What `ulp_distance` gives for a NaN/inf mismatch: more than any tolerance.
UNBOUNDED_ULP = np.iinfo(np.int64).max


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

    def within(self, max_ulp: int) -> bool:
        """Identical, or every output within `max_ulp` ulps and none NaN/inf apart."""
        return self.identical or (
            self.nonfinite_mismatches == 0 and self.max_ulp_diff <= max_ulp
        )

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


class Comparison:
    """Two models' outputs compared batch after batch, summed up in a `Report`.

    Example:
        >>> c = Comparison()
        >>> c.add([np.float32([1, 2])], [np.float32([1, 2])], samples=2)
        >>> c.report("graph").identical
        True
    """

    def __init__(self):
        self.identical, self.max_abs, self.max_ulp = True, 0.0, 0
        self.nonfinite, self.samples = 0, 0

    def add(self, a: list, b: list, samples: int) -> None:
        """Compare one batch of `samples`: `a`, `b` are each model's flat outputs."""
        same, max_abs, max_ulp, nonfinite = compare_outputs(a, b)
        self.identical &= same
        self.max_abs = max(self.max_abs, max_abs)
        self.max_ulp = max(self.max_ulp, max_ulp)
        self.nonfinite += nonfinite
        self.samples += samples

    def report(self, mode: str, noise_ulp: int = 0) -> Report:
        return Report(
            self.identical,
            self.max_abs,
            self.max_ulp,
            self.samples,
            mode,
            noise_ulp,
            self.nonfinite,
        )


def compare_outputs(a: list, b: list) -> tuple[bool, float, int, int]:
    """Whether two models' flat outputs are equal, and by how much not.

    Returns (identical, max abs diff, max ulp diff, NaN/inf mismatches);
    the distances are over elements finite on both sides, and the abs diff
    is inf when any NaN/inf mismatch exists.
    """
    if len(a) != len(b) or any(
        np.shape(p) != np.shape(q) for p, q in zip(a, b, strict=True)
    ):
        raise SurgeryError("the two models' outputs differ in number or shape")
    identical, max_abs, max_ulp, nonfinite = True, 0.0, 0, 0
    for p, q in zip(a, b, strict=True):
        p, q = common_dtype(np.asarray(p), np.asarray(q))
        identical &= bool(np.array_equal(p, q, equal_nan=True))
        bad = nonfinite_mismatches(p, q)
        nonfinite += bad
        finite = np.isfinite(p) & np.isfinite(q) if bad else slice(None)
        diff = np.abs(p[finite].astype(np.float64) - q[finite].astype(np.float64))
        max_abs = max(max_abs, float(np.nanmax(diff)) if diff.size else 0.0)
        max_ulp = max(max_ulp, ulp_distance(p[finite], q[finite]))
    if nonfinite:
        max_abs = float("inf")
    return identical, max_abs, max_ulp, nonfinite


def nonfinite_mismatches(p: np.ndarray, q: np.ndarray) -> int:
    """Elements that differ where either side is NaN or inf (NaN == NaN)."""
    if not np.issubdtype(p.dtype, np.floating):
        return 0
    both_nan = np.isnan(p) & np.isnan(q)
    differ = (p != q) & ~both_nan
    return int(np.count_nonzero(differ & ~(np.isfinite(p) & np.isfinite(q))))


def common_dtype(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both outputs in the wider dtype, e.g. a float32 model vs its fp16 copy."""
    if p.dtype == q.dtype:
        return p, q
    common = np.result_type(p.dtype, q.dtype)
    return p.astype(common), q.astype(common)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Largest number of representable values between matching elements.

    A NaN/inf mismatch is `UNBOUNDED_ULP` away: next to float32 max, inf is
    the next bit pattern, but no rounding error of a finite result.
    """
    if a.size == 0 or not np.issubdtype(a.dtype, np.floating):
        return (
            0 if np.array_equal(a, b) else int(np.max(np.abs(a.astype(np.int64) - b)))
        )
    if nonfinite_mismatches(a, b):
        return int(UNBOUNDED_ULP)
    ints = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    both_nan = np.isnan(a) & np.isnan(b)
    gaps = np.abs(_ordered(a, ints) - _ordered(b, ints))
    return int(np.max(np.where(both_nan, 0, gaps)))


def _ordered(x, ints):
    """Float bit patterns as integers in the floats' own order."""
    i = x.view(ints).astype(np.int64)
    lowest = np.iinfo(ints).min
    return np.where(i < 0, lowest - i, i)
