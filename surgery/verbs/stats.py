"""`activation_stats`: per-unit moments of many layers in one streaming pass."""

from __future__ import annotations

from typing import Any

import keras

from surgery.engines.choose import as_engine
from surgery.graph.spots import Spot, find_spots
from surgery.graph.tap_models import TapPlan
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
    """Moments at each spot, all spots in one pass over `data` on `engine`.

    The pass's first batch is appended to `first_batch` when one is given
    and the engine reads the batches in this process.
    """
    with as_engine(engine).session(model, data, **stream) as session:
        moments, _ = session.moments(TapPlan.of(spots), first_batch)
    return moments
