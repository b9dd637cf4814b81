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

16-bit variables (a `float16` or `bfloat16` policy) are calibrated in their
own dtype. Keras upcasts them and the 16-bit inputs to float32, computes
`x * inv + c` with `c = beta - mean * inv`, and casts the result back. The
cast forgives a little: the layer is an exact identity on every finite
16-bit input whenever, in each binade of that dtype, `|x * (inv - 1) + c|`
stays under half an ulp of `x` (with a margin for the two float32
roundings). That bound is checked in closed form at the ends of every binade,
so a pair that passes is proven exact on all 2^16 inputs. A 16-bit variance
has far fewer neighbours than a float32 one, so the search steps further
(`LOW_PRECISION_ULPS` values of the variance each way) and tries the nearest
16-bit gammas for each. In practice only dead units (mean 0) and some units
with a tiny mean pass: an input 0 comes out as `c`, so `c` must vanish, and
for a mean above ~0.1 that needs `inv == 1` exactly, i.e. `var + eps` equal
to `gamma**2` in bits a 16-bit variance does not have. `insert_identity_bn`
then gives the BN float32 variables.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from keras import backend, ops

from surgery.errors import SurgeryError
from surgery.moments import Moments

SEARCH_ULPS = 4
LOW_PRECISION = ("float16", "bfloat16")
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


def identity_weights(
    moments: Moments, epsilon: float, dtype: str = "float32", name: str = "bn"
) -> IdentityWeights:
    """Weights for an identity BN over units with these moments.

    `dtype` is the dtype of the BN variables; the check runs in the dtype the
    layer computes in (float32 for 16-bit variables, as Keras does). Values
    beyond the range of `dtype` raise a `SurgeryError` naming the unit.
    """
    dtype = _numpy_dtype(dtype)
    mean = _to_dtype(moments.mean, dtype, name, "mean")
    var = _to_dtype(moments.var, dtype, name, "variance")
    search = _search_low_precision if dtype.name in LOW_PRECISION else _search
    gamma, variance, exact, inv = search(moments, mean, var, epsilon, dtype, True)
    if not _confirmed(gamma, variance, exact, inv, epsilon, dtype):
        gamma, variance, exact, _ = search(moments, mean, var, epsilon, dtype, False)
    return IdentityWeights(
        gamma=gamma,
        beta=mean.copy(),
        moving_mean=mean,
        moving_variance=variance,
        inexact_units=np.flatnonzero(~exact),
    )


def _confirmed(gamma, variance, exact, inv, epsilon, dtype) -> bool:
    """Whether a stacked search holds in the layer's own full-width vector.

    The stacked evaluation runs every candidate in one call, with each unit
    at its position in a longer buffer; where a kernel rounds its scalar tail
    differently (a width that is not a multiple of the SIMD width), a unit's
    result could differ from the layer's. One full-width call with the
    chosen pairs settles it; any disagreement, or any unit left without an
    exact pair, sends the search to the one-call-per-candidate path.
    """
    if not exact.all():
        return False
    own = _backend_inv(variance[:, None], gamma[:, None], epsilon, dtype, False)
    return np.array_equal(own[:, 0], inv)


def _search(moments, mean, var, epsilon, dtype, stacked):
    """Per unit, the (gamma, variance) pair closest to the truth with inv == 1.

    Returns gamma, variance, which units are exact and their `inv`.
    """
    variances = _variance_candidates(var, epsilon, dtype)  # (units, V)
    sums = (variances.astype(np.float64) + epsilon).astype(dtype)
    roots = np.sqrt(sums.astype(np.float64)).astype(dtype)
    gammas = _neighbours(roots, dtype)  # (units, V, G)
    variances = np.broadcast_to(variances[..., None], gammas.shape)
    inv = _backend_inv(variances, gammas, epsilon, dtype, stacked)
    exact = (inv == 1.0) & (gammas > 0)

    true_var = np.asarray(moments.var, dtype=np.float64)[:, None, None]
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
    chosen = inv.reshape(len(var), -1)[np.arange(len(var)), best]
    return gamma, variance, found, chosen


def _search_low_precision(moments, mean, var, epsilon, dtype, stacked):
    """Per unit, the 16-bit (gamma, variance) closest to the truth that is
    proven exact on every finite 16-bit input, with `beta == mean`.

    Units with no such pair keep the candidate nearest to an identity.
    """
    variances = _variance_candidates(var, epsilon, dtype, LOW_PRECISION_ULPS)
    bad = ~np.isfinite(variances) | (variances < 0)
    variances = np.where(bad, var[:, None], variances).astype(dtype)
    sums = variances.astype(np.float32) + np.float32(epsilon)
    roots = np.sqrt(sums.astype(np.float64)).astype(dtype)
    gammas = _neighbours(roots, dtype, 1)  # (units, V, 3)
    variances = np.broadcast_to(variances[..., None], gammas.shape)
    inv = _backend_inv(variances, gammas, epsilon, dtype, stacked)
    m = mean.astype(np.float64)[:, None, None]
    inv32 = inv.astype(np.float32)
    m32 = mean.astype(np.float32)[:, None, None]
    offsets = (  # beta - mean * inv, rounded twice (mul, sub) and fused
        (m32 - m32 * inv32).astype(np.float64),
        (m - m * inv).astype(np.float32).astype(np.float64),
    )
    exact = gammas.astype(np.float64) > 0
    for offset in offsets:
        exact &= passes_through(inv, offset, dtype)

    true_var = np.asarray(moments.var, dtype=np.float64)[:, None, None]
    cost = np.abs(variances.astype(np.float64) - true_var)
    cost = cost + 1e-3 * np.abs(gammas.astype(np.float64) ** 2 - true_var - epsilon)
    miss = np.abs(inv - 1.0) + np.maximum(*(np.abs(o) for o in offsets))
    cost = np.where(exact, cost, np.inf).reshape(len(var), -1)
    best = np.argmin(cost, axis=1)
    rows = np.arange(len(var))
    found = np.isfinite(cost[rows, best])
    best = np.where(found, best, np.argmin(miss.reshape(len(var), -1), axis=1))
    gamma = gammas.reshape(len(var), -1)[rows, best].astype(dtype)
    variance = variances.reshape(len(var), -1)[rows, best].astype(dtype)
    return gamma, variance, found, inv.reshape(len(var), -1)[rows, best]


def passes_through(inv, offset, dtype) -> np.ndarray:
    """Whether `cast(x * inv + offset)` returns every finite `dtype` value x.

    `x * inv + offset` is computed in float32 and cast to the 16-bit `dtype`
    with round-to-nearest-even, so x comes back iff the float32 result lies
    strictly within half an ulp of x. Within a binade that half-ulp is fixed
    and the error `x * (inv - 1) + offset` is linear in x, so it peaks at the
    binade's ends; float32 rounding of the product and the sum adds at most
    `2^-22 * |x|`. Zero and the subnormals form one more band.
    """
    info = ml_dtypes.finfo(dtype)
    p, emin, emax = info.nmant, info.minexp, info.maxexp - 1
    d = np.asarray(inv, dtype=np.float64) - 1.0
    c = np.asarray(offset, dtype=np.float64)
    bands = [(0.0, 2.0**emin - 2.0 ** (emin - p), 2.0 ** (emin - p - 1))]
    bands += [
        (2.0**e, 2.0 ** (e + 1) - 2.0 ** (e - p), 2.0 ** (e - p - 1))
        for e in range(emin, emax + 1)
    ]
    ok = np.ones(np.broadcast_shapes(d.shape, c.shape), dtype=bool)
    for lo, hi, half in bands:
        slack = 2.0**-22 * hi
        for x in (lo, hi, -lo, -hi):
            ok &= np.abs(x * d + c) + slack < half
    return ok


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


def _backend_inv(variances, gammas, epsilon, dtype, stacked=True):
    """`rsqrt(variance + eps) * gamma` exactly as the backend's BN computes it.

    Evaluated through `ops.batch_normalization` on x = 1, mean = beta = 0,
    whose output is then `inv` itself. `variances` and `gammas` are
    `(units, ...)` candidates. Stacked, all candidates go through one call
    as rows of a `(candidates, units)` batch; otherwise each candidate is a
    full vector of the layer's width in a call of its own, exactly as in the
    layer (vectorised `rsqrt` kernels may round their SIMD body and scalar
    tail differently, so a unit's result can depend on its position).
    """
    compute = backend.result_type(str(dtype), "float32")
    units = variances.shape[0]
    v_all = variances.reshape(units, -1).T  # (candidates, units)
    g_all = gammas.reshape(units, -1).T
    zeros = ops.zeros((units,), dtype=compute)
    rows = [slice(None)] if stacked else [slice(c, c + 1) for c in range(len(v_all))]
    inv = np.empty(v_all.shape, dtype=np.float64)
    for r in rows:
        v = ops.cast(ops.convert_to_tensor(np.ascontiguousarray(v_all[r])), compute)
        g = ops.cast(ops.convert_to_tensor(np.ascontiguousarray(g_all[r])), compute)
        ones = ops.ones(ops.shape(v), dtype=compute)
        out = ops.batch_normalization(
            ones, zeros, v, axis=-1, offset=zeros, scale=g, epsilon=epsilon
        )
        inv[r] = ops.convert_to_numpy(out)
    return inv.T.reshape(variances.shape)


def _numpy_dtype(dtype) -> np.dtype:
    name = backend.standardize_dtype(dtype)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _to_dtype(values, dtype, name, what):
    with np.errstate(over="ignore"):
        converted = np.asarray(values, dtype=np.float64).astype(dtype)
    bad = np.flatnonzero(~np.isfinite(converted))
    if bad.size:
        unit = int(bad[0])
        raise SurgeryError(
            f"{name}: unit {unit} has {what} {float(values[unit]):.6g}, beyond "
            f"the range of {dtype.name} BN variables; give this BN float32 "
            f"variables (bn_dtype='mixed_{dtype.name}' or 'float32')"
        )
    return converted
