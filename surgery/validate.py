"""Checks of user-given values, run before any work so a bad one costs nothing.

The CLI runs the scalar checks right after parsing, before any backend or
numpy loads, so they use `numbers` (numpy's scalars register there).
"""

from __future__ import annotations

import math
import numbers
import os
import stat

from surgery.errors import SurgeryError, quoted


def check_epsilon(epsilon: float) -> float:
    """BN's epsilon: a finite number > 0 (it keeps `var + eps` positive)."""
    if not _is_real(epsilon) or not math.isfinite(epsilon) or epsilon <= 0:
        raise SurgeryError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


def check_momentum(momentum: float) -> float:
    """BN's momentum: the weight of the old moving statistics, in [0, 1]."""
    if not _is_real(momentum) or not 0 <= momentum <= 1:
        raise SurgeryError(f"momentum must be between 0 and 1, got {momentum!r}")
    return float(momentum)


def check_batch_size(batch_size: int | None) -> int | None:
    """Samples per batch: None (the default) or an integer >= 1."""
    return _at_least_one("batch_size", batch_size)


def check_max_samples(max_samples: int | None) -> int | None:
    """How many samples a pass reads: None (all) or an integer >= 1."""
    return _at_least_one("max_samples", max_samples)


def check_verify_samples(verify_samples: int | None) -> int | None:
    """How many samples a verification reads: None (all) or an integer >= 1."""
    return _at_least_one("verify_samples", verify_samples)


def check_workers(workers: int | None) -> int | None:
    """Decode threads or Ray actors: None (the default) or an integer >= 1."""
    return _at_least_one("workers", workers)


def check_max_ulp(max_ulp: int) -> int:
    """The ulps a comparison may accept: an integer >= 0."""
    if not _is_integer(max_ulp) or max_ulp < 0:
        raise SurgeryError(f"max_ulp must be >= 0, got {max_ulp!r}")
    return int(max_ulp)


def check_gpus_per_worker(gpus: float) -> float:
    """GPUs per Ray actor: a number >= 0 (fractions share a GPU)."""
    if not _is_real(gpus) or not gpus >= 0:
        raise SurgeryError(f"gpus_per_worker must be >= 0, got {gpus!r}")
    return float(gpus)


def _at_least_one(name: str, value):
    if value is None:
        return None
    if not _is_integer(value) or value < 1:
        raise SurgeryError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def check_moments(moments, name: str, source: str = "stats") -> None:
    """Refuse statistics no data set can produce: they would break the BN.

    A count below 1, a negative or non-finite M2 (sum of squared
    deviations) or a non-finite mean comes from a corrupt or hand-edited
    file, never from a measurement.
    """
    import numpy as np

    where = f"{source} for '{name}'"
    count = moments.count
    if not isinstance(count, int | np.integer) or count < 1:
        raise SurgeryError(
            f"{where}: count is {count!r}, must be an integer >= 1; recompute "
            "the statistics"
        )
    mean, m2 = np.asarray(moments.mean), np.asarray(moments.m2)
    if mean.ndim != 1 or m2.shape != mean.shape:
        raise SurgeryError(
            f"{where}: mean {mean.shape} and M2 {m2.shape} must be one vector each "
            "of one value per unit; recompute the statistics"
        )
    for label, values in (("mean", mean), ("M2", m2)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise SurgeryError(
                f"{where}: {label} of unit {int(bad[0])} is {values[bad[0]]}; "
                "statistics must be finite: check the data and recompute them"
            )
    negative = np.flatnonzero(m2 < 0)
    if negative.size:
        raise SurgeryError(
            f"{where}: M2 of unit {int(negative[0])} is {m2[negative[0]]} < 0 (a "
            "variance cannot be negative); recompute the statistics"
        )


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_zarr_complete(array, path: str) -> None:
    """Refuse a zarr array with missing chunks: zarr would read them as zeros.

    A chunk that is all fill value may legitimately be absent when the
    writer skipped empty chunks; rewrite such an array with
    `config={"write_empty_chunks": True}` to read it here.
    """
    try:
        have, want = array.nchunks_initialized, array.nchunks
    except AttributeError:  # not a zarr 3 array
        return
    if have < want:
        raise SurgeryError(
            f"{quoted(path)} is missing {want - have} of its {want} zarr chunks (they "
            "would read as zeros); copy the complete array, or rewrite it with "
            "write_empty_chunks=True if those chunks are truly empty"
        )


def check_not_empty(samples: int, consequence: str = "pass a non-empty data set"):
    """Refuse a pass that saw no samples, in one line."""
    if samples == 0:
        raise SurgeryError(f"data is empty: it produced no samples; {consequence}")


def check_data_array(dtype, shape, where: str = "data") -> None:
    """Refuse an array no model takes as a batch: not numbers, complex, 0-d.

    `dtype` may be NumPy's or a backend's (a `tf.DType`); one this check
    cannot read is let through for the backend to judge. Integers and
    booleans are numbers a model casts; text, bytes, Python objects, dates
    and complex numbers are not (a cast would drop the imaginary part).
    """
    if shape is not None and len(shape) == 0:
        raise SurgeryError(
            f"{where} is a single value (a 0-d array), not a batch; give an array "
            "whose first axis counts the samples, shape (samples, ...)"
        )
    dtype = _numpy_dtype(dtype)
    if dtype is None or dtype.kind in "biuf":
        return
    if dtype.kind == "V" and dtype.names is None and dtype.subdtype is None:
        return  # ml_dtypes' floats (bfloat16, float8) are kind V
    if dtype.kind == "c":
        raise SurgeryError(
            f"{where} is complex ({dtype}), and a model takes real numbers (the "
            "imaginary part would be dropped); pass x.real, abs(x), or both as "
            "channels"
        )
    what = {"U": "text", "S": "bytes", "O": "Python objects", "M": "dates"}.get(
        dtype.kind, "records" if dtype.names else "values that are not numbers"
    )
    raise SurgeryError(
        f"{where} holds {what} (dtype {dtype}), not numbers; convert it to "
        "numbers first, e.g. x.astype('float32')"
    )


def _numpy_dtype(dtype):
    import numpy as np

    dtype = getattr(dtype, "as_numpy_dtype", dtype)  # a tf.DType
    try:
        return None if dtype is None else np.dtype(dtype)
    except TypeError:
        return None  # a backend's dtype NumPy does not know (torch)


def check_not_special(path: str, what: str = "data") -> None:
    """Refuse a FIFO, device or socket at `path` without opening it.

    Opening one would block or never end. A missing path, a folder and a
    regular file (or a link to one) pass: their own checks follow.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    raise SurgeryError(
        f"{what} {quoted(path)} is {kind}, not a regular file (reading it could "
        "block forever); write it to a regular file and give that"
    )
