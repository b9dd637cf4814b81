"""BatchNormalization weights that make the layer an exact identity.

At inference a BN layer computes `x * inv + (beta - mean * inv)` with
`inv = rsqrt(moving_variance + epsilon) * gamma` (TF, JAX and NumPy
backends). With `beta == moving_mean` bit for bit and `inv` exactly 1.0 the
output is `x` itself. In real arithmetic `gamma = sqrt(var + eps)` gives
`inv == 1`; in floating point it misses by an ulp for many units, so this
module searches a few ulps around `(var, sqrt(var + eps))` and keeps the pair
for which the backend's own `batch_normalization` op returns exactly 1.0.
The moving statistics stay within a few ulps of the measured ones, so a
fine-tune starts from the real population statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from keras import backend, ops

from surgery.errors import SurgeryError
from surgery.moments import Moments

SEARCH_ULPS = 4


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


def identity_weights(
    moments: Moments, epsilon: float, dtype: str = "float32", name: str = "bn"
) -> IdentityWeights:
    """Weights for an identity BN over units with these moments.

    `dtype` is the dtype of the BN variables; the check runs in the dtype the
    layer computes in (float32 for 16-bit variables, as Keras does).
    """
    dtype = np.dtype(backend.standardize_dtype(dtype))
    mean = _to_dtype(moments.mean, dtype, name, "mean")
    var = _to_dtype(moments.var, dtype, name, "variance")
    gamma, variance, exact = _search(moments.var, var, epsilon, dtype)
    return IdentityWeights(
        gamma=gamma,
        beta=mean.copy(),
        moving_mean=mean,
        moving_variance=variance,
        inexact_units=np.flatnonzero(~exact),
    )


def _search(true_var, var, epsilon, dtype):
    """Per unit, the (gamma, variance) pair closest to the truth with inv == 1."""
    variances = _variance_candidates(var, epsilon, dtype)  # (units, V)
    sums = (variances.astype(np.float64) + epsilon).astype(dtype)
    roots = np.sqrt(sums.astype(np.float64)).astype(dtype)
    gammas = _neighbours(roots, dtype)  # (units, V, G)
    variances = np.broadcast_to(variances[..., None], gammas.shape)
    exact = (_backend_inv(variances, gammas, epsilon, dtype) == 1.0) & (gammas > 0)

    true_var = np.asarray(true_var, dtype=np.float64)[:, None, None]
    cost = np.abs(variances.astype(np.float64) - true_var)
    cost = cost + 1e-3 * np.abs(gammas.astype(np.float64) ** 2 - true_var - epsilon)
    cost = np.where(exact, cost, np.inf).reshape(len(var), -1)
    best = np.argmin(cost, axis=1)
    found = np.isfinite(cost[np.arange(len(var)), best])

    flat_g = gammas.reshape(len(var), -1)[np.arange(len(var)), best]
    flat_v = variances.reshape(len(var), -1)[np.arange(len(var)), best]
    fallback_g = np.sqrt(var.astype(np.float64) + epsilon).astype(dtype)
    gamma = np.where(found, flat_g, fallback_g).astype(dtype)
    variance = np.where(found, flat_v, var).astype(dtype)
    return gamma, variance, found


def _variance_candidates(var, epsilon, dtype):
    """Neighbours of `var` and values whose sum with eps neighbours `var + eps`.

    For a tiny or zero variance, `var + eps` rounds to the same value whatever
    `var`'s own ulps are, so the search also steps in ulps of the sum.
    """
    near_var = _neighbours(var, dtype)
    sums = (var.astype(np.float64) + epsilon).astype(dtype)
    near_sum = _neighbours(sums, dtype)
    from_sums = (near_sum.astype(np.float64) - epsilon).astype(dtype)
    candidates = np.concatenate([near_var, from_sums], axis=1)
    return np.where(candidates < 0, var[:, None], candidates).astype(dtype)


def _neighbours(x, dtype):
    """`x` and its SEARCH_ULPS nearest representable values on either side."""
    steps = []
    up, down = x.astype(dtype), x.astype(dtype)
    for _ in range(SEARCH_ULPS):
        up = np.nextafter(up, np.array(np.inf, dtype))
        down = np.nextafter(down, np.array(-np.inf, dtype))
        steps += [up, down]
    return np.stack([x.astype(dtype), *steps], axis=-1)


def _backend_inv(variances, gammas, epsilon, dtype):
    """`rsqrt(variance + eps) * gamma` exactly as the backend's BN computes it.

    Evaluated through `ops.batch_normalization` on x = 1, mean = beta = 0,
    whose output is then `inv` itself. Each candidate is a full vector of
    the layer's width, as in the layer: vectorised `rsqrt` kernels round
    differently in their SIMD body and scalar tail, so a unit's result
    depends on its position in the vector.
    """
    compute = backend.result_type(str(dtype), "float32")
    units = variances.shape[0]
    v_all = variances.reshape(units, -1)
    g_all = gammas.reshape(units, -1)
    ones = ops.ones((1, units), dtype=compute)
    zeros = ops.zeros((units,), dtype=compute)
    inv = np.empty(v_all.shape, dtype=np.float64)
    for c in range(v_all.shape[1]):
        v = ops.cast(ops.convert_to_tensor(np.ascontiguousarray(v_all[:, c])), compute)
        g = ops.cast(ops.convert_to_tensor(np.ascontiguousarray(g_all[:, c])), compute)
        out = ops.batch_normalization(
            ones, zeros, v, axis=-1, offset=zeros, scale=g, epsilon=epsilon
        )
        inv[:, c] = ops.convert_to_numpy(out).reshape(-1)
    return inv.reshape(variances.shape)


def _to_dtype(values, dtype, name, what):
    converted = np.asarray(values, dtype=np.float64).astype(dtype)
    bad = np.flatnonzero(~np.isfinite(converted))
    if bad.size:
        unit = int(bad[0])
        raise SurgeryError(
            f"{name}: unit {unit} has {what} {float(values[unit]):.6g}, beyond "
            f"the range of {dtype.name} BN variables; use a float32 policy for "
            f"this layer"
        )
    return converted
