"""BatchNormalization weights that make the layer an exact identity.

At inference a BN layer computes `x * inv + (beta - mean * inv)` with
`inv = rsqrt(moving_variance + epsilon) * gamma` (TF, JAX and NumPy
backends). With `beta == moving_mean` bit for bit and `inv` exactly 1.0 the
output is `x` itself. In real arithmetic `gamma = sqrt(var + eps)` gives
`inv == 1`; in floating point it misses by an ulp for many units, so the
search tries a few ulps around `(var, sqrt(var + eps))` and keeps the pair
for which the backend's own `batch_normalization` op returns exactly 1.0,
cheapest first (closest to the measured variance). The moving statistics
stay within a few ulps of the measured ones, so a fine-tune starts from the
real population statistics.

This module is the entry point: it stacks the candidates of many layers into
few backend calls and searches wider for the units left inexact. The parts:
`surgery.numerics.pair_search` (a layer's candidates and the cheapest exact
one, confirmed at the layer's own width), `surgery.numerics.exactness`
(when a pair is exact, with the closed-form proof for 16-bit variables) and
`surgery.numerics.backend_bn` (`inv` as each backend computes it, compiled
or not).
"""

from __future__ import annotations

import numpy as np

from surgery.numerics.backend_bn import bn_inv, numpy_dtype
from surgery.numerics.exactness import LOW_PRECISION, is_identity
from surgery.numerics.moments import Moments
from surgery.numerics.pair_search import (
    IdentityWeights,
    candidates,
    pick,
    stacked_inv,
)

# variance ulps searched in turn for a layer with units left inexact; units
# with `var + eps` just above a power of 4 can need more than 64 (see `_widened`)
WIDER_ULPS = (16, 64, 256, 1024)
STACK_ELEMENTS = 1 << 22  # candidates x units per stacked call, about 64 MB


def identity_weights(
    moments: Moments, epsilon: float, dtype: str = "float32", name: str = "bn"
) -> IdentityWeights:
    """Weights for an identity BN over units with these moments.

    `dtype` is the dtype of the BN variables; the check runs in the dtype the
    layer computes in (float32 for 16-bit variables, as Keras does). Values
    beyond the range of `dtype` raise a `SurgeryError` naming the unit.
    """
    return many_identity_weights([moments], epsilon, dtype, [name])[0]


def many_identity_weights(
    moments: list[Moments], epsilon: float, dtype: str, names: list[str]
) -> list[IdentityWeights]:
    """`identity_weights` for several BN layers with one variable dtype.

    Their candidates go through the backend together, a few calls for a
    whole model instead of a few per layer; a few million candidates at a
    time, so memory stays bounded whatever the model.
    """
    dtype = numpy_dtype(dtype)
    weights, chunk = [], []
    for m, name in zip(moments, names, strict=True):
        chunk.append(candidates(m, epsilon, dtype, name))
        if sum(layer.cost.size for layer in chunk) >= STACK_ELEMENTS:
            weights += _pick_stacked(chunk, epsilon, dtype)
            chunk = []
    if chunk:
        weights += _pick_stacked(chunk, epsilon, dtype)
    if dtype.name not in LOW_PRECISION:
        weights = [
            _widened(w, m, epsilon, dtype, name)
            for w, m, name in zip(weights, moments, names, strict=True)
        ]
    return weights


def _widened(weights, moments, epsilon, dtype, name) -> IdentityWeights:
    """`weights`, or those of a wider search if it leaves fewer units inexact.

    A backend whose `rsqrt` is not correctly rounded (XLA's on CPU is up to
    2 ulp off) maps neighbouring sums to the same value, so a few units have
    no exact pair within `SEARCH_ULPS`; a search over more neighbours finds
    one. Hardest are sums just above a power of 4: there `gamma` sits just
    above a power of 2, where its ulp is twice as coarse relative to
    `rsqrt`'s, and on JAX a pair must also hold under YNNPACK's `1 / sqrt`
    (see `surgery.numerics.backend_bn.fused_inv`). Measured on JAX: a variance of 64.15 had its nearest
    exact pair 68 variance ulps away (8e-6 relative). Only those units are
    searched again, in the variance (a wide search of a whole layer would
    take gigabytes), and the result is checked at the layer's width.
    """
    for ulps in WIDER_ULPS:
        units = weights.inexact_units
        if not units.size:
            break
        mean, m2 = np.asarray(moments.mean), np.asarray(moments.m2)
        few = Moments(moments.count, mean[units], m2[units])
        layer = candidates(few, epsilon, dtype, name, ulps)
        (inv,) = stacked_inv([layer], epsilon, dtype)
        wider = pick(layer, inv, epsilon, dtype)
        keep = np.ones(len(weights.gamma), dtype=bool)
        keep[units] = False  # exact units keep their choice
        gamma, variance = weights.gamma.copy(), weights.moving_variance.copy()
        gamma[units], variance[units] = wider.gamma, wider.moving_variance
        inv = bn_inv(variance, gamma, epsilon, dtype)
        exact = is_identity(gamma, inv, weights.moving_mean)
        if exact.sum() > keep.sum():
            weights = IdentityWeights(
                gamma=gamma,
                beta=weights.beta,
                moving_mean=weights.moving_mean,
                moving_variance=variance,
                inexact_units=np.flatnonzero(~exact),
            )
    return weights


def _pick_stacked(layers, epsilon, dtype) -> list[IdentityWeights]:
    """Each layer's weights, from one stacked evaluation of them all."""
    inv = stacked_inv(layers, epsilon, dtype)
    return [
        pick(layer, layer_inv, epsilon, dtype)
        for layer, layer_inv in zip(layers, inv, strict=True)
    ]
