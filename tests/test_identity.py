"""The identity search: every path picks the cheapest exact candidate."""

import keras
import numpy as np
import pytest

from surgery.numerics import backend_bn, exactness, identity, pair_search
from surgery.numerics.identity import identity_weights, many_identity_weights
from surgery.numerics.moments import Moments

WIDTHS = [1, 3, 4, 6, 10, 13, 16, 24, 96, 1000]  # SIMD tails and none


def layer_moments(seed=0):
    """Moments spanning dead units, tiny and huge means and variances."""
    rng = np.random.default_rng(seed)
    layers = []
    for units in WIDTHS:
        mean = rng.normal(size=units) * 10 ** rng.uniform(-3, 4, units)
        var = np.abs(rng.normal(size=units)) * 10 ** rng.uniform(-8, 3, units)
        mean[0] = var[0] = 0.0
        layers.append(Moments(500, mean, var * 500))
    return layers


def cheapest_exact_in_layer_shape(moments, dtype):
    """The specification, evaluated the slow way: every candidate in a call
    of the layer's own width, then the cheapest exact one per unit."""
    np_dtype = backend_bn.numpy_dtype(dtype)
    layer = pair_search.candidates(moments, 1e-3, np_dtype, "t")
    inv = np.stack(
        [
            backend_bn.bn_inv(layer.variance[:, c], layer.gamma[:, c], 1e-3, np_dtype)
            for c in range(layer.cost.shape[1])
        ],
        axis=1,
    )
    exact = exactness.is_identity(layer.gamma, inv, layer.mean)
    cost = np.where(exact, layer.cost, np.inf)
    best = np.argmin(cost, axis=1)
    rows = np.arange(len(best))
    found = np.isfinite(cost[rows, best])
    return layer.gamma[rows, best], layer.variance[rows, best], found


# Off TensorFlow, Keras' BN computes float64 in float32 and insert refuses it.
DTYPES = ["float32", "float16", "bfloat16"]
if keras.backend.backend() == "tensorflow":
    DTYPES.insert(1, "float64")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stack_elements", [identity.STACK_ELEMENTS, 2000])
def test_many_layers_at_once_match_one_at_a_time(dtype, stack_elements, monkeypatch):
    monkeypatch.setattr(identity, "STACK_ELEMENTS", stack_elements)  # chunks
    layers = layer_moments()
    names = [f"l{i}" for i in range(len(layers))]
    together = many_identity_weights(layers, 1e-3, dtype, names)
    for moments, joint in zip(layers, together, strict=True):
        alone = identity_weights(moments, 1e-3, dtype)
        for a, b in zip(alone.as_list(), joint.as_list(), strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        assert np.array_equal(alone.inexact_units, joint.inexact_units)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_choice_is_exact_in_the_layer_shape(dtype):
    np_dtype = backend_bn.numpy_dtype(dtype)
    for moments in layer_moments(seed=1):
        weights = identity_weights(moments, 1e-3, dtype)
        found = np.ones(moments.units, dtype=bool)
        found[weights.inexact_units] = False
        inv = backend_bn.bn_inv(
            weights.moving_variance, weights.gamma, 1e-3, np_dtype
        )  # one call of the layer's width, as the layer computes it
        exact = exactness.is_identity(weights.gamma, inv, weights.moving_mean)
        assert exact[found].all()
        assert np.array_equal(weights.beta, weights.moving_mean)
        # and a unit is reported inexact only if no candidate is exact (the
        # wider search of `_widened` may still find one the first missed)
        assert not (cheapest_exact_in_layer_shape(moments, dtype)[2] & ~found).any()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layer_shaped_search_picks_the_cheapest_exact_pair(dtype, monkeypatch):
    monkeypatch.setattr(  # every unit unsettled: all through that search
        pair_search, "unsettled_units", lambda layer, best, *a: np.ones(len(best), bool)
    )
    for moments in layer_moments(seed=1):
        weights = identity_weights(moments, 1e-3, dtype)
        gamma, variance, found = cheapest_exact_in_layer_shape(moments, dtype)
        assert set(weights.inexact_units) <= set(np.flatnonzero(~found))
        assert np.array_equal(weights.gamma[found], gamma[found])
        assert np.array_equal(weights.moving_variance[found], variance[found])


def test_layer_shaped_search_stops_after_the_round_that_finds_the_last_unit(
    monkeypatch,
):
    calls = []
    bn_inv = backend_bn.bn_inv
    monkeypatch.setattr(
        pair_search, "bn_inv", lambda *a: calls.append(a[0].shape) or bn_inv(*a)
    )
    moments = layer_moments()[-1]  # 1000 units, all exact in float32
    dtype = np.dtype("float32")
    if keras.backend.backend() != "torch":  # pairs must hold under XLA too: fewer
        layer = pair_search.candidates(moments, 1e-3, dtype, "t")
        n = moments.units
        _, exact, _ = pair_search.search_in_layer_shape(
            layer, np.ones(n, bool), np.zeros(n, np.intp), 1e-3, dtype
        )
        moments = Moments(moments.count, moments.mean[exact], moments.m2[exact])
    layer = pair_search.candidates(moments, 1e-3, dtype, "t")
    calls.clear()  # off TF, the candidates take one call of their own
    everyone = np.ones(moments.units, dtype=bool)
    fill = np.zeros(moments.units, dtype=np.intp)
    best, found, _ = pair_search.search_in_layer_shape(
        layer, everyone, fill, 1e-3, dtype
    )

    order = np.argsort(layer.cost, axis=1, kind="stable")
    rank = (order == best[:, None]).argmax(axis=1)  # k-th cheapest candidate
    rounds_end = 1
    while rounds_end <= rank.max():  # rounds of 1, 1, 2, 4, ... calls
        rounds_end *= 2
    assert found.all()
    assert all(shape == (moments.units,) for shape in calls)
    assert len(calls) == min(rounds_end, layer.cost.shape[1])
