"""recalibrate_bn in exact mode on Ray, ResNet50: wall time and actor starts.

    python -m benchmarks.ray_recalibrate LEVELS SAMPLES BATCH

measures the BNs of the first LEVELS BN levels (49: all 53 BNs) over SAMPLES
random 224x224 images in batches of BATCH, with 2 workers on a local Ray
cluster of 2 CPUs. Every level is one pass; the pool of actors serves all.
"""

import sys
import time

import keras
import numpy as np
import ray

import surgery
from surgery.engines.ray_pool import ActorPool
from surgery.testing.synthetic import pretrained_like
from surgery.verbs.fold import bn_sites
from surgery.verbs.recalibrate import bn_levels


def main(argv: list[str]) -> None:
    levels, samples, batch = (int(a) for a in argv)
    model = pretrained_like(keras.applications.ResNet50(weights=None))
    sites = bn_sites(model)
    level = bn_levels(model, {id(s.layer) for s in sites})
    names = [s.path for s in sites if level[id(s.layer)] <= levels]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (samples, 224, 224, 3)).astype("float32")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        started = ActorPool.started
        start = time.perf_counter()
        surgery.recalibrate_bn(
            model,
            x,
            names,
            mode="exact",
            batch_size=batch,
            verbose=0,
            engine=surgery.RayEngine(workers=2),
        )
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    print(
        f"levels={levels} bns={len(names)} samples={samples} batch={batch} "
        f"seconds={seconds:.1f} per_level={seconds / levels:.1f} "
        f"actor_starts={ActorPool.started - started}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
