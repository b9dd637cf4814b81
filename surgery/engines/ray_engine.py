"""The statistics pass on a Ray cluster: Ray Data schedules, retries and streams.

`engine="ray"` (or a `RayEngine(...)`) on `activation_stats`,
`insert_identity_bn` and `recalibrate_bn` runs the tap model in a pool of
Ray actors (`map_batches` with `ActorPoolStrategy`); each actor returns the
raw moments of each batch and the driver merges them with the same Chan merge
as the in-process pass, under one progress bar.

Path and array sources become a dataset of batch numbers: actor k reads batch
i itself, the same samples the in-process pass puts in batch i, so the
statistics equal the in-process ones up to float64 rounding of the merge
order, and every batch number is accounted for exactly once (a retried batch
is not counted twice, a lost one is an error). A `ray.data.Dataset` (say
`ray.data.read_images("s3://...")` or `read_parquet`) is batched by Ray;
parquet paths are read with `ray.data.read_parquet`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass

import keras
import numpy as np
from keras.utils import Progbar

from surgery.engines.ray_actor import BATCH, MOMENTS, TapActor, TapSpec, unpack
from surgery.engines.ray_data import ray_dataset
from surgery.errors import SurgeryError, first_line
from surgery.numerics.moments import Moments

RETRIES = 3  # attempts beyond the first for a batch whose actor raised


@dataclass(frozen=True)
class RayEngine:
    """Where and how wide a Ray pass runs: pass one as `engine=`.

    `activation_stats`, `insert_identity_bn` and `recalibrate_bn` take
    `engine="ray"` (a `RayEngine()` with every default) or a `RayEngine`
    saying which cluster to join and how many actors to run. The pass then
    runs the tap model in a pool of Ray actors, each reading its own batches,
    and the driver merges their moments exactly as the in-process pass does,
    so the statistics equal the in-process ones up to float64 rounding of the
    merge order. Every batch is counted exactly once: a retried batch is not
    counted twice and a lost one is an error. Needs
    `pip install 'surgery[ray]'`.

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
            actor that dies is restarted and its batches retried by Ray).
            Defaults to `3`.

    Raises:
        SurgeryError: when a pass runs with it: Ray Data is not installed;
            the cluster at `address` cannot be joined; `workers` is below 1;
            the cluster has fewer GPUs than `gpus_per_worker`; an actor's
            batch fails after its retries; or the pass loses batches.

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


def as_engine(engine) -> RayEngine | None:
    """`None`/`"local"` for the in-process pass, else the `RayEngine` meant."""
    if engine is None or engine == "local":
        return None
    if engine == "ray":
        return RayEngine()
    if isinstance(engine, RayEngine):
        return engine
    raise SurgeryError(
        f"engine must be 'local', 'ray' or a surgery.RayEngine, got {engine!r}"
    )


def spot_moments(model, spots, data, engine: RayEngine, **stream) -> list[Moments]:
    """`stats.spot_moments` on Ray: moments at each spot, one pass over `data`."""
    after = tuple(s.spec for s in spots if s.side == "after")
    before = tuple(s.spec for s in spots if s.side == "before")
    moments, _ = run_pass(
        model, TapSpec("spots", after, before), spots, data, engine, **stream
    )
    return moments


def recalibrate(model, data, layers, mode, engine: RayEngine, verbose, **stream):
    """`recalibrate_bn` on Ray: the same passes, each measured by the actors.

    Mode "exact" ships the model again for every BN level, with the levels
    before it already recalibrated, so a level's actors measure what the
    in-process pass measures.
    """
    from surgery.graph.rewrite import copy_model
    from surgery.verbs import recalibrate as rc

    names = [site.path for site in rc.select(model, rc.bn_sites(model), layers)]
    new = copy_model(model)
    sites = rc._unique(rc.select(new, rc.bn_sites(new), names))
    if mode == "auto":
        mode = rc._auto_mode(new, sites)
    if mode == "exact":
        levels = rc.bn_levels(new, {id(site.layer) for site in sites})
        groups = [
            [site for site in sites if levels[id(site.layer)] == level]
            for level in sorted(set(levels.values()))
        ]
    else:
        groups = [sites]
    for group in groups:
        spec = TapSpec(mode, paths=tuple(site.path for site in group))
        spots = [rc._spot(site) for site in group]
        moments, _ = run_pass(new, spec, spots, data, engine, verbose=verbose, **stream)
        rc._store(group, moments)
    return new


def run_pass(
    model,
    tap_spec: TapSpec,
    spots,
    data,
    engine: RayEngine,
    *,
    batch_size: int | None = None,
    steps: int | None = None,
    max_samples: int | None = None,
    verbose: int | str = "auto",
) -> tuple[list[Moments], int]:
    """One pass of `tap_spec`'s tap model over `data` on Ray.

    Returns the moments of each spot (in `spots` order) and the samples seen.
    """
    ray = _connect(engine)
    batch_size = batch_size or 32
    if max_samples is not None and max_samples < 1:
        raise SurgeryError(f"max_samples must be >= 1, got {max_samples}")
    dataset, source, total, batches = ray_dataset(
        ray, data, model, batch_size, steps, max_samples
    )
    model_ref = ray.put(model_bytes(model))
    workers = _workers(ray, engine)
    if batches is not None:
        workers = min(workers, batches)  # more actors than batches would idle
    env = {
        "KERAS_BACKEND": keras.backend.backend(),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
    }
    out = dataset.map_batches(
        TapActor,
        batch_size=1 if source.columns is None else batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=engine.cpus_per_worker,
        num_gpus=engine.gpus_per_worker or None,
        fn_constructor_kwargs={
            "model_ref": [model_ref],  # in a list: resolved by the actor itself
            "tap_spec": tap_spec,
            "source": source,
            "env": env,
            "threads": 0 if engine.gpus_per_worker else int(engine.cpus_per_worker),
        },
    )
    _configure(out.context, engine)
    with _quiet_ray_data():
        return _merge(out, spots, total, batches, verbose)


def model_bytes(model: keras.Model) -> bytes:
    """`model` as the bytes of a `.keras` file (what every actor loads)."""
    from surgery.graph.taps import deep_graphs

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        with deep_graphs():
            model.save(path)
        with open(path, "rb") as f:
            return f.read()


def _merge(out, spots, total, batches, verbose):
    """Stream the actors' rows into one Moments per spot, under one progress bar."""
    verbose = 1 if verbose == "auto" else int(verbose)
    bar = Progbar(total, verbose=verbose, unit_name="sample") if verbose else None
    totals = [None] * len(spots)
    seen: set[int] = set()
    samples = 0
    iterator = iter(out.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        for block in _unwrapped(iterator):
            for row in range(len(block[BATCH])):
                error = block["error"][row]
                if error:
                    raise SurgeryError(str(error))
                i = int(block[BATCH][row])
                if i >= 0:
                    if i in seen:
                        continue  # a retried batch delivered twice: count it once
                    seen.add(i)
                merge_row(totals, spots, block, row)
                samples += int(block["samples"][row])
                if bar is not None:
                    bar.update(samples)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    if batches is not None and len(seen) != batches:
        missing = sorted(set(range(batches)) - seen)[:5]
        raise SurgeryError(
            f"the Ray pass returned {len(seen)} of {batches} batches (missing: "
            f"{missing}); run it again"
        )
    if batches is None and total is not None and samples != total:
        raise SurgeryError(
            f"the Ray pass returned {samples} of the dataset's {total} rows; run "
            "it again"
        )
    if samples == 0 or any(m is None or m.count == 0 for m in totals):
        raise SurgeryError(
            "data is empty: it produced no samples; pass a non-empty data set"
        )
    if bar is not None and total is None:
        bar.update(samples, finalize=True)
    return totals, samples


def merge_row(totals: list, spots, block: dict, row: int) -> None:
    """Merge one batch's moments (row `row` of an actor's block) into `totals`."""
    from surgery.verbs.stats import _check_finite

    batch = unpack(np.asarray(block[MOMENTS][row], dtype=np.float64))
    for j, (spot, m) in enumerate(zip(spots, batch, strict=True)):
        _check_finite(spot, m, int(block[BATCH][row]))
        totals[j] = m if totals[j] is None else totals[j].merge(m)


def _unwrapped(iterator):
    """Ray's errors as one line; the cause of a user-code error as itself."""
    import ray

    try:
        yield from iterator
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None) or e.__cause__
        raise SurgeryError(f"the Ray pass failed: {first_line(cause or e)}") from e


def _workers(ray, engine: RayEngine) -> int:
    if engine.workers is not None:
        if engine.workers < 1:
            raise SurgeryError(f"workers must be >= 1, got {engine.workers}")
        return engine.workers
    resources = ray.cluster_resources()
    if engine.gpus_per_worker:
        gpus = resources.get("GPU", 0)
        if gpus < engine.gpus_per_worker:
            raise SurgeryError(
                f"the Ray cluster has {gpus:g} GPUs but each worker asks for "
                f"{engine.gpus_per_worker:g}; lower --gpus-per-worker"
            )
        return max(1, int(gpus // engine.gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // engine.cpus_per_worker))


def _connect(engine: RayEngine):
    """The `ray` module, joined to the engine's cluster."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise SurgeryError(
            "engine='ray' needs Ray Data: pip install 'surgery[ray]'"
        ) from None
    if not ray.is_initialized():
        try:
            ray.init(
                address=engine.address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,  # actors' output stays in Ray's logs
            )
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise SurgeryError(
                f"cannot join the Ray cluster at {engine.address or 'RAY_ADDRESS'}: "
                f"{first_line(e)}; start one with `ray start --head` or check the "
                "address"
            ) from None
    return ray


def _configure(context, engine: RayEngine) -> None:
    """One progress bar (ours); Ray retries a batch whose actor raised."""
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.retried_map_errors = True
    context.max_map_retries = engine.retries
    context.execution_options.preserve_order = False


@contextlib.contextmanager
def _quiet_ray_data():
    """Ray Data's info lines (execution started/finished) off during our pass."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
