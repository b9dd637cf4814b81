"""BatchNormalization weights that make the layer an exact identity.

At inference a BN layer computes `x * inv + (beta - mean * inv)` with
`inv = rsqrt(moving_variance + epsilon) * gamma` (TF, JAX and NumPy
backends). With `beta == moving_mean` bit for bit and `inv` exactly 1.0 the
output is `x` itself. In real arithmetic `gamma = sqrt(var + eps)` gives
`inv == 1`; in floating point it misses by an ulp for many units, so this
module searches a few ulps around `(var, sqrt(var + eps))` and keeps the pair
for which the backend's own `batch_normalization` op returns exactly 1.0,
cheapest first (closest to the measured variance). The candidates of many
layers are evaluated in one stacked call and the choice confirmed in a call
of each layer's own width, since a unit's result can depend on its position
(see `_unsettled`). The moving statistics stay within a few ulps of the
measured ones, so a fine-tune starts from the real population statistics.

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

import functools
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from keras import backend, ops

from surgery.errors import SurgeryError
from surgery.numerics.moments import Moments

SEARCH_ULPS = 4
# variance ulps searched in turn for a layer with units left inexact; units
# with `var + eps` just above a power of 4 can need more than 64 (see _widened)
WIDER_ULPS = (16, 64, 256, 1024)
LOW_PRECISION = ("float16", "bfloat16")
LOW_PRECISION_ULPS = 8
STACK_ELEMENTS = 1 << 22  # candidates x units per stacked call, about 64 MB


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
    return many_identity_weights([moments], epsilon, dtype, [name])[0]


def many_identity_weights(
    moments: list[Moments], epsilon: float, dtype: str, names: list[str]
) -> list[IdentityWeights]:
    """`identity_weights` for several BN layers with one variable dtype.

    Their candidates go through the backend together, a few calls for a
    whole model instead of a few per layer; a few million candidates at a
    time, so memory stays bounded whatever the model.
    """
    dtype = _numpy_dtype(dtype)
    weights, chunk = [], []
    for m, name in zip(moments, names, strict=True):
        chunk.append(_candidates(m, epsilon, dtype, name))
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
    (see `_fused_inv`). Measured on JAX: a variance of 64.15 had its nearest
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
        layer = _candidates(few, epsilon, dtype, name, ulps)
        (inv,) = _stacked_inv([layer], epsilon, dtype)
        wider = _pick(layer, inv, epsilon, dtype)
        keep = np.ones(len(weights.gamma), dtype=bool)
        keep[units] = False  # exact units keep their choice
        gamma, variance = weights.gamma.copy(), weights.moving_variance.copy()
        gamma[units], variance[units] = wider.gamma, wider.moving_variance
        inv = _bn_inv(variance, gamma, epsilon, dtype)
        exact = _exact(gamma, inv, weights.moving_mean)
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
    inv = _stacked_inv(layers, epsilon, dtype)
    return [
        _pick(layer, layer_inv, epsilon, dtype)
        for layer, layer_inv in zip(layers, inv, strict=True)
    ]


@dataclass(frozen=True)
class _Candidates:
    """The (variance, gamma) pairs tried for each unit of one BN layer."""

    mean: np.ndarray  # (units,), in the variable dtype
    var: np.ndarray  # (units,), the measured variance in the variable dtype
    variance: np.ndarray  # (units, candidates)
    gamma: np.ndarray  # (units, candidates)
    cost: np.ndarray  # (units, candidates): distance from the measured stats


def _candidates(moments, epsilon, dtype, name, ulps=SEARCH_ULPS) -> _Candidates:
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
            rsqrt = _bn_inv(variances, np.ones_like(variances), epsilon, dtype)
            roots = (1.0 / rsqrt).astype(dtype)
        # an exact gamma is within an ulp or two of 1 / rsqrt: the wider
        # searches widen the variance only
        gammas = _neighbours(roots, dtype, SEARCH_ULPS)  # (units, V, G)
    variances = np.broadcast_to(variances[..., None], gammas.shape)
    true_var = np.asarray(moments.var, dtype=np.float64)[:, None, None]
    cost = np.abs(variances.astype(np.float64) - true_var)
    cost = cost + 1e-3 * np.abs(gammas.astype(np.float64) ** 2 - true_var - epsilon)
    units = len(var)
    return _Candidates(
        mean=mean,
        var=var,
        variance=variances.reshape(units, -1),
        gamma=gammas.reshape(units, -1),
        cost=cost.reshape(units, -1),
    )


def _pick(layer: _Candidates, inv, epsilon, dtype) -> IdentityWeights:
    """Per unit, the cheapest candidate that makes the BN an exact identity.

    `inv` comes from the stacked evaluation. Units whose choice does not hold
    in the layer's own vector are searched again with layer-shaped calls
    (see `_unsettled`), and so are 16-bit units that have none; float32 and
    float64 units without one are left to `_widened`.
    """
    exact = _exact(layer.gamma, inv, layer.mean)
    cost = np.where(exact, layer.cost, np.inf)
    best = np.argmin(cost, axis=1)
    rows = np.arange(len(best))
    found = np.isfinite(cost[rows, best])
    unsettled = _unsettled(layer, best, found, inv[rows, best], epsilon, dtype)
    if dtype.name not in LOW_PRECISION:
        # a unit with no exact pair at all goes to the wider search of
        # `_widened`, stacked: calls of the layer's shape, one per candidate,
        # cost more than searching ±1024 ulps at once
        unsettled &= found
    if unsettled.any():
        inv = inv.copy()
        searched = _search_in_layer_shape(layer, unsettled, best, epsilon, dtype)
        best[unsettled], found[unsettled], inv[unsettled] = searched
    low_precision = dtype.name in LOW_PRECISION
    if low_precision and not found.all():  # the one nearest an identity
        nearest = np.argmin(_miss(inv, layer.mean), axis=1)
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


def _unsettled(layer, best, found, chosen_inv, epsilon, dtype) -> np.ndarray:
    """Units whose stacked choice does not hold in the layer's own vector.

    The stacked evaluation runs every candidate in one call, with each unit
    at its position in a longer buffer; where a kernel rounds its scalar tail
    differently (a width that is not a multiple of the SIMD width), a unit's
    result can differ from the layer's. One full-width call with the chosen
    pairs settles the others. Units without an exact pair are unsettled too.
    """
    rows = np.arange(len(best))
    own = _bn_inv(layer.variance[rows, best], layer.gamma[rows, best], epsilon, dtype)
    return ~found | (own != chosen_inv)


def _search_in_layer_shape(layer: _Candidates, units, fill, epsilon, dtype):
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
            inv[rows[:, 0], pick] = _bn_inv(variance, gamma, epsilon, dtype)[searched]
        gammas = layer.gamma[searched[:, None], picks]
        exact = _exact(gammas, inv[rows, picks], layer.mean[searched])
        new = exact.any(axis=1) & ~found
        best[new] = picks[new, exact[new].argmax(axis=1)]
        found |= new
        start, size = start + picks.shape[1], max(size, start + picks.shape[1])
    return best, found, inv


def _exact(gamma, inv, mean) -> np.ndarray:
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


def _miss(inv, mean) -> np.ndarray:
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


def _stacked_inv(layers: list[_Candidates], epsilon, dtype) -> list[np.ndarray]:
    """`inv` of every candidate of every layer, in one backend call.

    Candidates are the rows of a `(candidates, units)` batch, the units of
    all layers side by side.
    """
    variance = np.concatenate([layer.variance for layer in layers])
    gamma = np.concatenate([layer.gamma for layer in layers])
    inv = _bn_inv(variance.T, gamma.T, epsilon, dtype).T
    ends = np.cumsum([len(layer.var) for layer in layers])[:-1]
    return np.split(inv, ends)


def _bn_inv(variance, gamma, epsilon, dtype) -> np.ndarray:
    """`rsqrt(variance + eps) * gamma` exactly as the backend's BN computes it.

    Evaluated through `ops.batch_normalization` on x = 1, mean = beta = 0,
    whose output is then `inv` itself (also for torch's `(x - mean) * inv +
    beta`), in the dtype the layer computes in. A 1-D input is computed
    exactly as a layer of that width computes it. A 2-D input holds rows of
    candidates: TensorFlow takes the per-unit vectors as they are, the other
    backends reshape them to one unit axis, so there the rows are laid end to
    end as one long vector of units.
    """
    compute = _numpy_dtype(backend.result_type(str(dtype), "float32"))
    v = np.ascontiguousarray(variance, dtype=compute)
    g = np.ascontiguousarray(gamma, dtype=compute)
    shape = v.shape
    if v.ndim > 1 and backend.backend() != "tensorflow":
        # Padded to a power of two: JAX compiles each new shape anew.
        size = 1 << max(0, int(v.size - 1).bit_length())
        v = np.pad(v.reshape(-1), (0, size - v.size), constant_values=1)
        g = np.pad(g.reshape(-1), (0, size - g.size), constant_values=1)
    zeros = np.zeros(v.shape[-1], dtype=compute)
    out = ops.batch_normalization(
        np.ones_like(v), zeros, v, axis=-1, offset=zeros, scale=g, epsilon=epsilon
    )
    out = ops.convert_to_numpy(out).astype(np.float64)
    if backend.backend() == "tensorflow":
        out = _further_from_one(_xla_inv(v, g, epsilon), out)
    if backend.backend() == "jax" and compute == np.float32:
        out = _further_from_one(
            _fused_inv(v.reshape(-1), g.reshape(-1), epsilon), out.reshape(-1)
        )
    return out.reshape(-1)[: int(np.prod(shape))].reshape(shape)


def _further_from_one(a, b) -> np.ndarray:
    """Per element, whichever of two `inv`s is further from 1: a pair is
    exact only if it is exact under both ways of computing it."""
    return np.where(np.abs(a - 1) > np.abs(b - 1), a, b)


def _xla_inv(variance, gamma, epsilon) -> np.ndarray:
    """`inv` as TensorFlow computes it under XLA (`jit_compile=True`).

    XLA's CPU `rsqrt` is not TensorFlow's: for float64 it differs from the
    correctly rounded `1 / sqrt` that TF's own kernel gives for about 31% of
    inputs, and for float32 for about 15%. A float64 BN whose `inv` misses 1
    by an ulp under XLA adds `mean * 2^-52` to every input, which a float32
    zero (a ReLU's) does not absorb: a BN after `Dense(relu)` at a model
    output differed by 6e8 ulp (0 against 1e-16). XLA's result does not
    depend on a unit's position, so the candidates are laid end to end,
    padded to a power of two (XLA compiles each new shape anew).
    """
    size = 1 << max(0, int(variance.size - 1).bit_length())
    v = np.pad(variance.reshape(-1), (0, size - variance.size), constant_values=1)
    g = np.pad(gamma.reshape(-1), (0, size - gamma.size), constant_values=1)
    out = _xla_bn(float(epsilon), str(v.dtype))(v, g)
    out = np.asarray(ops.convert_to_numpy(out), dtype=np.float64)
    return out[: variance.size].reshape(variance.shape)


@functools.lru_cache(maxsize=8)
def _xla_bn(epsilon, dtype):
    import tensorflow as tf

    def inv(variance, gamma):
        zeros = tf.zeros_like(variance)
        return ops.batch_normalization(
            tf.ones_like(variance), zeros, variance, axis=-1, offset=zeros,
            scale=gamma, epsilon=epsilon,
        )  # fmt: skip

    return tf.function(inv, jit_compile=True, autograph=False, reduce_retracing=True)


FUSED_MIN_UNITS = 1 << 16  # XLA hands elementwise ops this large to YNNPACK


def _fused_inv(variance, gamma, epsilon) -> np.ndarray:
    """`inv` as XLA on CPU computes it inside a YNNPACK fusion.

    Compiled JAX inference (`predict`) can put a BN's whole arithmetic into
    the `__ynn_fusion` of a neighbouring dot or pooling, where `rsqrt` is
    YNNPACK's `1 / sqrt(x)`, not XLA's own `rsqrt`: an ulp apart for a third
    of the inputs, so a pair exact under one is off under the other. This
    evaluates the candidates in such a fusion (a max pool of ones feeding the
    BN, padded to a size XLA fuses), elementwise, so positions do not
    matter. Where XLA leaves the BN out of YNNPACK it is XLA's `rsqrt` again.
    """
    size = max(FUSED_MIN_UNITS, 1 << max(0, int(variance.size - 1).bit_length()))
    v = np.pad(variance, (0, size - variance.size), constant_values=1)
    g = np.pad(gamma, (0, size - gamma.size), constant_values=1)
    zeros = np.zeros(size, dtype=np.float32)
    ones = np.ones((1, 2, 2, size), dtype=np.float32)
    out = _fused_bn(float(epsilon))(ones, zeros, v, g)
    return np.asarray(out, dtype=np.float64).reshape(-1)[: variance.size]


@functools.lru_cache(maxsize=8)
def _fused_bn(epsilon):
    import jax

    def inv(ones, zeros, variance, gamma):
        x = jax.lax.reduce_window(
            ones, -np.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
        ).reshape(1, -1)
        return ops.batch_normalization(
            x, zeros, variance, axis=-1, offset=zeros, scale=gamma, epsilon=epsilon
        )

    return jax.jit(inv)


def _numpy_dtype(dtype) -> np.dtype:
    name = backend.standardize_dtype(dtype)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


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
        raise SurgeryError(
            f"{name}: unit {unit} has {what} {float(values[unit]):.6g}, beyond "
            f"the range of {dtype.name} BN variables; give this BN float32 "
            f"variables (bn_dtype='mixed_{dtype.name}' or 'float32')"
        )
    return converted
