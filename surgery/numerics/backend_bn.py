"""A BN's `inv = rsqrt(variance + eps) * gamma` exactly as each backend computes it.

The identity search keeps a `(variance, gamma)` pair only if `inv` is
exactly what an identity needs, so `inv` must be computed the way the layer
will compute it: through the backend's own `batch_normalization` op, in the
layer's compute dtype and width, and, where a compiled graph computes it
differently (TensorFlow under XLA, JAX inside a YNNPACK fusion), that way
too. A pair counts only if it holds under every way.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
from keras import backend, ops


def numpy_dtype(dtype) -> np.dtype:
    """The NumPy dtype of a Keras dtype name (bfloat16 from `ml_dtypes`)."""
    name = backend.standardize_dtype(dtype)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def bn_inv(variance, gamma, epsilon, dtype) -> np.ndarray:
    """`rsqrt(variance + eps) * gamma` exactly as the backend's BN computes it.

    Evaluated through `ops.batch_normalization` on x = 1, mean = beta = 0,
    whose output is then `inv` itself (also for torch's `(x - mean) * inv +
    beta`), in the dtype the layer computes in. A 1-D input is computed
    exactly as a layer of that width computes it. A 2-D input holds rows of
    candidates: TensorFlow takes the per-unit vectors as they are, the other
    backends reshape them to one unit axis, so there the rows are laid end to
    end as one long vector of units.
    """
    compute = numpy_dtype(backend.result_type(str(dtype), "float32"))
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
            fused_inv(v.reshape(-1), g.reshape(-1), epsilon), out.reshape(-1)
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


def fused_inv(variance, gamma, epsilon) -> np.ndarray:
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
