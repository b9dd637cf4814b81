"""`insert_identity_bn`: BatchNormalization spliced in without changing outputs."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import keras
import numpy as np
from keras import backend

from surgery.data.batches import first_batch
from surgery.errors import SurgeryError
from surgery.graph.edits import insert_at
from surgery.graph.fusion import isolating_policy, needs_cast_back
from surgery.graph.naming import names_by_scope, unique_name
from surgery.graph.rewrite import rewrite
from surgery.graph.spots import find_spots
from surgery.numerics.identity_policy import bn_policy, calibrate
from surgery.numerics.moments import Moments
from surgery.validate import check_epsilon, check_moments, check_momentum
from surgery.verbs.insert_check import TORCH_MEAN, ZERO_MEAN, check_mode, checked
from surgery.verbs.stats import spot_moments


def insert_identity_bn(
    model: keras.Model,
    after: list[str] | str | None = None,
    before: list[str] | str | None = None,
    data: Any = None,
    *,
    stats: dict[str, Moments] | None = None,
    epsilon: float = 1e-3,
    momentum: float = 0.99,
    batch_size: int | None = None,
    steps: int | None = None,
    max_samples: int | None = None,
    verbose: int | str = "auto",
    bn_dtype: str | keras.DTypePolicy | None = None,
    check: bool | str = True,
    engine: Any = None,
    zero_mean: bool = False,
) -> keras.Model:
    """A new model with BatchNormalization after/before the named layers.

    Each BN is initialised from the activation statistics over `data` (or
    from `stats` computed earlier by `activation_stats`) so that at inference
    the new model's outputs are bit-identical to the original's: the BN starts
    as an exact identity, ready to be fine-tuned. BN layers are named
    `<layer>_bn` (after) and `<layer>_pre_bn` (before); a name already taken
    gets a `_1`, `_2`, ... suffix. The input model is not modified and shares
    no variables with the result.

    Each BN takes the dtype policy of the layer it follows (or precedes):
    float32, float64 and mixed policies keep their variable dtype. For
    16-bit variables (a `float16` or `bfloat16` policy) the BN gets the same
    16-bit variables when every unit has a proven-exact 16-bit identity, and
    otherwise float32 ones (`mixed_<dtype>`, computing in 16 bits) so the
    outputs stay identical; a warning names those layers.

    On TensorFlow a BN after a float32 layer gets float64 variables and
    arithmetic, followed by a float32 `Identity` (`<bn>_cast`) where its
    consumers would not cast back to float32 themselves (a model output, a
    non-Layer op, an existing BN): compiled inference rewrites
    (re-associates, fuses) float32 ops around a float32 BN, but not across
    the casts of a float64 one (see `surgery.graph.fusion`).

    Keras' torch backend computes BN as `(x - mean) * inv + beta`, which
    rounds `x - mean`, so there the measured moving mean costs a few ulps
    (a warning says so); `zero_mean=True` avoids it.

    Args:
        model: The Functional or Sequential `keras.Model` to change. A
            subclassed model has no graph to rewrite: trace it with
            `surgery.functional` first.
        after: Name(s) of the layers to put a BN after, on their output
            (every consumer of that output is rewired to the BN). A layer in
            a nested model is named by its path (`"vgg16/fc1"`), one output
            of a multi-output layer as `"name:index"`; a string is one name.
            Defaults to `None` (no layer).
        before: Name(s) of the layers to put a BN before, on their input and
            for that layer only; each must take one input. Named as for
            `after`. Defaults to `None` (no layer). `after` and `before`
            together must name at least one layer.
        data: The model inputs: anything `model.predict` accepts as `x`
            (NumPy arrays, a list or dict of them for several inputs, a
            `tf.data.Dataset`, a `keras.utils.PyDataset`, a generator), or a
            path or on-disk array that `surgery.sources.open_source` opens
            (image folder, `.npy`, `.npz`, `.h5`, zarr, bcolz). Labels in
            `(x, y)` or `(x, y, sample_weight)` batches are ignored. It is
            read one batch at a time, never whole. Here the BN statistics are
            measured on it; with `stats` given it is optional and only its
            first batch is read, for `check`.
        stats: Statistics measured earlier, as `activation_stats` returns
            them: a dict from each name in `after` (and `"name:input"` for
            each name in `before`) to its `surgery.Moments`. When given,
            `data` is not measured. Defaults to `None`: measure on `data`.
        epsilon: The BNs' `epsilon`, a finite number > 0. The identity is
            exact for any value. Defaults to `1e-3`, Keras' default.
        momentum: The BNs' `momentum`, in [0, 1]; it only matters once the
            new model is trained. Defaults to `0.99`, Keras' default.
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
        bn_dtype: A dtype policy, or its name (`"float32"`,
            `"mixed_float16"`, ...), forced on every new BN. Units it cannot
            make exact get the nearest values, with a warning. Defaults to
            `None`: each BN's policy is chosen as described above.
        check: Compare the new model with the original on the first batch of
            `data`, and on a difference try all-float32 BNs instead of float64
            ones, keeping them if exact; a difference that remains is warned
            about with the CPU kind, the spots and the settings involved.
            `True` (the default) compares in the mode `model.predict` runs in
            on this machine (XLA for a model compiled with
            `jit_compile=True`); `"auto"` is the same; `"eager"`, `"graph"`
            or `"xla"` compare in that mode; `False` skips the check.
        engine: Where the pass over the data runs. `None` (the default) or
            `"local"`: in this process. `"ray"`, or a `surgery.RayEngine`
            saying which cluster and how many workers: in a pool of Ray
            actors (needs `pip install 'surgery[ray]'`).
        zero_mean: Store `moving_mean = beta = 0` instead of the measured
            mean: an exact identity at inference on every backend, torch
            included. The moving mean then starts at 0 rather than the
            measured mean, and in training mode the BN outputs `x` minus the
            batch mean (`beta` is 0). Defaults to `False`.

    Returns:
        A new, uncompiled `keras.Model` of the same kind (Functional or
        Sequential) with the BN layers spliced in and the original's weights
        copied.

    Raises:
        SurgeryError: `after` and `before` name no layer, a name is not a
            layer of the model (the message suggests close names), names an
            `InputLayer`, a non-Layer operation or a multi-output layer
            without `:index`, `before` names a layer with several inputs, or
            `after` and `before` name the same spot; the model is subclassed
            or a Sequential model without an input shape; neither `data` nor
            `stats` is given; `stats` lacks a name, is corrupt (count below 1,
            negative or non-finite values) or has another number of units
            than the layer; the data is unreadable, empty, does not fit the
            model's inputs, or it or an activation holds NaN or inf;
            `epsilon`, `momentum`, `max_samples` or `check` is out of range;
            a BN would compute in float64 off the TensorFlow backend; or
            `engine` is not one of the values above.

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
    new = surgery.insert_identity_bn(model, after=["fc1"], data=x, verbose=0)
    print([layer.name for layer in new.layers])  # ['fc1', 'fc1_bn', 'fc2']
    assert surgery.verify(model, new, x, verbose=0).identical
    ```
    """
    check_epsilon(epsilon)
    check_momentum(momentum)
    mode = check_mode(model, check)
    spots = find_spots(model, after=after, before=before)
    _check_backend_computes(spots, bn_dtype)
    sample: list = []
    if stats is None:
        if data is None:
            raise SurgeryError("pass data=... to measure activations, or stats=...")
        moments = spot_moments(
            model,
            spots,
            data,
            first_batch=sample,
            batch_size=batch_size,
            steps=steps,
            max_samples=max_samples,
            verbose=verbose,
            engine=engine,
        )
    else:
        moments = [_lookup_stats(stats, spot) for spot in spots]
        if data is not None and mode:
            x = first_batch(model, data, batch_size)
            sample = [] if x is None else [x]
    if zero_mean:
        moments = [Moments(m.count, np.zeros_like(m.mean), m.m2) for m in moments]
    rounds_mean = backend.backend() == "torch" and not zero_mean

    build = functools.partial(
        _build, model, spots, moments, epsilon, momentum, bn_dtype
    )
    new, notes = build(isolate=bn_dtype is None)
    if sample and mode:
        new, notes = checked(
            model, new, notes, spots, sample[0], build, mode, bn_dtype is None
        )
    if rounds_mean and not any(n.startswith(TORCH_MEAN) for n in notes):
        notes.append(f"{TORCH_MEAN} by a few ulps on some inputs; {ZERO_MEAN}")
    for message in notes:
        warnings.warn(message, stacklevel=2)
    return new


def _build(model, spots, moments, epsilon, momentum, bn_dtype, isolate):
    """The rebuilt model and the warnings it calls for.

    `isolate` gives a BN float64 where `fusion.isolating_policy` allows.
    """
    taken = names_by_scope(model)
    widened = []
    calibrated = {}  # spot id -> IdentityWeights already found for its policy
    policies = {}
    isolated = set()  # ids of spots given float64 to keep compilers out
    for spot, m in zip(spots, moments, strict=True):
        isolating = isolating_policy(spot) if isolate else None
        if isolating is not None:
            policy, weights = keras.DTypePolicy(isolating), None
            isolated.add(id(spot))
        else:
            policy, weights = bn_policy(spot.layer, bn_dtype, m, epsilon, spot.spec)
        policies[id(spot)] = policy
        if weights is not None:
            calibrated[id(spot)] = weights
    calibrated.update(calibrate(spots, moments, policies, calibrated, epsilon))
    made = {}  # spot id -> the BN and its own initializers, put back after

    def make_bn(spot, tensor):
        m = moments[spots.index(spot)]
        units = tensor.shape[spot.axis]
        if units != m.units:
            raise SurgeryError(
                f"stats for '{spot.key}' have {m.units} "
                f"units but the layer has {units}; recompute them for this model"
            )
        name = unique_name(spot.bn_name, taken.setdefault(spot.scope, set()))
        policy = policies[id(spot)]
        widening = policy is not spot.layer.dtype_policy and bn_dtype is None
        if widening and id(spot) not in isolated:
            widened.append(name)
        bn = keras.layers.BatchNormalization(
            axis=spot.axis,
            epsilon=epsilon,
            momentum=momentum,
            name=name,
            dtype=policy,
        )
        made[id(spot)] = bn, _build_with(bn, calibrated[id(spot)])
        if id(spot) in isolated and needs_cast_back(model, spot):
            cast = keras.layers.Identity(
                name=unique_name(f"{name}_cast", taken[spot.scope]), dtype="float32"
            )
            return [bn, cast]
        return bn

    new = rewrite(model, [insert_at(s, functools.partial(make_bn, s)) for s in spots])
    notes = []
    for spot in spots:
        bn, initializers = made[id(spot)]
        for name, value in zip(_INITIALIZERS, initializers, strict=True):
            setattr(bn, name, value)
        weights = calibrated[id(spot)]
        if weights.inexact_units.size:
            notes.append(
                f"{bn.name}: {weights.inexact_units.size} unit(s) have no exact "
                f"identity pair (first: {weights.inexact_units[:5].tolist()}); "
                "they use the nearest values"
            )
    if widened:
        notes.append(
            f"{len(widened)} BN layer(s) keep float32 variables because 16-bit "
            f"ones cannot hold an exact identity for some units (first: "
            f"{widened[:3]}); pass bn_dtype=... to force a policy"
        )
    return new, notes


def _check_backend_computes(spots, bn_dtype) -> None:
    """Refuse float64 BNs where Keras' BN would compute them in float32.

    Off TensorFlow, Keras' type promotion maps 64-bit results to 32 bits, so
    `BatchNormalization` rounds a float64 input to float32 whatever its
    dtype: no such BN returns its input unchanged.
    """
    if backend.backend() == "tensorflow":
        return
    for spot in spots:
        policy = keras.DTypePolicy(bn_dtype) if bn_dtype else spot.layer.dtype_policy
        if policy.compute_dtype == "float64":
            raise SurgeryError(
                f"'{spot.spec}' computes in float64, and Keras' BatchNormalization "
                f"on {backend.backend()} computes in float32 whatever its dtype, so "
                "no BN there returns its input unchanged; convert float64 models "
                "on the TensorFlow backend"
            )


_INITIALIZERS = (
    "gamma_initializer",
    "beta_initializer",
    "moving_mean_initializer",
    "moving_variance_initializer",
)


def _build_with(bn, weights) -> list:
    """Make `bn` create its variables holding `weights` when it is built.

    Creating them with their final values saves creating them with zeros
    and ones and then assigning. Returns the layer's own initializers, which
    the caller puts back after the build so that its config stays plain.
    """
    own = [getattr(bn, name) for name in _INITIALIZERS]
    for name, value in zip(_INITIALIZERS, weights.as_list(), strict=True):
        setattr(bn, name, value)  # Keras takes an array as an initializer
    return own


def _lookup_stats(stats, spot) -> Moments:
    if spot.key not in stats:
        raise SurgeryError(
            f"stats has no entry '{spot.key}'; compute it with activation_stats"
            f"(model, ['{spot.spec}'], data)"
        )
    check_moments(stats[spot.key], spot.key)
    return stats[spot.key]
