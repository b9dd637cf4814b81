"""`activation_stats`: per-unit moments of many layers in one streaming pass."""

from __future__ import annotations

import weakref
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
from surgery.errors import SurgeryError
from surgery.graph.spots import Spot, find_spots, graph_of
from surgery.graph.tap_ids import tap_ident, tap_units
from surgery.graph.taps import deep_graphs, tap_tensors
from surgery.numerics.moments import BatchMoments, Moments, float64_enabled, from_batch

# Compiled tap models by model and spots. Tracing a tap model's predict
# function costs more than streaming a few hundred samples through it (2/3 of
# a ResNet50 pass over 256 samples at 32x32), so a second pass over the same
# spots (another shard, a repeat) reuses it. Weak keys: the cache never keeps
# a model alive.
_TAP_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TAP_MODELS_PER_MODEL = 4


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

    One forward pass serves every layer, and memory does not grow with the
    data: each batch is reduced in float64 on the device and merged exactly on
    the host (see `surgery.Moments`), so the result does not depend on batch
    size or order. A shared layer's call sites are pooled. The result can be
    saved, merged with other shards' (`Moments.merge`) and passed to
    `insert_identity_bn(stats=...)`.

    Args:
        model: The Functional or Sequential `keras.Model` to measure. A
            subclassed model has no graph to tap: trace it with
            `surgery.functional` first.
        layers: Name(s) of the layers whose outputs to measure. A layer in a
            nested model is named by its path (`"vgg16/fc1"`), one output of a
            multi-output layer as `"name:index"`; a string is one name.
            Defaults to `None` (no layer).
        data: The model inputs: anything `model.predict` accepts as `x`
            (NumPy arrays, a list or dict of them for several inputs, a
            `tf.data.Dataset`, a `keras.utils.PyDataset`, a generator), or a
            path or on-disk array that `surgery.sources.open_source` opens
            (image folder, `.npy`, `.npz`, `.h5`, zarr, bcolz). Labels in
            `(x, y)` or `(x, y, sample_weight)` batches are ignored. It is
            read one batch at a time, never whole.
        before: Name(s) of layers whose input to measure instead (the layer
            must take one input), keyed `"name:input"` in the result. Named
            as for `layers`. Defaults to `None` (no layer). `layers` and
            `before` together must name at least one layer.
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
        engine: Where the pass over the data runs. `None` (the default) or
            `"local"`: in this process. `"ray"`, or a `surgery.RayEngine`
            saying which cluster and how many workers: in a pool of Ray
            actors (needs `pip install 'surgery[ray]'`).

    Returns:
        A dict from each name as given (and `"name:input"` for each name in
        `before`) to its `surgery.Moments`: the count of values per unit, and
        the per-unit mean and sum of squared deviations (`.var` and `.std`
        derive from them), in float64. Units are on the channel axis the BN
        would normalise (the last one, or axis 1 for `channels_first`).

    Raises:
        SurgeryError: `layers` and `before` name no layer, a name is not a
            layer of the model (the message suggests close names), names an
            `InputLayer`, a non-Layer operation or a multi-output layer
            without `:index`, `before` names a layer with several inputs, or
            a layer and `before` name the same spot; the model is subclassed
            or a Sequential model without an input shape; a layer has no
            fixed number of units; the data is missing, unreadable, empty,
            does not fit the model's inputs, or it or an activation holds
            NaN or inf; `max_samples` is below 1; or `engine` is not one of
            the values above.

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
    stats = surgery.activation_stats(model, ["fc1"], x, before="fc1", verbose=0)
    print(sorted(stats), stats["fc1"].count, stats["fc1"].mean.shape)
    # ['fc1', 'fc1:input'] 256 (16,)
    new = surgery.insert_identity_bn(model, after=["fc1"], stats=stats)
    ```
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
    """Moments at each spot, all spots in one pass over `data`.

    The pass's first batch is appended to `first_batch` when one is given
    (in-process passes only).
    """
    if engine not in (None, "local"):
        from surgery.engines import ray_engine

        return ray_engine.spot_moments(
            model, spots, data, ray_engine.as_engine(engine), **stream
        )
    tap_model, tapped = _tap_model(model, spots)
    by_ident = {tap_ident(spot): spot for spot in spots}
    taps = [by_ident[ident] for ident in tapped]  # a shared layer: several taps
    verbose = stream.pop("verbose", "auto")
    batches = Batches(data, model=model, **stream)
    totals, _ = merge_moments(model, tap_model, taps, batches, verbose, first_batch)
    return [totals[id(spot)] for spot in spots]


def moments_model(model, spots: list[Spot], collector=None):
    """A model from `model`'s inputs to a (count, mean, M2) triple per tap.

    Returns it and the spot of each tap (a shared layer is tapped once per
    call site). `collector` (a `graph.TapCollector`) decides how the graph
    runs on the way to the taps.
    """
    inputs, taps = tap_tensors(model, spots, collector)
    for spot, tensor in taps:
        tap_units(tensor, spot)
    outputs = [BatchMoments(axis=spot.axis)(tensor) for spot, tensor in taps]
    with deep_graphs():
        tap_model = keras.Model(inputs, outputs)
    return tap_model, [spot for spot, _ in taps]


def merge_moments(
    model, tap_model, taps: list[Spot], batches, verbose, first_batch=None
):
    """One pass of `batches` through `tap_model`, moments merged per spot.

    Returns `{id(spot): Moments}` (the taps of one spot pooled) and the
    number of samples seen. The first batch is appended to `first_batch`
    when one is given.
    """
    totals: dict[int, Moments] = {}
    samples = 0
    for step, x in enumerate(progress(batches, verbose, "statistics")):
        if step == 0:
            check_inputs(model, x)
            if first_batch is not None:
                first_batch.append(x)
        check_finite_inputs(x, step)
        with float64_enabled():
            flat = tree.flatten(tap_model.predict_on_batch(x))
        merge_batch(totals, taps, flat, step)
        samples += batch_length(x)
    if samples == 0 or any(m.count == 0 for m in totals.values()):
        raise SurgeryError(
            "data is empty: it produced no samples; pass a non-empty data set"
        )
    return totals, samples


def merge_batch(totals: dict, taps: list[Spot], flat: list, step: int) -> None:
    """Merge one batch's (count, mean, M2) triples, the first `3 * len(taps)`
    of a moments model's flat outputs, into `totals` by spot id."""
    for k, spot in enumerate(taps):
        batch = from_batch(*flat[3 * k : 3 * k + 3])
        _check_finite(spot, batch, step)
        total = totals.get(id(spot))
        totals[id(spot)] = batch if total is None else total.merge(batch)


def _tap_model(model, spots: list[Spot]) -> tuple[keras.Model, list]:
    """The (cached) moments model and the identity of each of its taps."""
    graph = graph_of(model)  # a Sequential gets a new graph when it changes
    cache = _TAP_MODELS.setdefault(model, {})
    key = tuple(tap_ident(spot) for spot in spots)
    hit = cache.get(key)
    if hit is not None and hit[0]() is graph:
        return hit[1:]
    tap_model, taps = moments_model(model, spots)
    entry = (weakref.ref(graph), tap_model, [tap_ident(spot) for spot in taps])
    cache.pop(key, None)
    while len(cache) >= _TAP_MODELS_PER_MODEL:
        cache.pop(next(iter(cache)))  # the oldest
    cache[key] = entry
    return entry[1:]


def _check_finite(spot, batch: Moments, step: int) -> None:
    bad = np.flatnonzero(~(np.isfinite(batch.mean) & np.isfinite(batch.m2)))
    if bad.size:
        where = (
            f"layer '{spot.spec}' produced a non-finite activation"
            if spot.side == "after"
            else f"the input of '{spot.spec}' has a non-finite value"
        )
        raise SurgeryError(
            f"{where} in unit {int(bad[0])} (batch {step}); check the data and "
            "the model's weights"
        )
