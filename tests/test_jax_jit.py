"""JAX's compiled inference: BNs that XLA hands to a YNNPACK fusion.

`predict` runs under `jax.jit`. On CPU, XLA can put a BN's whole arithmetic,
`rsqrt` included, into the `__ynn_fusion` of a neighbouring pooling and dot,
where `rsqrt` is YNNPACK's `1 / sqrt(x)` rather than XLA's own. A pair that
gives `inv == 1` under one then misses by an ulp under the other.
"""

import warnings

import keras
import numpy as np
import pytest

import surgery
from surgery.numerics import backend_bn, identity
from surgery.numerics.moments import Moments

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="JAX's compiled BN"
)


def ulps(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32)).max())


def test_pairs_are_exact_inside_and_outside_a_fusion():
    rng = np.random.default_rng(0)
    var = np.abs(rng.normal(size=4096)) * 10 ** rng.uniform(-6, 2, 4096)
    weights = identity.identity_weights(Moments(100, np.zeros(4096), var * 100), 1e-3)
    assert not weights.inexact_units.size
    gamma, variance = weights.gamma, weights.moving_variance
    fused = backend_bn.fused_inv(variance, gamma, 1e-3)
    own = keras.ops.batch_normalization(
        np.ones(4096, np.float32), np.zeros(4096, np.float32), variance,
        axis=-1, offset=np.zeros(4096, np.float32), scale=gamma, epsilon=1e-3,
    )  # fmt: skip
    assert (fused == 1).all()
    assert (np.asarray(own) == 1).all()


def test_bn_between_pooled_dense_layers_is_exact_in_predict():
    """ReLU, max pool, Dense(4096) and the BN all land in one YNN fusion."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2, 2, 256))
    y = keras.layers.MaxPooling2D()(keras.layers.ReLU()(inputs))
    y = keras.layers.Flatten()(y)
    y = keras.layers.Dense(4096, activation="relu", name="fc1")(y)
    model = keras.Model(inputs, keras.layers.Dense(16, name="out")(y))
    x = np.random.default_rng(0).normal(size=(32, 2, 2, 256)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = surgery.insert_identity_bn(
            model, after=["fc1"], data=x, batch_size=32, verbose=0
        )
    assert ulps(model.predict(x, verbose=0), new.predict(x, verbose=0)) == 0
    assert ulps(model(x), new(x)) == 0
