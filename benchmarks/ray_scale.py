"""The Ray engine: its overhead against the in-process pass, and a scaling model.

    python -m benchmarks.ray_scale [--samples N] [--repeats R] [--workers W]

Writes benchmarks/ray_results.json and prints a Markdown summary. Needs
`pip install 'surgery[ray]'`. Starts a local Ray cluster on 2 CPUs.

Measured, for the VGG16 trunk at 32x32 with its 13 Conv2D taps:

- the pass end to end, in-process (warm tap model) and on Ray (the cluster
  already up, as after `ray start`; each pass starts its actors: TensorFlow
  import, model load, tracing), interleaved;
- the Ray pass's fixed cost (a pass over one batch) and so its per-batch
  cost in steady state;
- the parts of the scaling model: the driver's merge of one batch's moments,
  the serialisation of one batch's moments (numpy -> Arrow block -> object
  store -> numpy), and the rate at which the driver takes batches when the
  actors cost nothing (a pool of actors returning canned moments).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import surgery  # noqa: E402
from benchmarks.common import conv_dense_taps, images  # noqa: E402
from benchmarks.run import machine  # noqa: E402

HERE = Path(__file__).resolve().parent
BATCH = 32


class CannedActor:
    """Returns the same moments for every batch at once: only Ray and the driver work."""

    def __init__(self, units):
        self.block = canned_block(units)

    def __call__(self, rows):
        out = {k: v.copy() for k, v in self.block.items()}
        out["batch"][:] = rows["batch"]
        return out


def canned_block(units: list[int]) -> dict:
    """An actor's output for one batch, with the VGG16 trunk's tap widths."""
    from surgery.engines.ray_actor import _empty_output, pack
    from surgery.numerics.moments import Moments

    rng = np.random.default_rng(0)
    block = _empty_output(1, units)
    block["moments"][0] = pack(
        [Moments(BATCH * 16, rng.random(u), rng.random(u) + 1) for u in units]
    )
    block["samples"][:] = BATCH
    return block


class _Spot:
    spec, side = "canned", "after"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "ray_results.json"))
    parser.add_argument(
        "--parts-only",
        action="store_true",
        help="measure the scaling model's parts only; keep the pass times in --out",
    )
    args = parser.parse_args(argv)

    import ray

    info = machine()
    info["ray"] = ray.__version__
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = Path(args.out)
    try:
        if args.parts_only:
            results = json.loads(out.read_text())
            results["parts_machine"] = info
            results.update(parts(ray, results["units_per_tap"]))
            results.update(model_from(results))
        else:
            results = {"machine": info, **passes(args)}
            out.write_text(json.dumps(results, indent=2) + "\n")  # kept if parts fail
            results.update(parts(ray, results["units_per_tap"]))
            results.update(model_from(results))
    finally:
        ray.shutdown()
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))
    return 0


def passes(args) -> dict:
    """The pass end to end: in-process vs Ray, and Ray over one batch."""
    model = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    layers = conv_dense_taps(model)
    x = images(args.samples, 32)
    engine = surgery.RayEngine(workers=args.workers)

    def local():
        return surgery.activation_stats(model, layers, x, verbose=0)

    def on_ray(data=x):
        return surgery.activation_stats(model, layers, data, verbose=0, engine=engine)

    surgery.activation_stats(model, layers, x[:BATCH], verbose=0)  # trace, cache
    times = {"in-process": [], "ray": [], "ray, one batch": []}
    for r in range(args.repeats):
        order = [local, on_ray] if r % 2 == 0 else [on_ray, local]
        for fn in order:
            start = time.perf_counter()
            fn()
            times["in-process" if fn is local else "ray"].append(
                time.perf_counter() - start
            )
        start = time.perf_counter()
        on_ray(x[:BATCH])
        times["ray, one batch"].append(time.perf_counter() - start)
        print(
            f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items())
        )
    return {
        "samples": args.samples,
        "batch_size": BATCH,
        "batches": -(-args.samples // BATCH),
        "taps": len(layers),
        "units_per_tap": [int(model.get_layer(n).output.shape[-1]) for n in layers],
        "workers": args.workers,
        "seconds": times,
    }


def parts(ray, units: list[int]) -> dict:
    """The driver's costs per batch: merge, serialisation, and its top rate."""
    from surgery.engines import ray_engine
    from surgery.engines.ray_actor import unpack
    from surgery.numerics.moments import Totals

    block = canned_block(units)
    spots = [_Spot()] * len(units)

    def merge_row():
        moments = unpack(block["moments"][0])
        Totals(spots).add(moments, range(len(moments)), 0, BATCH)

    merge_s = _per_call(merge_row, 2000)
    return {
        "units": sum(units),
        "driver_merge_per_batch_s": merge_s,
        "serialise_per_batch_s": _per_call(lambda: _round_trip(ray, block), 300),
        "driver_batches_per_s": _driver_rate(ray, ray_engine, units, batches=2000),
    }


def model_from(r: dict) -> dict:
    """Overheads and the worker count at which the driver is the bound."""
    times = r["seconds"]
    median = {k: statistics.median(v) for k, v in times.items()}
    fixed = median["ray, one batch"]
    local_batch = median["in-process"] / r["batches"]
    ray_batch = max(median["ray"] - fixed, 1e-9) / r["batches"]
    worker_batch = ray_batch * r["workers"]  # one actor's time per batch
    return {
        "overhead_end_to_end": median["ray"] / median["in-process"],
        "ratios_end_to_end": [
            a / b for a, b in zip(times["ray"], times["in-process"], strict=True)
        ],
        "fixed_cost_s": fixed,
        "overhead_steady_state": ray_batch / local_batch,
        "in_process_batch_s": local_batch,
        "worker_batch_s": worker_batch,
        "workers_at_driver_bound": worker_batch * r["driver_batches_per_s"],
    }


def _per_call(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def _round_trip(ray, block):
    from ray.data.block import BlockAccessor

    arrow = BlockAccessor.batch_to_block(block)
    back = ray.get(ray.put(arrow))
    return BlockAccessor.for_block(back).to_batch_format("numpy")


def _driver_rate(ray, ray_engine, units, batches: int) -> float:
    """Batches per second the driver takes when the actors cost nothing."""
    items = [{"batch": i, "take": BATCH} for i in range(batches)]
    ds = ray.data.from_items(items, override_num_blocks=200)
    out = ds.map_batches(
        CannedActor,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5,
        fn_constructor_kwargs={"units": units},
    )
    from surgery.engines import ray_cluster

    ray_cluster.configure(out.context, surgery.RayEngine())
    spots = [_Spot()] * len(units)

    with ray_cluster.quiet_ray_data():
        start = time.perf_counter()
        blocks = iter(out.iter_batches(batch_size=None, batch_format="numpy"))
        totals, _ = ray_engine.merge_blocks(blocks, spots, None, batches, 0)
        elapsed = time.perf_counter() - start
    assert totals[0].count == batches * BATCH * 16  # canned_block's count
    # Startup (two light actors) is in `elapsed` too: a lower bound on the rate.
    return batches / elapsed


def summary(r: dict) -> str:
    ms = 1e3
    return "\n".join(
        [
            f"VGG16 trunk 32x32, {r['taps']} taps, {r['samples']} samples, "
            f"batch {r['batch_size']}, {r['workers']} workers on 2 CPUs",
            "",
            "| figure | value |",
            "|---|---|",
            f"| Ray pass vs in-process, end to end (target <= 1.3x) | "
            f"{r['overhead_end_to_end']:.2f}x "
            f"({', '.join(f'{x:.2f}' for x in r['ratios_end_to_end'])}) |",
            f"| Ray fixed cost per pass (actor start, model load, trace) | "
            f"{r['fixed_cost_s']:.1f} s |",
            f"| Ray vs in-process per batch, steady state | "
            f"{r['overhead_steady_state']:.2f}x |",
            f"| in-process time per batch (2 cores) | "
            f"{r['in_process_batch_s'] * ms:.1f} ms |",
            f"| one worker's time per batch (1 CPU) | "
            f"{r['worker_batch_s'] * ms:.1f} ms |",
            f"| driver: merge one batch's moments ({r['units']} units) | "
            f"{r['driver_merge_per_batch_s'] * ms:.3f} ms |",
            f"| serialise one batch's moments (Arrow, object store, back) | "
            f"{r['serialise_per_batch_s'] * ms:.3f} ms |",
            f"| driver throughput with free actors | "
            f"{r['driver_batches_per_s']:.0f} batches/s |",
            f"| workers at which the driver is the bound | "
            f"{r['workers_at_driver_bound']:.0f} |",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
