"""When a BN with given weights is an exact identity, for every variable dtype.

With variables in the dtype the layer computes in (float32, float64) the
layer is an identity when `inv` is exactly 1.0 and `beta == moving_mean`.

16-bit variables (a `float16` or `bfloat16` policy) are calibrated in their
own dtype. Keras upcasts them and the 16-bit inputs to float32, computes
`x * inv + c` with `c = beta - mean * inv`, and casts the result back. The
cast forgives a little: the layer is an exact identity on every finite
16-bit input whenever, in each binade of that dtype, `|x * (inv - 1) + c|`
stays under half an ulp of `x` (with a margin for the two float32
roundings). That bound is checked in closed form at the ends of every binade,
so a pair that passes is proven exact on all 2^16 inputs. A 16-bit variance
has far fewer neighbours than a float32 one, so the search steps further
(`surgery.numerics.pair_search.LOW_PRECISION_ULPS` values of the variance
each way) and tries the nearest 16-bit gammas for each. In practice only dead units (mean 0) and some units
with a tiny mean pass: an input 0 comes out as `c`, so `c` must vanish, and
for a mean above ~0.1 that needs `inv == 1` exactly, i.e. `var + eps` equal
to `gamma**2` in bits a 16-bit variance does not have. `insert_identity_bn`
then gives the BN float32 variables.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

LOW_PRECISION = ("float16", "bfloat16")


def is_identity(gamma, inv, mean) -> np.ndarray:
    """Whether each candidate makes a unit with this mean an exact identity.

    With variables in the compute dtype that is `inv == 1`; for 16-bit
    variables the closed-form proof of `passes_through` decides, with
    `beta == mean`.
    """
    if mean.dtype.name not in LOW_PRECISION:
        return (inv == 1.0) & (gamma > 0)
    exact = gamma.astype(np.float64) > 0
    for offset in _offsets(inv, mean):
        exact &= passes_through(inv, offset, mean.dtype)
    return exact


def _offsets(inv, mean):
    """`beta - mean * inv` as the layer computes it: rounded twice, or fused."""
    shape = (-1,) + (1,) * (np.ndim(inv) - 1)
    m = mean.astype(np.float64).reshape(shape)
    m32 = mean.astype(np.float32).reshape(shape)
    inv32 = np.asarray(inv).astype(np.float32)
    return (
        (m32 - m32 * inv32).astype(np.float64),
        (m - m * inv).astype(np.float32).astype(np.float64),
    )


def distance_from_identity(inv, mean) -> np.ndarray:
    """How far each candidate is from an identity."""
    return np.abs(inv - 1.0) + np.maximum(*(np.abs(o) for o in _offsets(inv, mean)))


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
