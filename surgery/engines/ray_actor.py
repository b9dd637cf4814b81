"""The Ray actor of the statistics pass: one tap model, batches in, moments out.

This module is imported by Ray worker processes, so it imports nothing heavy
at the top: the actor sets TensorFlow's log level, the Keras backend and GPU
memory growth before Keras is imported, then loads the model (shipped as
`.keras` bytes through the object store) once per actor.

Each call gets a few rows and returns one row per input batch: the raw
moments (count, mean, M2 in float64) of every spot, pooled over the spot's
call sites, which the driver merges with the same merge, in batch order.
Rows are either batch numbers (`{"batch": i, "take": n}`, the actor reads
batch i of a path or array source itself, exactly the batch the in-process
pass would see) or samples of a `ray.data.Dataset`, batched by Ray.

Errors a user caused (wrong input shape, unreadable image) come back as an
`error` string, not an exception: Ray retries exceptions, and retrying a
mistake only delays the message.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

BATCH = "batch"  # the batch-number column of a batch-index dataset
TAKE = "take"  # how many of that batch's samples to use (max_samples cuts)
MOMENTS = "moments"  # every spot's (count, mean, M2), packed


@dataclass(frozen=True)
class SourceSpec:
    """Where a batch-index dataset's actors read batch i.

    `path` is opened with `surgery.data.sources.open_source` (it must be readable
    on every node: a shared file system); `dataset` is an object-store
    reference to a `PyDataset` (arrays come wrapped in one). `columns` names
    the model inputs in the rows of a `ray.data.Dataset` (None: batch
    numbers).
    """

    batch_size: int
    path: str | None = None
    dataset: list = field(default_factory=list)  # [ObjectRef], not resolved by Ray
    columns: tuple[str, ...] | None = None
    input_names: tuple[str, ...] | None = None


class TapActor:
    """Per-batch moments of a tap model; a Ray Data callable class or a Ray actor.

    In a Ray Data pool it measures the `plan` it was built with. In the
    engine's own pool it lives for a whole command: each `run` names the
    plan (the tap model is rebuilt when it changes) and the weights changed
    so far (applied when their version is new to this actor, so an actor
    started in place of a dead one catches up on its first call).
    """

    def __init__(
        self,
        model_ref,
        source: SourceSpec,
        env: dict,
        threads=0,
        plan=None,
        updates=None,
    ):
        for key, value in env.items():
            os.environ.setdefault(key, value)
        _configure_tensorflow(env, threads)
        import ray

        self.model = _load_model(ray.get(model_ref[0]))
        self.source_spec = source
        self._source = None
        self._checked = False
        self._plan = None
        self._version = 0
        if updates:
            self._apply(*updates)
        if plan is not None:
            self._use(plan)

    def run(self, plan, updates: tuple, rows: dict) -> dict:
        """`rows` measured for `plan` after the weight `updates` (version, [ref])."""
        if updates[0] != self._version:
            self._apply(*updates)
        if plan != self._plan:
            self._use(plan)
        return self(rows)

    def _apply(self, version: int, ref: list) -> None:
        """Set the weights of every layer changed so far, by path."""
        import ray

        from surgery.graph.spots import walk_layers

        layers = dict(walk_layers(self.model))
        for path, weights in ray.get(ref[0]).items():
            layers[path].set_weights(weights)
        self._version = version

    def _use(self, plan) -> None:
        from surgery.graph.tap_models import tap_model

        self.tap_model, spots, self.owners = tap_model(self.model, plan)
        self.n_spots = len(spots)
        self.spot_units = [0] * len(spots)
        for k, j in enumerate(self.owners):
            self.spot_units[j] = int(self.tap_model.outputs[3 * k + 1].shape[-1])
        self._plan = plan

    def __call__(self, rows: dict) -> dict:
        if self.source_spec.columns is None:
            batches = [
                (int(i), self._read(int(i), int(n)))
                for i, n in zip(rows[BATCH], rows[TAKE], strict=True)
            ]
        else:
            batches = [(-1, self._inputs(rows))]
        return self._moments(batches)

    def _moments(self, batches) -> dict:
        from keras import tree

        from surgery.data.batches import (
            batch_length,
            check_finite_inputs,
            check_inputs,
        )
        from surgery.errors import SurgeryError
        from surgery.numerics.moments import float64_enabled, pool, tap_moments

        out = _empty_output(len(batches), self.spot_units)
        for row, (i, x) in enumerate(batches):
            out[BATCH][row] = i
            try:
                if isinstance(x, SurgeryError):
                    raise x
                if not self._checked:
                    check_inputs(self.model, x)
                    self._checked = True
                check_finite_inputs(x, max(i, 0))
                with float64_enabled():
                    flat = tree.flatten(self.tap_model.predict_on_batch(x))
            except SurgeryError as e:
                out["error"][row] = str(e)
                continue
            out["samples"][row] = batch_length(x)
            taps = tap_moments(flat, len(self.owners))
            out[MOMENTS][row] = pack(pool(taps, self.owners, self.n_spots))
        return out

    def _read(self, i: int, take: int):
        from surgery.errors import SurgeryError

        try:
            x = self._opened()[i]
        except SurgeryError as e:
            return e
        if isinstance(x, tuple):
            x = x[0]  # (x,), (x, y) or (x, y, w): the inputs only
        if take < _length(x):
            from keras import tree

            x = tree.map_structure(lambda a: a[:take], x)
        return x

    def _opened(self):
        if self._source is None:
            spec = self.source_spec
            if spec.path is not None:
                from surgery.data.sources import open_source

                self._source = open_source(
                    spec.path, model=self.model, batch_size=spec.batch_size
                )
            else:
                import ray

                self._source = ray.get(spec.dataset[0])
        return self._source

    def _inputs(self, rows: dict):
        columns = self.source_spec.columns
        arrays = [np.asarray(rows[c]) for c in columns]
        names = self.source_spec.input_names
        if len(arrays) == 1:
            return arrays[0]
        return dict(zip(names, arrays, strict=True))


def pack(moments) -> np.ndarray:
    """Each spot's (units, count, mean..., M2...) in one float64 vector.

    One column of one dtype converts to an Arrow block and back much faster
    than three columns per spot; counts below 2**53 are exact in float64.
    """
    return np.concatenate(
        [np.concatenate([[m.units, m.count], m.mean, m.m2]) for m in moments]
    )


def unpack(vector: np.ndarray) -> list:
    """The `Moments` of each spot, from `pack`'s vector."""
    from surgery.numerics.moments import Moments

    out, at = [], 0
    while at < len(vector):
        units, count = int(vector[at]), int(vector[at + 1])
        mean = vector[at + 2 : at + 2 + units]
        out.append(Moments(count, mean, vector[at + 2 + units : at + 2 + 2 * units]))
        at += 2 + 2 * units
    return out


def _empty_output(n: int, spot_units: list[int]) -> dict:
    return {
        BATCH: np.full(n, -1, dtype=np.int64),
        "samples": np.zeros(n, dtype=np.int64),
        "error": np.array([""] * n, dtype=object),
        MOMENTS: np.zeros((n, sum(2 + 2 * u for u in spot_units)), dtype=np.float64),
    }


def _length(x) -> int:
    from keras import tree

    return int(tree.flatten(x)[0].shape[0])


def _configure_tensorflow(env: dict, threads: int) -> None:
    """GPU memory growth and, on CPU-only actors, threads to match the CPUs held."""
    if env.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if not gpus and threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def _load_model(data: bytes):
    import keras

    from surgery.graph.taps import deep_graphs

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        with open(path, "wb") as f:
            f.write(data)
        with deep_graphs():
            # The driver serialised this model from a live object: its own
            # Lambda code is no less trusted here than there.
            return keras.models.load_model(path, compile=False, safe_mode=False)
