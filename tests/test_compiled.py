"""Exactness where users run models: compiled graphs (grappler, oneDNN) and XLA.

Each case runs with pretrained-like weights. Cases a BN cannot leave alone
(the compiler fuses or re-associates a neighbour differently once a BN sits
there) must be named in a warning instead; eager inference is exact always.
"""

import re
import warnings

import keras
import numpy as np
import pytest

import surgery
from surgery.fusion import fusion_causes
from surgery.spots import find_spots
from surgery.synthetic import pretrained_like

L = keras.layers
RNG = np.random.default_rng(0)
ACTIVATIONS = ["relu", "gelu", "silu", "hard_silu", "mish", "sigmoid", "tanh", "elu"]
X_DENSE = RNG.normal(size=(64, 24)).astype("float32")
X_CONV = RNG.normal(size=(16, 8, 8, 3)).astype("float32")


def fused_dense(act):
    inp = keras.Input((24,))
    h = L.Dense(32, activation=act, name="t")(inp)
    return keras.Model(inp, L.Dense(8, name="out")(h)), X_DENSE


def fused_conv(act):
    inp = keras.Input((8, 8, 3))
    h = L.Conv2D(16, 3, activation=act, name="t")(inp)
    return keras.Model(inp, L.Conv2D(8, 3, name="out")(h)), X_CONV


def separate_activation(act):
    inp = keras.Input((24,))
    h = L.Activation(act, name="t")(L.Dense(32, name="fc")(inp))
    return keras.Model(inp, L.Dense(8, name="out")(h)), X_DENSE


def insert(model, x, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = surgery.insert_identity_bn(model, data=x, verbose=0, **kwargs)
    return new, [str(w.message) for w in caught]


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("build", [fused_dense, fused_conv, separate_activation])
def test_bn_after_any_activation_is_identical_compiled_and_under_xla(build, act):
    model, x = build(act)
    pretrained_like(model)
    new, messages = insert(model, x, after=["t"])
    assert not messages, messages
    assert np.array_equal(model.predict_on_batch(x), new.predict_on_batch(x))
    for mode in ("eager", "graph", "xla"):
        report = surgery.verify(model, new, x, verbose=0, mode=mode)
        assert report.identical and report.mode == mode, report


@pytest.mark.parametrize("act", ["relu", "silu", "sigmoid", "tanh", "elu", "gelu"])
def test_bn_between_a_contraction_and_its_activation_is_identical_or_named(act):
    model, x = separate_activation(act)
    pretrained_like(model)
    new, messages = insert(model, x, after=["fc"])
    assert surgery.verify(model, new, x, verbose=0, mode="eager").identical
    graph = surgery.verify(model, new, x, verbose=0, mode="graph")
    if graph.identical:
        assert not messages, messages
    else:
        (message,) = messages
        warned = int(re.search(r"max (\d+) ulp on one batch", message).group(1))
        assert 0 < warned <= graph.max_ulp_diff  # the check sees the first batch
        assert "fc (Dense and the activation after it are fused" in message


def residual(pretrained=True):
    inp = keras.Input((8, 8, 8))
    h = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    h = L.BatchNormalization(name="bn1")(h)
    h = L.Activation("relu")(L.Add(name="add")([h, inp]))
    model = keras.Model(inp, L.Conv2D(4, 1, name="out")(h))
    return pretrained_like(model) if pretrained else model


def test_bn_after_a_bn_that_feeds_an_add_is_identical_or_named():
    model, x = residual(), RNG.normal(size=(16, 8, 8, 8)).astype("float32")
    new, messages = insert(model, x, after=["bn1", "c1"])
    assert surgery.verify(model, new, x, verbose=0, mode="eager").identical
    if surgery.verify(model, new, x, verbose=0, mode="graph").identical:
        assert not messages
    else:
        assert len(messages) == 1 and "bn1 (the offset add of" in messages[0]
        assert "arithmetic_optimization" in messages[0]


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TF's float64 isolation"
)
def test_a_bn_gets_float64_only_where_its_output_is_cast_back():
    inp = keras.Input((24,))
    h = L.Dense(16, activation="silu", name="a")(inp)
    out = L.Dense(4, name="b")(h)
    model = pretrained_like(keras.Model(inp, [out, keras.ops.multiply(h, 2.0)]))
    new, messages = insert(model, X_DENSE, after=["a", "b"])
    if not surgery.verify(model, new, X_DENSE, verbose=0, mode="graph").identical:
        assert len(messages) == 1 and "a (the float32 BN's multiply" in messages[0]
    assert new.get_layer("a_bn").dtype_policy.name == "float32"  # a non-Layer op...
    assert new.get_layer("b_bn").dtype_policy.name == "float32"  # a model output
    assert [t.dtype for t in new.outputs] == [t.dtype for t in model.outputs]
    model2 = pretrained_like(keras.Model(inp, L.Dense(4, name="c")(h)))
    new2, _ = insert(model2, X_DENSE, after=["a"])
    assert new2.get_layer("a_bn").dtype_policy.name == "float64"
    assert new2.outputs[0].dtype == model2.outputs[0].dtype
    float32, _ = insert(model2, X_DENSE, after=["a"], bn_dtype="float32")
    assert float32.get_layer("a_bn").dtype_policy.name == "float32"


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TF's graph mode")
def test_verify_reports_its_mode_and_the_original_s_own_noise():
    model, x = fused_dense("gelu")
    report = surgery.verify(model, model, x, verbose=0, mode="graph")
    assert report.identical and report.mode == "graph" and report.noise_ulp >= 0
    assert "graph mode" in str(report)
    assert surgery.verify(model, model, x, verbose=0).mode == "graph"  # CPU: no XLA
    with pytest.raises(surgery.SurgeryError, match="unknown mode 'fast'"):
        surgery.verify(model, model, x, verbose=0, mode="fast")


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TF's graph compilers"
)
def test_fusion_sensitive_spots_are_the_two_known_neighbourhoods():
    model, _ = separate_activation("sigmoid")
    causes = {
        name: fusion_causes(model, find_spots(model, after=[name])[0])
        for name in ("fc", "t")
    }
    assert causes["t"] == [] and "fused into one kernel" in causes["fc"][0]
    res = residual(pretrained=False)
    (cause,) = fusion_causes(res, find_spots(res, after=["bn1"])[0])
    assert "re-associated with the Add" in cause
    assert fusion_causes(res, find_spots(res, after=["c1"])[0]) == []
