"""One BN layer's identity pairs: the candidates, then the cheapest exact one.

Each unit's candidates are the few ulps around `(var, sqrt(var + eps))`,
each with its cost (distance from the measured statistics). Their `inv` is
evaluated for many layers in one stacked backend call (`stacked_inv`); the
cheapest exact candidate is then confirmed in a call of the layer's own
width, since a unit's result can depend on its position (`unsettled_units`), and
searched again in calls of that shape where it does not hold
(`search_in_layer_shape`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from keras import backend

from surgery.errors import SurgeryError
from surgery.numerics.backend_bn import bn_inv
from surgery.numerics.exactness import (
    LOW_PRECISION,
    distance_from_identity,
    is_identity,
)

SEARCH_ULPS = 4
LOW_PRECISION_ULPS = 8


@dataclass(frozen=True)
class IdentityWeights:
    """BN weights in `get_weights()` order, and the units left inexact."""

    gamma: np.ndarray
    beta: np.ndarray
    moving_mean: np.ndarray
    moving_variance: np.ndarray
    inexact_units: np.ndarray

    def as_list(self) -> list[np.ndarray]:
        return [self.gamma, self.beta, self.moving_mean, self.moving_variance]


@dataclass(frozen=True)
class Candidates:
    """The (variance, gamma) pairs tried for each unit of one BN layer."""

    mean: np.ndarray  # (units,), in the variable dtype
    var: np.ndarray  # (units,), the measured variance in the variable dtype
    variance: np.ndarray  # (units, candidates)
    gamma: np.ndarray  # (units, candidates)
    cost: np.ndarray  # (units, candidates): distance from the measured stats


def candidates(moments, epsilon, dtype, name, ulps=SEARCH_ULPS) -> Candidates:
    """Neighbours of `(var, sqrt(var + eps))`, each with its cost.

    16-bit variances have far fewer neighbours, so the search steps further
    in the variance and tries the three nearest gammas for each. Off
    TensorFlow the gammas are centred on `1 / rsqrt(var + eps)` with the
    backend's own `rsqrt`, which need not be correctly rounded.
    """
    mean = _to_dtype(moments.mean, dtype, name, "mean")
    var = _to_dtype(moments.var, dtype, name, "variance")
    if dtype.name in LOW_PRECISION:
        variances = _variance_candidates(var, epsilon, dtype, LOW_PRECISION_ULPS)
        bad = ~np.isfinite(variances) | (variances < 0)
        variances = np.where(bad, var[:, None], variances).astype(dtype)
        sums = variances.astype(np.float32) + np.float32(epsilon)
        roots = np.sqrt(sums.astype(np.float64)).astype(dtype)
        gammas = _neighbours(roots, dtype, 1)  # (units, V, 3)
    else:
        variances = _variance_candidates(var, epsilon, dtype, ulps)  # (units, V)
        sums = (variances.astype(np.float64) + epsilon).astype(dtype)
        if backend.backend() == "tensorflow":
            roots = np.sqrt(sums.astype(np.float64)).astype(dtype)
        else:
            rsqrt = bn_inv(variances, np.ones_like(variances), epsilon, dtype)
            roots = (1.0 / rsqrt).astype(dtype)
        # an exact gamma is within an ulp or two of 1 / rsqrt: the wider
        # searches widen the variance only
        gammas = _neighbours(roots, dtype, SEARCH_ULPS)  # (units, V, G)
    variances = np.broadcast_to(variances[..., None], gammas.shape)
    true_var = np.asarray(moments.var, dtype=np.float64)[:, None, None]
    cost = np.abs(variances.astype(np.float64) - true_var)
    cost = cost + 1e-3 * np.abs(gammas.astype(np.float64) ** 2 - true_var - epsilon)
    units = len(var)
    return Candidates(
        mean=mean,
        var=var,
        variance=variances.reshape(units, -1),
        gamma=gammas.reshape(units, -1),
        cost=cost.reshape(units, -1),
    )


def pick(layer: Candidates, inv, epsilon, dtype) -> IdentityWeights:
    """Per unit, the cheapest candidate that makes the BN an exact identity.

    `inv` comes from the stacked evaluation. Units whose choice does not hold
    in the layer's own vector are searched again with layer-shaped calls
    (see `unsettled_units`), and so are 16-bit units that have none; float32
    and float64 units without one are left to the wider search of
    `surgery.numerics.identity`.
    """
    exact = is_identity(layer.gamma, inv, layer.mean)
    cost = np.where(exact, layer.cost, np.inf)
    best = np.argmin(cost, axis=1)
    rows = np.arange(len(best))
    found = np.isfinite(cost[rows, best])
    unsettled = unsettled_units(layer, best, found, inv[rows, best], epsilon, dtype)
    if dtype.name not in LOW_PRECISION:
        # a unit with no exact pair at all goes to the wider search of
        # `surgery.numerics.identity`, stacked: calls of the layer's shape,
        # one per candidate, cost more than searching ±1024 ulps at once
        unsettled &= found
    if unsettled.any():
        inv = inv.copy()
        searched = search_in_layer_shape(layer, unsettled, best, epsilon, dtype)
        best[unsettled], found[unsettled], inv[unsettled] = searched
    low_precision = dtype.name in LOW_PRECISION
    if low_precision and not found.all():  # the one nearest an identity
        nearest = np.argmin(distance_from_identity(inv, layer.mean), axis=1)
        best = np.where(found, best, nearest)
    gamma = layer.gamma[rows, best]
    variance = layer.variance[rows, best]
    if not low_precision:
        fallback = np.sqrt(layer.var.astype(np.float64) + epsilon).astype(dtype)
        gamma = np.where(found, gamma, fallback)
        variance = np.where(found, variance, layer.var)
    return IdentityWeights(
        gamma=gamma.astype(dtype),
        beta=layer.mean.copy(),
        moving_mean=layer.mean,
        moving_variance=variance.astype(dtype),
        inexact_units=np.flatnonzero(~found),
    )


def unsettled_units(layer, best, found, chosen_inv, epsilon, dtype) -> np.ndarray:
    """Units whose stacked choice does not hold in the layer's own vector.

    The stacked evaluation runs every candidate in one call, with each unit
    at its position in a longer buffer; where a kernel rounds its scalar tail
    differently (a width that is not a multiple of the SIMD width), a unit's
    result can differ from the layer's. One full-width call with the chosen
    pairs settles the others. Units without an exact pair are unsettled too.
    """
    rows = np.arange(len(best))
    own = bn_inv(layer.variance[rows, best], layer.gamma[rows, best], epsilon, dtype)
    return ~found | (own != chosen_inv)


def search_in_layer_shape(layer: Candidates, units, fill, epsilon, dtype):
    """The cheapest exact candidate of each of `units` (a mask), in calls of
    the layer's own shape.

    Each call is one full vector of the layer's width: the other units hold
    their `fill` candidate and each searched unit its k-th cheapest, so the
    first exact one a unit meets is its cheapest. Calls run in rounds of 1,
    1, 2, 4, ... and stop after the round in which every searched unit found
    one. Returns, for the searched units, the choice, whether it is exact
    and `inv` of every candidate evaluated (NaN for the others).
    """
    searched = np.flatnonzero(units)
    order = np.argsort(layer.cost[searched], axis=1, kind="stable")
    count = order.shape[1]
    rows = np.arange(len(searched))[:, None]
    variance = layer.variance[np.arange(len(units)), fill]
    gamma = layer.gamma[np.arange(len(units)), fill]
    inv = np.full((len(searched), count), np.nan)
    best = np.zeros(len(searched), dtype=np.intp)
    found = np.zeros(len(searched), dtype=bool)
    start, size = 0, 1
    while start < count and not found.all():
        picks = order[:, start : start + size]  # (searched, calls this round)
        for pick in picks.T:
            variance[searched] = layer.variance[searched, pick]
            gamma[searched] = layer.gamma[searched, pick]
            inv[rows[:, 0], pick] = bn_inv(variance, gamma, epsilon, dtype)[searched]
        gammas = layer.gamma[searched[:, None], picks]
        exact = is_identity(gammas, inv[rows, picks], layer.mean[searched])
        new = exact.any(axis=1) & ~found
        best[new] = picks[new, exact[new].argmax(axis=1)]
        found |= new
        start, size = start + picks.shape[1], max(size, start + picks.shape[1])
    return best, found, inv


def stacked_inv(layers: list[Candidates], epsilon, dtype) -> list[np.ndarray]:
    """`inv` of every candidate of every layer, in one backend call.

    Candidates are the rows of a `(candidates, units)` batch, the units of
    all layers side by side.
    """
    variance = np.concatenate([layer.variance for layer in layers])
    gamma = np.concatenate([layer.gamma for layer in layers])
    inv = bn_inv(variance.T, gamma.T, epsilon, dtype).T
    ends = np.cumsum([len(layer.var) for layer in layers])[:-1]
    return np.split(inv, ends)


def _variance_candidates(var, epsilon, dtype, ulps=SEARCH_ULPS):
    """Neighbours of `var` and values whose sum with eps neighbours `var + eps`.

    For a tiny or zero variance, `var + eps` rounds to the same value whatever
    `var`'s own ulps are, so the search also steps in ulps of the sum.
    """
    near_var = _neighbours(var, dtype, ulps)
    sums = (var.astype(np.float64) + epsilon).astype(dtype)
    near_sum = _neighbours(sums, dtype, ulps)
    from_sums = (near_sum.astype(np.float64) - epsilon).astype(dtype)
    candidates = np.concatenate([near_var, from_sums], axis=1)
    return np.where(candidates < 0, var[:, None], candidates).astype(dtype)


def _neighbours(x, dtype, ulps=SEARCH_ULPS):
    """`x` and its `ulps` nearest representable values on either side."""
    steps = []
    up, down = x.astype(dtype), x.astype(dtype)
    for _ in range(ulps):
        up = np.nextafter(up, np.array(np.inf, dtype))
        down = np.nextafter(down, np.array(-np.inf, dtype))
        steps += [up, down]
    return np.stack([x.astype(dtype), *steps], axis=-1)


def _to_dtype(values, dtype, name, what):
    with np.errstate(over="ignore"):
        converted = np.asarray(values, dtype=np.float64).astype(dtype)
    bad = np.flatnonzero(~np.isfinite(converted))
    if bad.size:
        unit = int(bad[0])
        if not np.isfinite(float(values[unit])):
            raise SurgeryError(
                f"{name}: unit {unit} has {what} {float(values[unit])}; statistics "
                "must be finite: check the data and the model's weights"
            )
        value = float(values[unit])
        raise SurgeryError(
            f"{name}: unit {unit} has {what} {value:.6g}, beyond the range of "
            f"{dtype.name} BN variables; {_wider_dtype_advice(value, dtype)}"
        )
    return converted


def _wider_dtype_advice(value: float, dtype: np.dtype) -> str:
    """What holds `value`: a wider BN dtype that exists here, or smaller data."""
    smaller = (
        "scale the data down (standardize it) or insert the BN where values are smaller"
    )
    if dtype.itemsize < 4 and abs(value) <= np.finfo(np.float32).max:
        return (
            f"give this BN float32 variables (bn_dtype='mixed_{dtype.name}' or "
            "'float32')"
        )
    if dtype.itemsize < 8 and backend.backend() == "tensorflow":
        return f"give this BN float64 variables (bn_dtype='float64'), or {smaller}"
    return f"no BN dtype on this backend holds it: {smaller}"
