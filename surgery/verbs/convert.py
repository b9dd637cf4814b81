"""`convert`: measure, insert identity BN and verify in two passes over the data.

Done one after the other, `activation_stats`, `insert_identity_bn` and
`verify` read the data three times and run the original model twice: once to
measure, once more as verify's reference. `convert` runs the original model
once. Its first pass goes through one compiled model that yields both the
per-batch moments at the taps and the original's outputs; the outputs are
appended to a temporary memory-mapped file (outputs x samples, in
`workdir`). The second pass runs only the new model and compares it with
that file.

The reference outputs come from the original's own layers in a larger
graph, and a compiled graph is free to round differently once it changes
shape. So on the first batch they are compared with the original model's own
`predict_on_batch`; if they differ, the first pass runs the original model
beside the tap model for the reference, and the pass's name says so.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import tree

from surgery.data.batches import Batches, batch_length, check_inputs, progress
from surgery.data.sources import is_source, open_source
from surgery.errors import SurgeryError
from surgery.graph.spots import find_spots, graph_of
from surgery.graph.taps import cached, tap_units
from surgery.graph.walk import TapCollector, deep_graphs, fresh_input, run_graph
from surgery.numerics.moments import (
    BatchMoments,
    Moments,
    Totals,
    float64_enabled,
    tap_moments,
)
from surgery.verbs.insert import _TORCH_MEAN, insert_identity_bn
from surgery.verbs.verify import (
    Report,
    _common_dtype,
    flat_outputs,
    resolve_mode,
    runner,
    ulp_distance,
)


@dataclass(frozen=True)
class Pass:
    """One pass over the data: what it ran, how long it took, on how much."""

    name: str
    seconds: float
    samples: int | None  # None where the pass does not count them (Ray)

    def __str__(self) -> str:
        if self.samples is None:
            return f"{self.name}: {self.seconds:.2f} s"
        return f"{self.name}: {self.samples} samples in {self.seconds:.2f} s"


@dataclass(frozen=True)
class Conversion:
    """What `convert` made: the new model, its statistics and their check.

    `passes` lists every pass over the data, in order, with its time; the
    rebuild between them is `rebuild_seconds`.
    """

    model: keras.Model
    stats: dict[str, Moments]
    report: Report
    passes: tuple[Pass, ...]
    rebuild_seconds: float = field(default=0.0)

    @property
    def identical(self) -> bool:
        return self.report.identical


def convert(
    model: keras.Model,
    after: list[str] | str | None = None,
    before: list[str] | str | None = None,
    data: Any = None,
    *,
    verify_samples: int | None = None,
    epsilon: float = 1e-3,
    momentum: float = 0.99,
    batch_size: int | None = None,
    steps: int | None = None,
    max_samples: int | None = None,
    verbose: int | str = "auto",
    bn_dtype: str | keras.DTypePolicy | None = None,
    zero_mean: bool = False,
    workdir: str | None = None,
) -> Conversion:
    """Insert identity BN after/before the named layers and verify the result.

    The same result as `insert_identity_bn(model, after, before, data)`
    followed by `verify(model, new, data)`, in two passes over `data`
    instead of three: the statistics pass also records the original's
    outputs, and the verification runs only the new model. `data` must give
    the same batches on each pass (arrays, files, datasets and `PyDataset`s
    do; a one-shot generator does not).

    Args:
        verify_samples: verify on the first N samples only (default: all
            the samples the statistics saw).
        workdir: folder for the temporary file of reference outputs (default:
            the system's temporary folder); it is removed afterwards.
        The other arguments are `insert_identity_bn`'s.

    Returns:
        A `Conversion`: `.model` (new, uncompiled), `.stats` (keyed as
        `activation_stats` keys them), `.report` (as `verify` gives it) and
        `.passes` (each pass's name, seconds and samples).
    """
    if verify_samples is not None and verify_samples < 1:
        raise SurgeryError(f"verify_samples must be >= 1, got {verify_samples}")
    if isinstance(data, Iterator):
        raise SurgeryError(
            "convert reads the data twice, and an iterator or generator only "
            "once; pass arrays, a file, a PyDataset or a tf.data.Dataset"
        )
    spots = find_spots(model, after=after, before=before)
    if is_source(data):  # opened once, read by both passes
        data = open_source(data, model=model, batch_size=batch_size or 32)
    stream = dict(batch_size=batch_size, steps=steps)
    folder = tempfile.mkdtemp(prefix="surgery-reference-", dir=workdir)
    reference = _OutputFile(folder, verify_samples)
    try:
        start = time.perf_counter()
        moments, samples, fused = _statistics_pass(
            model,
            spots,
            Batches(data, model=model, max_samples=max_samples, **stream),
            reference,
            verbose,
        )
        first = Pass(
            "statistics + original outputs"
            + ("" if fused else " (original run beside the tap model)"),
            time.perf_counter() - start,
            samples,
        )
        stats = {spot.key: m for spot, m in zip(spots, moments, strict=True)}
        start = time.perf_counter()
        with warnings.catch_warnings():
            # the verification pass measures what this warning announces
            warnings.filterwarnings("ignore", message=re.escape(_TORCH_MEAN))
            new = insert_identity_bn(
                model,
                after=after,
                before=before,
                stats=stats,
                epsilon=epsilon,
                momentum=momentum,
                bn_dtype=bn_dtype,
                zero_mean=zero_mean,
            )
        rebuilt = time.perf_counter() - start
        start = time.perf_counter()
        limit = reference.samples
        report = _verification_pass(
            new,
            Batches(data, model=model, max_samples=limit, **stream),
            reference,
            verbose,
            resolve_mode(model, "auto"),  # XLA for a jit-compiled original
        )
        second = Pass("verification (new model)", time.perf_counter() - start, limit)
    finally:
        reference.close()
        shutil.rmtree(folder, ignore_errors=True)
    return Conversion(new, stats, report, (first, second), rebuilt)


def _statistics_pass(model, spots, batches, reference, verbose):
    """Moments at every spot, with the original's outputs sent to `reference`.

    Returns the moments (one per spot), the number of samples and whether
    the fused model's outputs could serve as the reference.
    """
    fused_model, owners = _fused_model(model, spots)
    totals = Totals(spots)
    fused = True
    for step, x in enumerate(progress(batches, verbose)):
        if step == 0:
            check_inputs(model, x)
        with float64_enabled():
            flat = tree.flatten(fused_model.predict_on_batch(x))
        outputs = flat[3 * len(owners) :]
        if step == 0:
            fused = _same(outputs, tree.flatten(model.predict_on_batch(x)))
        if not fused and reference.wants_more:
            outputs = tree.flatten(model.predict_on_batch(x))
        totals.add(tap_moments(flat, len(owners)), owners, step, batch_length(x))
        reference.append(outputs)
    moments, samples = totals.result()
    return moments, samples, fused


def _verification_pass(new, batches, reference, verbose, mode) -> Report:
    """The new model's outputs against the recorded reference, batch by batch.

    `new` runs in `mode`, the mode the original's `predict` runs in.
    """
    identical, max_abs, max_ulp, seen = True, 0.0, 0, 0
    run = runner(new, mode)
    for x in progress(batches, verbose):
        n = batch_length(x)
        expected = reference.read(seen, seen + n)
        got = flat_outputs(run(x))
        if len(got) != len(expected) or any(
            p.shape != q.shape for p, q in zip(expected, got, strict=True)
        ):
            raise SurgeryError(
                "the data changed between passes (other batches or shapes); "
                "give data that reads the same every time, e.g. arrays or files"
            )
        for p, q in zip(expected, got, strict=True):
            p, q = _common_dtype(np.asarray(p), np.asarray(q))
            identical &= bool(np.array_equal(p, q, equal_nan=True))
            diff = np.abs(p.astype(np.float64) - q.astype(np.float64))
            max_abs = max(max_abs, float(np.nanmax(diff)) if diff.size else 0.0)
            max_ulp = max(max_ulp, ulp_distance(p, q))
        seen += n
    if seen != reference.samples:
        raise SurgeryError(
            f"the data changed between passes ({reference.samples} samples, then "
            f"{seen}); give data that reads the same every time, e.g. arrays or files"
        )
    return Report(identical, max_abs, max_ulp, seen, mode=mode)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(np.asarray(p), np.asarray(q), equal_nan=True)
        for p, q in zip(a, b, strict=True)
    )


def _fused_model(model, spots):
    """One model from the inputs to each tap's moments, then every output.

    Cached per model and spots, like the statistics pass's tap models, so a
    second conversion does not trace it again. Returns it and, per tap, the
    index of its spot.
    """

    def build():
        graph = graph_of(model)
        inputs = [fresh_input(t) for t in graph.inputs]
        collector = TapCollector(spots)
        outputs = run_graph(model, inputs, collector)
        moments = []
        for spot, tensor in collector.taps:
            tap_units(tensor, spot)
            moments.append(BatchMoments(axis=spot.axis)(tensor))
        with deep_graphs():
            fused = keras.Model(
                tree.pack_sequence_as(graph._inputs_struct, inputs),
                [*moments, *outputs],
            )
        return fused, [spot for spot, _ in collector.taps]

    return cached(model, spots, "fused", build)


class _OutputFile:
    """Model outputs appended to raw files, read back memory-mapped.

    One file per output; only the first `limit` samples are kept.
    """

    def __init__(self, folder: str, limit: int | None):
        self.folder, self.limit = folder, limit
        self.samples = 0
        self._files: list = []
        self._specs: list[tuple] = []
        self._maps: list[np.memmap] | None = None

    @property
    def wants_more(self) -> bool:
        return self.limit is None or self.samples < self.limit

    def append(self, outputs) -> None:
        if not self.wants_more:
            return
        arrays = [np.ascontiguousarray(np.asarray(o)) for o in outputs]
        keep = batch_length(arrays[0]) if arrays else 0
        if self.limit is not None:
            keep = min(keep, self.limit - self.samples)
        if not self._files:
            for k, a in enumerate(arrays):
                self._files.append(open(os.path.join(self.folder, f"{k}.raw"), "wb"))
                self._specs.append((a.dtype, a.shape[1:]))
        for f, a in zip(self._files, arrays, strict=True):
            f.write(a[:keep].tobytes())
        self.samples += keep

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._maps = None

    def read(self, lo: int, hi: int) -> list[np.ndarray]:
        if self._maps is None:
            for f in self._files:
                f.close()
            self._maps = [
                np.memmap(f.name, dtype=dtype, mode="r", shape=(self.samples, *shape))
                if self.samples
                else np.empty((0, *shape), dtype)
                for f, (dtype, shape) in zip(self._files, self._specs, strict=True)
            ]
        if hi > self.samples:
            raise SurgeryError(
                f"the data changed between passes ({self.samples} samples, then "
                "more); give data that reads the same every time, e.g. arrays or files"
            )
        return [m[lo:hi] for m in self._maps]
