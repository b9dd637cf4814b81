"""`insert_identity_bn`: BatchNormalization spliced in without changing outputs."""

from __future__ import annotations

import warnings
from typing import Any

import keras

from surgery.errors import SurgeryError
from surgery.graph import Rebuilder
from surgery.identity import identity_weights
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
) -> keras.Model:
    """A new model with BatchNormalization after/before the named layers.

    Each BN is initialised from the activation statistics over `data` (or
    from `stats` computed earlier by `activation_stats`) so that at inference
    the new model's outputs are bit-identical to the original's. BN layers are
    named `<layer>_bn` (after) and `<layer>_pre_bn` (before); a name already
    taken gets a `_1`, `_2`, ... suffix. The input model is not modified and
    shares no variables with the result.
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

    taken = _names_by_scope(model)

    def make_bn(spot, tensor):
        units, measured = tensor.shape[spot.axis], moments[spots.index(spot)].units
        if units != measured:
            raise SurgeryError(
                f"stats for '{spot.key}' have {measured} "
                f"units but the layer has {units}; recompute them for this model"
            )
        return keras.layers.BatchNormalization(
            axis=spot.axis,
            epsilon=epsilon,
            momentum=momentum,
            name=_unique(spot.bn_name, taken.setdefault(spot.scope, set())),
            dtype=_bn_policy(spot.layer),
        )

    rebuilder = Rebuilder(spots, make_bn)
    new = rebuilder.rebuild(model)
    rebuilder.copy_weights()
    for spot, m in zip(spots, moments, strict=True):
        bn = rebuilder.bn_layers[id(spot)]
        weights = identity_weights(m, epsilon, bn.variable_dtype, name=spot.spec)
        bn.set_weights(weights.as_list())
        if weights.inexact_units.size:
            warnings.warn(
                f"{bn.name}: {weights.inexact_units.size} unit(s) have no exact "
                f"identity pair (first: {weights.inexact_units[:5].tolist()}); "
                "they use the nearest values",
                stacklevel=2,
            )
    return new


def _lookup_stats(stats, spot) -> Moments:
    if spot.key not in stats:
        raise SurgeryError(
            f"stats has no entry '{spot.key}'; compute it with activation_stats"
            f"(model, ['{spot.spec}'], data)"
        )
    return stats[spot.key]


def _bn_policy(layer):
    """The layer's policy, with float32 variables where it stores 16-bit ones.

    16-bit variables cannot hold a (gamma, variance) pair whose
    `rsqrt(variance + eps) * gamma` is exactly 1, so the BN keeps float32
    variables and computes in the model's dtype, as mixed precision does.
    """
    policy = layer.dtype_policy
    if policy.variable_dtype in ("float16", "bfloat16"):
        return keras.DTypePolicy(f"mixed_{policy.compute_dtype}")
    return policy


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
