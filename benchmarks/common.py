"""Shared helpers: environment, interleaved timing, models and taps."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import keras
import numpy as np

from surgery.graph.spots import CONV_LAYERS, layer_paths

L = keras.layers


def conv_dense_taps(model) -> list[str]:
    """Names of every Conv/Dense layer of a flat model, in graph order."""
    return layer_paths(model, (keras.layers.Dense, *CONV_LAYERS))


def dense_head(seed: int = 0) -> keras.Model:
    """VGG16's dense head on 25088-d features, with random weights."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((25088,)),
            L.Dense(4096, activation="relu", name="fc1"),
            L.Dense(4096, activation="relu", name="fc2"),
            L.Dense(1000, activation="softmax", name="predictions"),
        ],
        name="vgg16_head",
    )


def features(n: int, seed: int = 0) -> np.ndarray:
    """Non-negative 25088-d features, like VGG16's pooled conv output."""
    rng = np.random.default_rng(seed)
    return np.abs(rng.standard_normal((n, 25088), dtype=np.float32))


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Uniform 0..255 RGB images."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, size, size, 3)).astype("float32")


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict:
    """Seconds per call of each function, repeats interleaved (A,B,B,A,...).

    Each function is called once first as a warm-up (tracing, compilation,
    caches), which is not timed. Even repeats run in the given order, odd
    repeats in reverse, so drift in machine load hits every function alike.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            gc.collect()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_row(
    section: str,
    name: str,
    times: dict[str, list[float]],
    a: str,
    b: str,
    target: float | None,
    **extra,
) -> dict:
    """A row comparing `a` with `b`: the median of the per-repeat ratios."""
    ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
    ratio = statistics.median(ratios)
    return {
        "section": section,
        "name": name,
        "measured": f"{a} / {b}",
        "ratio": ratio,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "target": target,
        "met": None if target is None else ratio <= target,
        "a_median_s": statistics.median(times[a]),
        "b_median_s": statistics.median(times[b]),
        "repeats": len(ratios),
        **extra,
    }


def free_memory() -> None:
    keras.backend.clear_session()
    gc.collect()
