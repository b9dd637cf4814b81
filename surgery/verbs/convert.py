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

import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import tree

from surgery.data.batches import (
    Batches,
    batch_length,
    check_finite_inputs,
    check_inputs,
    progress,
)
from surgery.data.inputs import open_inputs
from surgery.errors import SurgeryError
from surgery.files.outputs import OutputFile, reference_folder
from surgery.graph.spots import find_spots, graph_of
from surgery.graph.tap_models import cached, tap_units
from surgery.graph.taps import TapCollector, deep_graphs, fresh_input, run_graph
from surgery.numerics.compare import Comparison, Report
from surgery.numerics.moments import (
    BatchMoments,
    Moments,
    Totals,
    float64_enabled,
    tap_moments,
)
from surgery.validate import check_max_samples, check_verify_samples
from surgery.verbs.insert import insert_identity_bn
from surgery.verbs.insert_check import TORCH_MEAN
from surgery.verbs.verify import flat_outputs, resolve_mode, runner


@dataclass(frozen=True)
class Pass:
    """One pass over the data: what it ran, how long it took, on how much.

    `str(p)` gives it in one line, e.g. `"verification (new model): 256
    samples in 0.41 s"`.

    Attributes:
        name: What the pass ran, e.g. `"statistics + original outputs"`.
        seconds: Its wall-clock time.
        samples: The samples it read, or `None` where the pass does not count
            them (Ray).
    """

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

    Attributes:
        model: The new `keras.Model` with the BN layers, uncompiled.
        stats: The statistics the BNs were built from, keyed as
            `activation_stats` keys them (`"name"`, `"name:input"`); they can
            be passed to `insert_identity_bn(stats=...)` again.
        report: The `Report` comparing the new model with the original, as
            `verify` gives it.
        passes: Every pass over the data, in order, as `Pass` records (name,
            seconds, samples).
        rebuild_seconds: Seconds spent building the new model between the
            two passes.
    """

    model: keras.Model
    stats: dict[str, Moments]
    report: Report
    passes: tuple[Pass, ...]
    rebuild_seconds: float = field(default=0.0)

    @property
    def identical(self) -> bool:
        """Whether the new model's outputs were bit-identical (`report.identical`)."""
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
    instead of three, running the original model once: the statistics pass
    also records the original's outputs (in a temporary file in `workdir`),
    and the verification pass runs only the new model and compares it with
    them, in the mode the original's `predict` runs in.

    Args:
        model: The Functional or Sequential `keras.Model` to change. A
            subclassed model has no graph to rewrite: trace it with
            `surgery.functional` first.
        after: Name(s) of the layers to put a BN after, on their output
            (every consumer of that output is rewired to the BN). A layer in
            a nested model is named by its path (`"vgg16/fc1"`), one output
            of a multi-output layer as `"name:index"`; a string is one name.
            Defaults to `None` (no layer).
        before: Name(s) of the layers to put a BN before, on their input and
            for that layer only; each must take one input. Named as for
            `after`. Defaults to `None` (no layer). `after` and `before`
            together must name at least one layer.
        data: The model inputs: anything `model.predict` accepts as `x`
            (NumPy arrays, a list or dict of them for several inputs, a
            `tf.data.Dataset`, a `keras.utils.PyDataset`, a generator), or a
            path or on-disk array that `surgery.sources.open_source` opens
            (image folder, `.npy`, `.npz`, `.h5`, zarr, bcolz). Labels in
            `(x, y)` or `(x, y, sample_weight)` batches are ignored. It is
            read one batch at a time, never whole. Here it is read twice and
            must give the same batches both times: arrays, files, datasets
            and `PyDataset`s do; an iterator or generator is refused.
        verify_samples: Verify on the first N samples only, at least 1.
            Defaults to `None`: every sample the statistics pass saw.
        epsilon: The BNs' `epsilon`, a finite number > 0. The identity is
            exact for any value. Defaults to `1e-3`, Keras' default.
        momentum: The BNs' `momentum`, in [0, 1]; it only matters once the
            new model is trained. Defaults to `0.99`, Keras' default.
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
        bn_dtype: A dtype policy, or its name (`"float32"`,
            `"mixed_float16"`, ...), forced on every new BN, as in
            `insert_identity_bn`. Defaults to `None`: each BN takes the
            policy `insert_identity_bn` chooses.
        zero_mean: Store `moving_mean = beta = 0` instead of the measured
            mean, as in `insert_identity_bn`: an exact identity at inference
            on every backend, torch included. Defaults to `False`.
        workdir: Folder for the temporary file of reference outputs (one
            output row per verified sample). Defaults to `None`: the system's
            temporary folder. The file is removed afterwards.

    Returns:
        A `Conversion`: `.model` (the new model, uncompiled), `.stats` (keyed
        as `activation_stats` keys them), `.report` (a `Report`, as `verify`
        gives it), `.identical` (the report's), `.passes` (each pass's name,
        seconds and samples) and `.rebuild_seconds`.

    Raises:
        SurgeryError: `verify_samples` or `max_samples` is below 1; `data` is
            an iterator or generator, or gives other batches on the second
            pass; `after` and `before` name no layer, a name is not a layer
            of the model (the message suggests close names), names an
            `InputLayer`, a non-Layer operation or a multi-output layer
            without `:index`, `before` names a layer with several inputs, or
            `after` and `before` name the same spot; the model is subclassed
            or a Sequential model without an input shape; the data is
            missing, unreadable, empty, does not fit the model's inputs, or
            an activation holds NaN or inf; `epsilon` or `momentum` is out of
            range; a BN would compute in float64 off the TensorFlow
            backend; or the reference outputs cannot be written to
            `workdir` (e.g. a full disk; the message names the folder).

    Example:

    ```python
    import keras
    import numpy as np
    import surgery

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", name="fc1"),
        keras.layers.Dense(4, name="fc2"),
    ])
    x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    result = surgery.convert(model, after=["fc1"], data=x, verbose=0)
    print(result.identical, result.report.samples)  # True 256
    for p in result.passes:
        print(p)  # statistics + original outputs: 256 samples in ... s, ...
    new = result.model
    ```
    """
    check_verify_samples(verify_samples)
    check_max_samples(max_samples)
    spots = find_spots(model, after=after, before=before)
    data = open_inputs(data, model=model, batch_size=batch_size)  # both passes
    if data.one_shot:
        raise SurgeryError(
            "convert reads the data twice, and an iterator or generator only "
            "once; pass arrays, a file, a PyDataset or a tf.data.Dataset"
        )
    stream = dict(batch_size=batch_size, steps=steps)
    folder = reference_folder(workdir)
    reference = OutputFile(folder, verify_samples)
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
            warnings.filterwarnings("ignore", message=re.escape(TORCH_MEAN))
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
    for step, x in enumerate(progress(batches, verbose, "statistics")):
        if step == 0:
            check_inputs(model, x)
        check_finite_inputs(x, step)
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

    `new` runs in `mode`, the mode the original's `predict` runs in; the
    outputs are compared as `verify` compares them.
    """
    comparison = Comparison()
    run = runner(new, mode)
    for x in progress(batches, verbose, "verify"):
        n = batch_length(x)
        expected = reference.read(comparison.samples, comparison.samples + n)
        got = flat_outputs(run(x))
        if len(got) != len(expected) or any(
            p.shape != q.shape for p, q in zip(expected, got, strict=True)
        ):
            raise SurgeryError(
                "the data changed between passes (other batches or shapes); "
                "give data that reads the same every time, e.g. arrays or files"
            )
        comparison.add([np.asarray(p) for p in expected], got, n)
    if comparison.samples != reference.samples:
        raise SurgeryError(
            f"the data changed between passes ({reference.samples} samples, then "
            f"{comparison.samples}); give data that reads the same every time, "
            "e.g. arrays or files"
        )
    return comparison.report(mode)


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
