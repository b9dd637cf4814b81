"""Fractions of exact zeros per unit (APoZ), measured in the moments pass.

A `TapPlan` with `zeros=True` returns, after the spots' moments, the moments
of each spot's indicator `x == 0`, whose mean is the unit's fraction of
zeros. The models here have integer weights and integer inputs, so every
activation is an exact small integer in float32 and the zeros are computed
by hand in NumPy, free of rounding, from the same data.
"""

import keras
import numpy as np
import pytest

from surgery.engines.local import LocalEngine
from surgery.graph.tap_models import TapPlan, tap_model

L = keras.layers
RTOL = 1e-12  # fractions of counts: exact but for the merge's divisions


def integers(rng, low, high, shape):
    return rng.integers(low, high + 1, size=shape).astype("float32")


@pytest.fixture(scope="module")
def dense():
    """A Dense+ReLU on 6 inputs with a dead unit (never > 0) and a unit that is
    never 0, shared by two inputs; its data and its weights."""
    rng = np.random.default_rng(11)
    kernel = integers(rng, -2, 2, (6, 8))
    bias = integers(rng, -2, 2, (8,))
    kernel[:, 0], bias[0] = 0.0, -1.0  # unit 0 is always 0
    kernel[:, 1], bias[1] = 0.0, 3.0  # unit 1 is never 0
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    fc = L.Dense(8, activation="relu", name="fc")
    out = L.Dense(2, name="head")(L.Concatenate(name="cat")([fc(a), fc(b)]))
    model = keras.Model([a, b], out)
    fc.set_weights([kernel, bias])
    x = [integers(rng, -3, 3, (50, 6)), integers(rng, -3, 3, (50, 6))]
    return model, x, kernel, bias


def measure(model, x, plan, batch_size=16):
    session = LocalEngine().session(model, x, batch_size=batch_size, verbose=0)
    with session:
        return session.moments(plan)


def test_dense_relu_zero_fractions_equal_numpy_on_the_same_data(dense):
    model, x, kernel, bias = dense
    plan = TapPlan((("after", "fc"), ("before", "head")), zeros=True)
    (fc, head, fc_zeros, head_zeros), samples = measure(model, x, plan)
    assert samples == 50
    # `fc` is called on both inputs: its two call sites pool into one spot
    h = np.concatenate([np.maximum(xi @ kernel + bias, 0) for xi in x])
    want = np.mean(h == 0, axis=0)
    assert want[0] == 1.0 and want[1] == 0.0 and 0 < want[2:].min() < 1
    assert fc_zeros.count == fc.count == 100
    np.testing.assert_allclose(fc_zeros.mean, want, rtol=RTOL, atol=0)
    # the head's input: both calls' activations side by side
    concatenated = np.concatenate(
        [np.maximum(xi @ kernel + bias, 0) for xi in x], axis=1
    )
    np.testing.assert_allclose(
        head_zeros.mean, np.mean(concatenated == 0, axis=0), rtol=RTOL, atol=0
    )
    assert head_zeros.count == 50
    # the ordinary moments are those of the activations themselves
    np.testing.assert_allclose(fc.mean, h.mean(axis=0, dtype=np.float64), rtol=RTOL)


def test_the_ordinary_moments_are_the_same_with_or_without_zeros(dense):
    model, x, _, _ = dense
    taps = (("after", "fc"), ("before", "head"))
    plain, n = measure(model, x, TapPlan(taps))
    both, m = measure(model, x, TapPlan(taps, zeros=True))
    assert n == m and len(plain) == 2 and len(both) == 4
    for p, q in zip(plain, both[:2], strict=True):
        assert p.count == q.count
        assert np.array_equal(p.mean, q.mean) and np.array_equal(p.m2, q.m2)


def test_a_plan_with_zeros_gets_its_own_tap_model(dense):
    model, _, _, _ = dense
    taps = (("after", "fc"),)
    without, spots, owners = tap_model(model, TapPlan(taps))
    with_zeros, both, owners_zeros = tap_model(model, TapPlan(taps, zeros=True))
    again, _, _ = tap_model(model, TapPlan(taps))
    assert with_zeros is not without and again is without
    assert len(without.outputs) == 3 * 2  # a triple per call site of `fc`
    assert len(with_zeros.outputs) == 2 * 3 * 2
    assert owners == [0, 0] and owners_zeros == [0, 0, 1, 1]
    assert [(s.side, s.spec) for s in both] == [("after", "fc")] * 2
    assert [(s.side, s.spec) for s in spots] == [("after", "fc")]
    assert TapPlan.of(spots, zeros=True) == TapPlan(taps, zeros=True)


def conv_by_hand(x, kernel, bias):
    """A 'valid' stride-1 convolution with ReLU, channels last, in NumPy."""
    k = kernel.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    # windows: (n, h, w, c_in, k, k); kernel: (k, k, c_in, c_out)
    return np.maximum(np.einsum("nhwcij,ijco->nhwo", windows, kernel) + bias, 0)


def test_conv_zero_fractions_per_channel_over_batch_and_positions():
    rng = np.random.default_rng(5)
    kernel = integers(rng, -1, 1, (3, 3, 2, 5))
    bias = integers(rng, -2, 2, (5,))
    inputs = keras.Input((9, 9, 2))
    conv = L.Conv2D(5, 3, activation="relu", name="conv")
    pooled = L.GlobalMaxPooling2D(name="pool")(conv(inputs))
    model = keras.Model(inputs, pooled)
    conv.set_weights([kernel, bias])
    x = integers(rng, -2, 2, (30, 9, 9, 2))
    (moments, zeros), samples = measure(
        model, x, TapPlan((("after", "conv"),), zeros=True), batch_size=8
    )
    h = conv_by_hand(x, kernel, bias)
    assert samples == 30 and zeros.count == 30 * 7 * 7
    want = np.mean(h == 0, axis=(0, 1, 2))
    assert 0 < want.min() and want.max() < 1  # neither all nor no zeros
    np.testing.assert_allclose(zeros.mean, want, rtol=RTOL, atol=0)
    want_mean = h.mean(axis=(0, 1, 2), dtype=np.float64)
    np.testing.assert_allclose(moments.mean, want_mean, rtol=RTOL)


def test_a_ray_pass_gives_the_local_zero_fractions_bit_for_bit(dense, tmp_path):
    ray = pytest.importorskip("ray")
    import surgery

    model, x, _, _ = dense
    plan = TapPlan((("after", "fc"),), zeros=True)
    want, _ = measure(model, x, plan)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        engine = surgery.RayEngine(workers=1)
        with engine.session(model, x, batch_size=16, verbose=0) as session:
            got, samples = session.moments(plan)
    finally:
        ray.shutdown()
    assert samples == 50 and len(got) == 2
    for g, w in zip(got, want, strict=True):
        assert g.count == w.count
        assert np.array_equal(g.mean, w.mean) and np.array_equal(g.m2, w.m2)
