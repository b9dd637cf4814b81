"""The dtype policy an identity BN can be exact in, and its weights per spot."""

from __future__ import annotations

import keras

from surgery.errors import SurgeryError
from surgery.numerics.identity import (
    LOW_PRECISION,
    identity_weights,
    many_identity_weights,
)


def calibrate(spots, moments, policies, done, epsilon) -> dict:
    """Identity weights for each spot not in `done`, by spot id.

    BNs with the same variable dtype are calibrated together.
    """
    by_dtype: dict[str, list[int]] = {}
    for i, spot in enumerate(spots):
        if id(spot) not in done:
            dtype = policies[id(spot)].variable_dtype
            by_dtype.setdefault(dtype, []).append(i)
    found = {}
    for dtype, todo in by_dtype.items():
        weights = many_identity_weights(
            [moments[i] for i in todo], epsilon, dtype, [spots[i].spec for i in todo]
        )
        found.update((id(spots[i]), w) for i, w in zip(todo, weights, strict=True))
    return found


def bn_policy(layer, forced, moments, epsilon, name):
    """The BN's policy: `forced`, else the layer's own if it can be exact.

    Returns the policy and, when deciding it took a 16-bit calibration that
    holds, those weights (else None).

    16-bit variables rarely hold an exact identity: with `beta == mean`, a
    unit is exact only if `rsqrt(var + eps) * gamma` lands within a float32
    ulp or two of 1, and for a 16-bit gamma and variance that needs
    `var + eps` to match `gamma**2` in bits the variance does not have (see
    `surgery.numerics.identity`). When any unit misses, the BN computes in the layer's
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
