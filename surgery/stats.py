"""`activation_stats`: per-unit moments of many layers in one streaming pass."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import tree

from surgery.batches import Batches, check_inputs, progress
from surgery.errors import SurgeryError
from surgery.graph import tap_tensors
from surgery.moments import BatchMoments, Moments, from_batch
from surgery.spots import Spot, find_spots


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
) -> dict[str, Moments]:
    """Mean and variance of every unit of the named layers' outputs over `data`.

    One forward pass serves every layer; memory does not grow with the data.
    Keys are the names as given; `before=` names give the statistics of that
    layer's input, keyed `"name:input"`. A shared layer's call sites are pooled.
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
    )
    return {spot.key: m for spot, m in zip(spots, moments, strict=True)}


def spot_moments(model, spots: list[Spot], data, **stream) -> list[Moments]:
    """Moments at each spot, all spots in one pass over `data`."""
    inputs, taps = tap_tensors(model, spots)
    outputs = [BatchMoments(axis=spot.axis)(tensor) for spot, tensor in taps]
    tap_model = keras.Model(inputs, outputs)
    verbose = stream.pop("verbose", "auto")
    batches = Batches(data, **stream)
    totals = {id(s): Moments.empty(_units(t, s)) for s, t in taps}
    for step, x in enumerate(progress(batches, verbose)):
        if step == 0:
            check_inputs(model, x)
        flat = tree.flatten(tap_model.predict_on_batch(x))
        for k, (spot, _) in enumerate(taps):
            batch = from_batch(*flat[3 * k : 3 * k + 3])
            _check_finite(spot, batch, step)
            totals[id(spot)] = totals[id(spot)].merge(batch)
    merged = [totals[id(spot)] for spot in spots]
    if any(m.count == 0 for m in merged):
        raise SurgeryError(
            "data is empty: it produced no samples; pass a non-empty data set"
        )
    return merged


def _units(tensor, spot) -> int:
    units = tensor.shape[spot.axis]
    if units is None:
        raise SurgeryError(
            f"'{spot.spec}' has no fixed number of units on axis {spot.axis}"
        )
    return int(units)


def _check_finite(spot, batch: Moments, step: int) -> None:
    bad = np.flatnonzero(~(np.isfinite(batch.mean) & np.isfinite(batch.m2)))
    if bad.size:
        raise SurgeryError(
            f"layer '{spot.spec}' produced a non-finite activation in unit "
            f"{int(bad[0])} (batch {step}); check the data and the model's weights"
        )
