"""`activation_stats`: per-unit moments of many layers in one streaming pass."""

from __future__ import annotations

from typing import Any

import keras

from surgery.engines.choose import as_engine
from surgery.graph.spots import Spot, find_spots
from surgery.graph.taps import TapPlan
from surgery.numerics.moments import Moments


def activation_stats(
    model: keras.Model,
    layers: list[str] | str | None = None,
    data: Any = None,
    *,
    before: list[str] | str | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    max_samples: int | None = None,
    verbose: int | str = "auto",
    engine: Any = None,
) -> dict[str, Moments]:
    """Mean and variance of every unit of the named layers' outputs over `data`.

    One forward pass serves every layer; memory does not grow with the data.
    Keys are the names as given; `before=` names give the statistics of that
    layer's input, keyed `"name:input"`. A shared layer's call sites are pooled.
    `engine="ray"` (or a `surgery.RayEngine`) runs the pass on a Ray cluster;
    None or `"local"` runs it in this process.
    """
    spots = find_spots(model, after=layers, before=before)
    moments = spot_moments(
        model,
        spots,
        data,
        batch_size=batch_size,
        steps=steps,
        max_samples=max_samples,
        verbose=verbose,
        engine=engine,
    )
    return {spot.key: m for spot, m in zip(spots, moments, strict=True)}


def spot_moments(
    model,
    spots: list[Spot],
    data,
    first_batch: list | None = None,
    engine=None,
    **stream,
) -> list[Moments]:
    """Moments at each spot, all spots in one pass over `data` on `engine`.

    The pass's first batch is appended to `first_batch` when one is given
    and the engine reads the batches in this process.
    """
    with as_engine(engine).session(model, data, **stream) as session:
        moments, _ = session.moments(TapPlan.of(spots), first_batch)
    return moments
