"""The statistics pass on a Ray cluster: actors measure, the driver merges.

`engine="ray"` (or a `RayEngine(...)`) on `activation_stats`,
`insert_identity_bn` and `recalibrate_bn` opens a `RaySession` for the
command: the model travels once (as `.keras` bytes through the object
store) and one pool of actors (`surgery.engines.ray_pool`) serves every pass
of the command, so `recalibrate_bn`'s passes, one per BN level, pay the
actor start once and ship only the weights that changed in between. Each
actor returns the raw moments of each batch; the driver merges them in batch
order with the merge of the in-process pass, under one progress bar.

Path and array sources become batch numbers: an actor reads batch i itself,
the same samples the in-process pass puts in batch i, so the statistics are
the in-process ones, and every batch number is accounted for exactly once (a
retried batch is not counted twice, a lost one is an error). A
`ray.data.Dataset` (say `ray.data.read_images("s3://...")` or
`read_parquet`) is batched by Ray, with a Ray Data actor pool per pass;
parquet paths are read with `ray.data.read_parquet`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras.utils import Progbar

from surgery.engines import ray_cluster
from surgery.engines.ray_actor import BATCH, MOMENTS, TapActor, unpack
from surgery.engines.ray_data import ray_dataset
from surgery.engines.ray_pool import ActorPool
from surgery.errors import SurgeryError
from surgery.graph.tap_models import TapPlan
from surgery.numerics.moments import Moments, Totals
from surgery.runtime.progress import active
from surgery.validate import check_gpus_per_worker, check_max_samples, check_workers

RETRIES = 3  # attempts beyond the first for a batch whose actor raised


@dataclass(frozen=True)
class RayEngine:
    """Where and how wide a Ray pass runs: pass one as `engine=`.

    `activation_stats`, `insert_identity_bn` and `recalibrate_bn` take
    `engine="ray"` (a `RayEngine()` with every default) or a `RayEngine`
    saying which cluster to join and how many actors to run. The passes of
    one command then run the tap model in one pool of Ray actors, each
    reading its own batches, and the driver merges their moments in batch
    order with the in-process pass's merge, so path and array sources give
    the in-process statistics bit for bit. Every batch is counted exactly
    once: a retried batch is not counted twice and a lost one is an error.
    Needs `pip install 'surgery[ray]'`.

    Args:
        address: The cluster to join: `"auto"`, `"host:6379"` or
            `"ray://host:10001"`. Defaults to `None`: the cluster in
            `RAY_ADDRESS` or the one this process already joined, else a new
            local one.
        workers: The number of actors in the pool, at least 1, capped at the
            number of batches when the data says it. Defaults to `None`: one per
            `gpus_per_worker` GPUs of the cluster when that is set, else one
            per `cpus_per_worker` CPUs.
        gpus_per_worker: GPUs each actor holds (`num_gpus=` in Ray), may be
            fractional. Defaults to `0`: CPU-only actors.
        cpus_per_worker: CPUs each actor holds (`num_cpus=` in Ray); a
            CPU-only actor runs TensorFlow with this many threads. Defaults
            to `1`.
        retries: How often a batch whose actor raised is tried again (an
            actor that dies is replaced by a new one and its batches retried).
            Defaults to `3`.

    Raises:
        SurgeryError: at once, when `workers` is below 1 or `gpus_per_worker`
            below 0; when a pass runs with it: Ray Data is not installed;
            the cluster at `address` cannot be joined; the cluster has fewer
            GPUs than `gpus_per_worker`; an actor's batch fails after its
            retries; or the pass loses batches.

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
    engine = surgery.RayEngine(workers=1, cpus_per_worker=1)
    stats = surgery.activation_stats(model, "fc1", x, engine=engine, verbose=0)
    local = surgery.activation_stats(model, "fc1", x, verbose=0)
    print(np.allclose(stats["fc1"].mean, local["fc1"].mean))  # True
    ```
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    retries: int = RETRIES

    def __post_init__(self):
        check_workers(self.workers)
        check_gpus_per_worker(self.gpus_per_worker)

    def session(
        self,
        model: keras.Model,
        data: Any,
        *,
        batch_size: int | None = None,
        steps: int | None = None,
        max_samples: int | None = None,
        verbose: int | str = "auto",
    ) -> RaySession:
        """A session for passes of `data` through `model` on the cluster."""
        return RaySession(self, model, data, batch_size, steps, max_samples, verbose)


class RaySession:
    """Passes over one model and one data set, on one pool of actors.

    The actors start with the first pass over a batch-numbered source and
    stop when the session closes.
    """

    def __init__(self, engine, model, data, batch_size, steps, max_samples, verbose):
        ray = ray_cluster.connect(engine)
        batch_size = batch_size or 32
        check_max_samples(max_samples)
        self.ray, self.engine, self.model, self.verbose = ray, engine, model, verbose
        self.dataset, self.source, self.total, self.batches = ray_dataset(
            ray, data, model, batch_size, steps, max_samples
        )
        self.workers = ray_cluster.workers(ray, engine)
        if self.batches is not None:
            self.workers = max(1, min(self.workers, self.batches))  # none idle
        self.init = {
            "model_ref": [ray.put(ray_cluster.model_bytes(model))],  # in a list:
            "source": self.source,  # the actor resolves it, not Ray
            "env": {
                "KERAS_BACKEND": keras.backend.backend(),
                "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
            },
            "threads": 0 if engine.gpus_per_worker else int(engine.cpus_per_worker),
        }
        self.changed: dict[str, list[np.ndarray]] = {}
        self.updates: tuple = (0, [None])  # (version, [ObjectRef of `changed`])
        self.pool: ActorPool | None = None

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def moments(
        self, plan: TapPlan, first_batch: list | None = None
    ) -> tuple[list[Moments], int]:
        """The moments at each of `plan`'s spots over one pass, and the samples seen.

        With `plan.zeros` the spots' zero indicators' moments follow, one per
        spot (`TapPlan.results`). `first_batch` stays as it is: the batches
        are read by the actors.
        """
        spots = plan.results(plan.spots(self.model))
        numbered = self.batches is not None
        blocks = self._pool_blocks(plan) if numbered else self._dataset_blocks(plan)
        with ray_cluster.quiet_ray_data():
            return merge_blocks(blocks, spots, self.total, self.batches, self.verbose)

    def update(self, layers: dict[str, keras.layers.Layer]) -> None:
        """Ship the weights of `layers` (by path) to the actors for later passes."""
        for path, layer in layers.items():
            self.changed[path] = [np.array(w) for w in layer.get_weights()]
        self.updates = (self.updates[0] + 1, [self.ray.put(dict(self.changed))])

    def _pool_blocks(self, plan: TapPlan):
        """The batch numbers, measured by the session's own pool of actors."""
        if not self.dataset:
            return iter(())  # no batch at all: no actor to start
        if self.pool is None:
            options = {"num_cpus": self.engine.cpus_per_worker}
            if self.engine.gpus_per_worker:
                options["num_gpus"] = self.engine.gpus_per_worker
            self.pool = ActorPool(self.ray, TapActor, self.workers, options, self.init)
        return self.pool.run(self.dataset, plan, self.updates, self.engine.retries)

    def _dataset_blocks(self, plan: TapPlan):
        """A `ray.data.Dataset`'s rows, batched by Ray and measured by its actors."""
        out = self.dataset.map_batches(
            TapActor,
            batch_size=self.source.batch_size,
            batch_format="numpy",
            compute=self.ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=self.engine.cpus_per_worker,
            num_gpus=self.engine.gpus_per_worker or None,
            fn_constructor_kwargs={
                **self.init,
                "plan": plan,
                "updates": self.updates if self.updates[0] else None,
            },
        )
        ray_cluster.configure(out.context, self.engine)
        blocks = out.iter_batches(batch_size=None, batch_format="numpy")
        return ray_cluster.unwrapped(iter(blocks))


def merge_blocks(blocks, spots, total, batches, verbose) -> tuple[list[Moments], int]:
    """Merge the actors' rows into one Moments per spot, under one progress bar.

    Numbered batches are merged in batch order, whatever order they arrive
    in, so the result is the in-process pass's to the bit.
    """
    verbose = 1 if verbose == "auto" else int(verbose)
    shared = active()  # a CLI command's one progress display
    if shared is not None:
        shared.start("statistics", batches)
    bar = None
    if verbose and shared is None:
        bar = Progbar(total, verbose=verbose, unit_name="sample")
    totals = Totals(spots)
    waiting: dict[int, tuple] = {}  # batches that came before an earlier one
    seen: set[int] = set()
    rows = 0
    try:
        for block in blocks:
            for row in range(len(block[BATCH])):
                if block["error"][row]:
                    raise SurgeryError(str(block["error"][row]))
                i = int(block[BATCH][row])
                if i >= 0 and i in seen:
                    continue  # a retried batch delivered twice: count it once
                moments = unpack(np.asarray(block[MOMENTS][row], dtype=np.float64))
                samples = int(block["samples"][row])
                if i < 0:  # rows of a Ray dataset: no order to keep
                    totals.add(moments, range(len(moments)), rows, samples)
                else:
                    seen.add(i)
                    waiting[i] = (moments, samples)
                    _merge_in_order(totals, waiting, len(seen) - len(waiting))
                rows += 1
                if shared is not None:
                    shared.step(samples)
                if bar is not None:
                    bar.update(totals.samples + sum(n for _, n in waiting.values()))
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()
    if batches is not None and len(seen) != batches:
        missing = sorted(set(range(batches)) - seen)[:5]
        raise SurgeryError(
            f"the Ray pass returned {len(seen)} of {batches} batches (missing: "
            f"{missing}); run it again"
        )
    if batches is None and total is not None and totals.samples != total:
        raise SurgeryError(
            f"the Ray pass returned {totals.samples} of the dataset's {total} rows; "
            "run it again"
        )
    result = totals.result()
    if bar is not None and total is None:
        bar.update(totals.samples, finalize=True)
    return result


def _merge_in_order(totals: Totals, waiting: dict, step: int) -> None:
    """Merge the waiting batches that come next in batch order, from `step` on."""
    while step in waiting:
        moments, samples = waiting.pop(step)
        totals.add(moments, range(len(moments)), step, samples)
        step += 1
