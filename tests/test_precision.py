"""Identity BN under low- and high-precision policies, and fine-tuning it.

The 16-bit tests prove exactness the brute-force way: every finite value of
the dtype goes through the BN layer, per unit, and must come back unchanged.
"""

import keras
import ml_dtypes
import numpy as np
import pytest
from helpers import TORCH, assert_identical_insert

import surgery
from surgery.numerics.identity import identity_weights

L = keras.layers
RNG = np.random.default_rng(0)


@pytest.fixture
def policy():
    """Sets a global dtype policy for building a model, then restores float32."""

    def use(name):
        keras.config.set_dtype_policy(name)

    try:
        yield use
    finally:
        keras.config.set_dtype_policy("float32")


def mlp(dropout=True):
    inp = keras.Input((12,), name="x")
    h = L.Dense(32, activation="relu", name="fc1")(inp)
    if dropout:
        h = L.Dropout(0.5, name="drop")(h)
    h = L.Dense(16, activation="relu", name="fc2")(h)
    return keras.Model(inp, L.Dense(3, name="out")(h))


def data(n=64):
    return RNG.normal(size=(n, 12)).astype("float32")


def every_value(dtype):
    """All finite values of a 16-bit dtype, and both infinities.

    bfloat16 subnormals are float32 subnormals once upcast, which TensorFlow
    flushes to zero on CPU in every float32 op (the layer before the BN
    too), so they are left out for bfloat16.
    """
    values = np.arange(2**16, dtype=np.uint16).view(dtype)
    wide = np.abs(values.astype(np.float32))
    keep = ~np.isnan(wide)
    if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        keep &= (wide == 0) | (wide >= np.finfo(np.float32).tiny)
    return values[keep]


def passes_every_value(bn, dtype):
    """Per unit, whether the BN returns each 16-bit value unchanged."""
    units = bn.get_weights()[0].shape[0]
    x = np.repeat(every_value(dtype)[:, None], units, axis=1)
    y = keras.ops.convert_to_numpy(bn(x, training=False))
    assert y.dtype == x.dtype
    return np.all(y.astype(np.float32) == x.astype(np.float32), axis=0)


def relu_moments(units=64, dead=8):
    """Moments of ReLU-like activations: means 0.05..3, some dead units."""
    shift = RNG.uniform(-2, 2, size=units)
    scale = RNG.uniform(0.1, 3, size=units)
    act = np.maximum(RNG.normal(size=(2000, units)) * scale + shift, 0)
    act[:, :dead] = 0
    return surgery.Moments.of(act)


def bn_layer(dtype, weights, epsilon=1e-3):
    bn = L.BatchNormalization(epsilon=epsilon, dtype=dtype)
    bn.build((None, weights.gamma.shape[0]))
    bn.set_weights(weights.as_list())
    return bn


# policy -> (BN variable dtype, BN compute dtype) for ReLU taps of `mlp`. A
# float32 layer's BN is float64 where its consumers cast back to float32
# (compilers cannot rewrite across the casts; see surgery.graph.fusion).
EXPECTED = {
    "float32": ("float64", "float64"),
    "float64": ("float64", "float64"),
    "mixed_float16": ("float32", "float16"),
    "mixed_bfloat16": ("float32", "bfloat16"),
    "float16": ("float32", "float16"),  # live units: no exact 16-bit pair
    "bfloat16": ("float32", "bfloat16"),
}


ON_TF = keras.backend.backend() == "tensorflow"
if not ON_TF:  # float64 isolation is TensorFlow's (see surgery.graph.fusion)
    EXPECTED["float32"] = ("float32", "float32")
if TORCH:  # zero_mean (see helpers): a zero mean has exact 16-bit pairs
    EXPECTED["float16"] = ("float16", "float16")
    EXPECTED["bfloat16"] = ("bfloat16", "bfloat16")
WIDENED = [name for name in ("float16", "bfloat16") if EXPECTED[name][0] == "float32"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_identical_under_every_policy(policy, name):
    policy(name)
    model = mlp()
    policy("float32")
    x = data()
    if name == "float64" and not ON_TF:
        with pytest.raises(surgery.SurgeryError, match="computes in float32"):
            surgery.insert_identity_bn(model, ["fc1"], data=x, verbose=0)
        return
    with pytest.warns() if name in WIDENED else _no_warning():
        new = assert_identical_insert(model, x, after=["fc1", "fc2"])
    bn = new.get_layer("fc1_bn")
    assert (bn.variable_dtype, bn.compute_dtype) == EXPECTED[name]
    assert bn.output.dtype == EXPECTED[name][1]
    assert [t.dtype for t in new.outputs] == [t.dtype for t in model.outputs]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="float32 BN")
def test_float64_keeps_float64_statistics(policy):
    policy("float64")
    model = mlp()
    policy("float32")
    x = (data(200) * 1e3).astype("float64")  # exact through the float32 Input
    new = assert_identical_insert(model, x, after="fc1")
    gamma, beta, mean, var = new.get_layer("fc1_bn").get_weights()
    assert gamma.dtype == np.float64
    act = keras.ops.convert_to_numpy(model.get_layer("fc1")(x))
    assert act.dtype == np.float64
    np.testing.assert_allclose(mean, act.mean(0), rtol=1e-13)
    np.testing.assert_allclose(var, act.var(0), rtol=1e-13)
    assert np.array_equal(beta, mean)


def test_float16_variables_when_every_unit_is_exact(policy):
    policy("float16")
    model = mlp()
    policy("float32")
    var = np.concatenate([[0.0, 1e-7, 1e-4], np.logspace(-3, 3, 29)])
    stats = {"fc1": surgery.Moments(100, np.zeros(32), var * 100)}
    new = surgery.insert_identity_bn(model, after="fc1", stats=stats)
    bn = new.get_layer("fc1_bn")
    assert bn.variable_dtype == "float16"
    gamma, beta, mean, variance = bn.get_weights()
    np.testing.assert_allclose(variance, var, rtol=2**-10 * 9, atol=1e-6)
    assert np.all(passes_every_value(bn, np.float16))
    assert surgery.verify(model, new, data() * 100, verbose=0).identical


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_exact_flag_matches_a_run_over_every_16_bit_value(dtype):
    moments = relu_moments()
    weights = identity_weights(moments, 1e-3, np.dtype(dtype).name, name="t")
    flagged = np.ones(moments.units, dtype=bool)
    flagged[weights.inexact_units] = False
    passed = passes_every_value(bn_layer(np.dtype(dtype).name, weights), dtype)
    assert np.array_equal(flagged, passed)
    assert np.all(passed[:8])  # dead units are always exact
    assert np.array_equal(weights.beta, weights.moving_mean)
    assert np.array_equal(weights.moving_mean, moments.mean.astype(dtype))


def test_float16_calibration_keeps_the_statistics_close():
    moments = relu_moments()
    weights = identity_weights(moments, 1e-3, "float16", name="t")
    live = moments.var > 1e-2
    rel = np.abs(weights.moving_variance[live] - moments.var[live]) / moments.var[live]
    assert np.max(rel) < 8 * 2**-10
    std = np.sqrt(moments.var + 1e-3)
    assert np.max(np.abs(weights.gamma - std) / std) < 8 * 2**-10


@pytest.mark.parametrize("what,unit", [("variance", 3), ("mean", 5)])
def test_beyond_float16_range_is_a_clear_error(policy, what, unit):
    mean, var = np.ones(32), np.ones(32)
    (var if what == "variance" else mean)[unit] = 1e6
    stats = {"fc1": surgery.Moments(10, mean, var * 10)}
    with pytest.raises(surgery.SurgeryError, match=f"fc1: unit {unit} has {what}"):
        identity_weights(stats["fc1"], 1e-3, "float16", name="fc1")
    policy("float16")
    model = mlp()
    policy("float32")
    with pytest.raises(surgery.SurgeryError, match=f"^fc1: unit {unit} .*float16"):
        surgery.insert_identity_bn(model, after="fc1", stats=stats, bn_dtype="float16")
    with pytest.warns(UserWarning, match="keep float32 variables"):
        new = surgery.insert_identity_bn(model, after="fc1", stats=stats)
    assert new.get_layer("fc1_bn").variable_dtype == "float32"
    assert surgery.verify(model, new, data(), verbose=0).identical


def test_forced_float16_warns_about_inexact_units(policy):
    policy("float16")
    model = mlp()
    policy("float32")
    x = data()
    with pytest.warns(UserWarning, match="fc1_bn: .* no exact identity pair"):
        new = surgery.insert_identity_bn(
            model, after="fc1", data=x, verbose=0, bn_dtype="float16"
        )
    weights = new.get_layer("fc1_bn").get_weights()
    assert all(np.all(np.isfinite(w)) and w.dtype == np.float16 for w in weights)


@pytest.mark.parametrize("name", ["float32", "mixed_float16"])
def test_fine_tuning_starts_from_the_measured_statistics(policy, name):
    policy(name)
    model = mlp(dropout=False)
    policy("float32")
    x, y = data(128), RNG.normal(size=(128, 3)).astype("float32")
    stats = surgery.activation_stats(model, ["fc1"], x, verbose=0)
    new = surgery.insert_identity_bn(model, after="fc1", stats=stats, momentum=0.9)
    bn = new.get_layer("fc1_bn")
    _, _, mean, var = bn.get_weights()
    assert np.array_equal(mean, stats["fc1"].mean.astype(bn.variable_dtype))
    np.testing.assert_allclose(var, stats["fc1"].var, rtol=1e-6)

    batch = x[:32]
    act = keras.Model(new.input, new.get_layer("fc1").output)(batch)
    act = keras.ops.convert_to_numpy(act).astype(np.float64)
    optimizer = keras.optimizers.SGD(0.01)
    if name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    new.compile(optimizer=optimizer, loss="mse")
    loss = new.train_on_batch(batch, y[:32])
    assert np.isfinite(loss)
    _, _, mean1, var1 = bn.get_weights()
    np.testing.assert_allclose(mean1, 0.9 * mean + 0.1 * act.mean(0), atol=1e-4)
    np.testing.assert_allclose(var1, 0.9 * var + 0.1 * act.var(0), atol=1e-3)
    assert not np.allclose(mean1, mean, atol=1e-4)

    start = new.evaluate(x, y, verbose=0)
    history = new.fit(x, y, batch_size=32, epochs=3, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    assert new.evaluate(x, y, verbose=0) < start
    if name == "mixed_float16":
        assert isinstance(new.optimizer, keras.optimizers.LossScaleOptimizer)
        assert new.get_layer("fc1").kernel.dtype == "float32"


def test_frozen_bn_stays_an_identity_in_training_mode():
    model, x = mlp(dropout=False), data()
    new = surgery.insert_identity_bn(model, after="fc1", data=x, verbose=0)
    bn = new.get_layer("fc1_bn")
    before = [w.copy() for w in bn.get_weights()]
    act = new.get_layer("fc1")(x)
    bn.trainable = False
    assert np.array_equal(bn(act, training=True), act)
    new.compile("sgd", "mse")
    new.train_on_batch(x, np.zeros((64, 3)))
    for a, b in zip(before, bn.get_weights(), strict=True):
        assert np.array_equal(a, b)
    bn.trainable = True  # batch statistics: no longer an exact identity
    out = keras.ops.convert_to_numpy(bn(act[:16], training=True))
    assert not np.array_equal(out, act[:16])


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def test_verify_compares_models_of_different_precision(policy):
    reference = mlp(dropout=False)
    policy("mixed_float16")
    half = mlp(dropout=False)
    half.set_weights(reference.get_weights())
    x = data()
    # One batch on both sides: activations depend on the batch's shape.
    report = surgery.verify(reference, half, x, batch_size=len(x), verbose=0)
    wide = np.asarray(reference.predict_on_batch(x), np.float64)
    narrow = np.asarray(half.predict_on_batch(x), np.float64)
    assert not report.identical and report.max_ulp_diff > 0
    assert report.max_abs_diff == pytest.approx(np.abs(wide - narrow).max())
    assert surgery.verify(half, half, x, verbose=0).identical
