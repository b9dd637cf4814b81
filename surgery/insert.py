"""`insert_identity_bn`: BatchNormalization spliced in without changing outputs."""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np

from surgery.errors import SurgeryError
from surgery.graph import Rebuilder
from surgery.identity import LOW_PRECISION, identity_weights, many_identity_weights
from surgery.moments import Moments
from surgery.spots import find_spots, graph_of, is_graph_model
from surgery.stats import spot_moments


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
    zero_mean: bool = False,
) -> keras.Model:
    """A new model with BatchNormalization after/before the named layers.

    Each BN is initialised from the activation statistics over `data` (or
    from `stats` computed earlier by `activation_stats`) so that at inference
    the new model's outputs are bit-identical to the original's. BN layers are
    named `<layer>_bn` (after) and `<layer>_pre_bn` (before); a name already
    taken gets a `_1`, `_2`, ... suffix. The input model is not modified and
    shares no variables with the result.

    Each BN takes the dtype policy of the layer it follows (or precedes):
    float32, float64 and mixed policies keep their variable dtype. For
    16-bit variables (a `float16` or `bfloat16` policy) the BN gets the same
    16-bit variables when every unit has a proven-exact 16-bit identity, and
    otherwise float32 ones (`mixed_<dtype>`, computing in 16 bits) so the
    outputs stay identical; a warning names those layers. `bn_dtype` forces a
    policy on every BN; units it cannot make exact get the nearest values and
    a warning.

    Keras' torch backend computes BN as `(x - mean) * inv + beta`, which
    rounds `x - mean`, so there the measured moving mean costs a few ulps
    (a warning says so). `zero_mean=True` stores `moving_mean = beta = 0`
    instead, an exact identity at inference on every backend; the moving
    mean then starts at 0 rather than the measured mean, and in training
    mode the BN outputs `x` minus the batch mean (`beta` is 0).
    """
    spots = find_spots(model, after=after, before=before)
    if stats is None:
        if data is None:
            raise SurgeryError("pass data=... to measure activations, or stats=...")
        moments = spot_moments(
            model,
            spots,
            data,
            batch_size=batch_size,
            steps=steps,
            max_samples=max_samples,
            verbose=verbose,
        )
    else:
        moments = [_lookup_stats(stats, spot) for spot in spots]
    if zero_mean:
        moments = [Moments(m.count, np.zeros_like(m.mean), m.m2) for m in moments]
    elif keras.backend.backend() == "torch":
        warnings.warn(
            "torch backend: Keras computes BN as (x - mean) * inv + beta, so "
            "outputs can differ by a few ulps; pass zero_mean=True for "
            "bit-identical outputs (moving mean and beta 0)",
            stacklevel=2,
        )

    taken = _names_by_scope(model)
    widened = []
    calibrated = {}  # spot id -> IdentityWeights already found for its policy

    def make_bn(spot, tensor):
        m = moments[spots.index(spot)]
        units = tensor.shape[spot.axis]
        if units != m.units:
            raise SurgeryError(
                f"stats for '{spot.key}' have {m.units} "
                f"units but the layer has {units}; recompute them for this model"
            )
        name = _unique(spot.bn_name, taken.setdefault(spot.scope, set()))
        policy, weights = _bn_policy(spot.layer, bn_dtype, m, epsilon, spot.spec)
        if weights is not None:
            calibrated[id(spot)] = weights
        if policy is not spot.layer.dtype_policy and bn_dtype is None:
            widened.append(name)
        return keras.layers.BatchNormalization(
            axis=spot.axis,
            epsilon=epsilon,
            momentum=momentum,
            name=name,
            dtype=policy,
        )

    rebuilder = Rebuilder(spots, make_bn)
    new = rebuilder.rebuild(model)
    rebuilder.copy_weights()
    bns = [rebuilder.bn_layers[id(spot)] for spot in spots]
    calibrated.update(_calibrate(spots, moments, bns, calibrated, epsilon))
    for spot, bn in zip(spots, bns, strict=True):
        weights = calibrated[id(spot)]
        bn.set_weights(weights.as_list())
        if weights.inexact_units.size:
            warnings.warn(
                f"{bn.name}: {weights.inexact_units.size} unit(s) have no exact "
                f"identity pair (first: {weights.inexact_units[:5].tolist()}); "
                "they use the nearest values",
                stacklevel=2,
            )
    if widened:
        warnings.warn(
            f"{len(widened)} BN layer(s) keep float32 variables because 16-bit "
            f"ones cannot hold an exact identity for some units (first: "
            f"{widened[:3]}); pass bn_dtype=... to force a policy",
            stacklevel=2,
        )
    return new


def _calibrate(spots, moments, bns, done, epsilon) -> dict:
    """Identity weights for each spot not in `done`, by spot id.

    BNs with the same variable dtype are calibrated together.
    """
    by_dtype: dict[str, list[int]] = {}
    for i, (spot, bn) in enumerate(zip(spots, bns, strict=True)):
        if id(spot) not in done:
            by_dtype.setdefault(bn.variable_dtype, []).append(i)
    found = {}
    for dtype, todo in by_dtype.items():
        weights = many_identity_weights(
            [moments[i] for i in todo], epsilon, dtype, [spots[i].spec for i in todo]
        )
        found.update((id(spots[i]), w) for i, w in zip(todo, weights, strict=True))
    return found


def _lookup_stats(stats, spot) -> Moments:
    if spot.key not in stats:
        raise SurgeryError(
            f"stats has no entry '{spot.key}'; compute it with activation_stats"
            f"(model, ['{spot.spec}'], data)"
        )
    return stats[spot.key]


def _bn_policy(layer, forced, moments, epsilon, name):
    """The BN's policy: `forced`, else the layer's own if it can be exact.

    Returns the policy and, when deciding it took a 16-bit calibration that
    holds, those weights (else None).

    16-bit variables rarely hold an exact identity: with `beta == mean`, a
    unit is exact only if `rsqrt(var + eps) * gamma` lands within a float32
    ulp or two of 1, and for a 16-bit gamma and variance that needs
    `var + eps` to match `gamma**2` in bits the variance does not have (see
    `surgery.identity`). When any unit misses, the BN computes in the layer's
    16-bit dtype but keeps float32 variables, as Keras' mixed policies do.
    """
    if forced is not None:
        return keras.dtype_policies.get(forced), None
    policy = layer.dtype_policy
    if policy.variable_dtype not in LOW_PRECISION:
        return policy, None
    widened = keras.DTypePolicy(f"mixed_{policy.compute_dtype}")
    try:
        weights = identity_weights(moments, epsilon, policy.variable_dtype, name)
    except SurgeryError:  # beyond the 16-bit range: float32 holds it
        return widened, None
    if weights.inexact_units.size:
        return widened, None
    return policy, weights


def _names_by_scope(model, scope=()) -> dict:
    names = {scope: set()}
    for op in graph_of(model).operations:
        names[scope].add(op.name)
        if is_graph_model(op):
            names.update(_names_by_scope(op, scope + (op.name,)))
    return names


def _unique(name: str, taken: set) -> str:
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    taken.add(candidate)
    return candidate
