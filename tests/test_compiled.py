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
from helpers import MEASURED_ON, assert_exact_where_measured

import surgery
from surgery.graph.fusion import fusion_causes
from surgery.graph.spots import find_spots
from surgery.runtime.machine import cpu_kind
from surgery.testing.synthetic import pretrained_like

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
    return new, [str(w.message) for w in caught if w.category is UserWarning]


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
def test_a_float64_bn_is_cast_back_where_its_consumers_would_not():
    # a_bn feeds a Dense (which casts to float32) and a non-Layer op (which
    # would not); b_bn is a model output. Both get a float32 Identity after
    # them, so every output keeps its dtype and XLA is exact (float32 BNs
    # here measured 2048 and 128 ulp under XLA before).
    inp = keras.Input((24,))
    h = L.Dense(16, activation="silu", name="a")(inp)
    out = L.Dense(4, name="b")(h)
    model = pretrained_like(keras.Model(inp, [out, keras.ops.multiply(h, 2.0)]))
    new, messages = insert(model, X_DENSE, after=["a", "b"])
    assert not messages or cpu_kind() not in MEASURED_ON, messages
    for name in ("a", "b"):
        assert new.get_layer(f"{name}_bn").dtype_policy.name == "float64"
        cast = new.get_layer(f"{name}_bn_cast")
        assert isinstance(cast, L.Identity) and cast.compute_dtype == "float32"
    assert [t.dtype for t in new.outputs] == [t.dtype for t in model.outputs]
    assert_exact_where_measured(model, new, X_DENSE, ("graph", "xla"), after=["a", "b"])
    # where every consumer casts back already, no Identity is added
    model2 = pretrained_like(keras.Model(inp, L.Dense(4, name="c")(h)))
    new2, _ = insert(model2, X_DENSE, after=["a"])
    assert new2.get_layer("a_bn").dtype_policy.name == "float64"
    assert "a_bn_cast" not in [layer.name for layer in new2.layers]
    assert new2.outputs[0].dtype == model2.outputs[0].dtype
    float32, _ = insert(model2, X_DENSE, after=["a"], bn_dtype="float32")
    assert float32.get_layer("a_bn").dtype_policy.name == "float32"


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TF's float64 isolation"
)
def test_the_cast_back_layer_is_stock_keras_and_survives_save_and_sequential(
    tmp_path,
):
    seq = keras.Sequential(
        [keras.Input((24,)), L.Dense(16, activation="relu", name="a"), L.Dense(4)]
    )
    pretrained_like(seq)
    last = seq.layers[-1].name
    new, messages = insert(seq, X_DENSE, after=["a", last])
    assert not messages or cpu_kind() not in MEASURED_ON, messages
    assert isinstance(new, keras.Sequential)
    assert [layer.name for layer in new.layers][-2:] == [
        f"{last}_bn",
        f"{last}_bn_cast",
    ]
    path = tmp_path / "seq.keras"
    new.save(path)
    loaded = keras.models.load_model(path)  # plain Keras, no custom objects
    assert np.array_equal(loaded(X_DENSE), seq(X_DENSE))  # eager: exact anywhere
    assert loaded.outputs[0].dtype == "float32"


def conv_net(act):
    """Two convs and a Dense head; BN goes after each conv and the output."""
    inp = keras.Input((12, 12, 3))
    h = L.Conv2D(8, 3, activation=act, name="c1")(inp)
    h = L.Conv2D(8, 3, activation=act, name="c2")(h)
    h = L.Flatten()(h)
    model = keras.Model(inp, L.Dense(5, name="out")(h))
    x = RNG.normal(size=(32, 12, 12, 3)).astype("float32")
    return pretrained_like(model), x


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_bn_after_every_conv_and_at_the_output_is_identical_under_xla(act):
    # Measured before the cast-back layer (TF 2.21, AMD AVX-512): the float32
    # output BN cost 48 ulp under XLA with silu.
    model, x = conv_net(act)
    model.compile(jit_compile=keras.backend.backend() != "torch")
    torch = keras.backend.backend() == "torch"  # exact there with zero_mean
    after = ["c1", "c2", "out"]
    new, messages = insert(model, x, after=after, zero_mean=torch)
    assert not messages or cpu_kind() not in MEASURED_ON, messages
    modes = {"tensorflow": ("graph", "xla"), "jax": ("xla",)}.get(
        keras.backend.backend(), ()
    )
    assert_exact_where_measured(model, new, x, modes, after=after, zero_mean=torch)
    new.compile(jit_compile=keras.backend.backend() != "torch")
    if cpu_kind() in MEASURED_ON:
        assert np.array_equal(model.predict(x, verbose=0), new.predict(x, verbose=0))


def silu_then_global_average():
    """Conv2D(silu) -> [BN] -> GlobalAveragePooling2D, with seeded weights.

    XLA fuses a BN there into the loop that computes silu and sums it for the
    pooling, which then computes differently: 288 to 1,024 ulp measured on
    AMD AVX-512 (float32 or float64 BN alike), exact in graph mode.
    """
    keras.utils.set_random_seed(1)
    inp = keras.Input((12, 12, 3))
    h = L.Conv2D(8, 3, activation="silu", name="c")(inp)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    model = pretrained_like(keras.Model(inp, L.Dense(5, name="out")(h)))
    return model, RNG.normal(size=(64, 12, 12, 3)).astype("float32")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TF's XLA")
def test_check_runs_in_the_mode_asked_for_or_the_model_is_compiled_for():
    model, x = silu_then_global_average()
    new, messages = insert(model, x, after=["c"])  # predict's mode: graph here
    assert not messages or cpu_kind() not in MEASURED_ON, messages
    assert surgery.verify(model, new, x, verbose=0).mode == "graph"
    if surgery.verify(model, new, x, verbose=0, mode="xla").identical:
        assert cpu_kind() not in MEASURED_ON
        pytest.skip(f"exact under XLA on {cpu_kind()}: nothing to warn about")
    _, messages = insert(model, x, after=["c"], check="xla")
    assert len(messages) == 1 and "in xla mode on this machine" in messages[0]
    assert "the sum of GlobalAveragePooling2D 'gap'" in messages[0]  # the cause
    model.compile(jit_compile=True)  # now predict runs XLA, and so does check
    _, messages = insert(model, x, after=["c"])
    assert len(messages) == 1 and "in xla mode" in messages[0]
    with pytest.raises(surgery.SurgeryError, match="check must be True, False or"):
        insert(model, x, after=["c"], check="fast")


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


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TF's XLA")
def test_convert_verifies_a_jit_compiled_model_under_xla():
    model, x = conv_net("silu")
    model.compile(jit_compile=True)
    result = surgery.convert(model, after=["c1", "c2", "out"], data=x, verbose=0)
    assert result.report.mode == "xla"
    xla = surgery.verify(model, result.model, x, verbose=0, mode="xla")
    assert xla.mode == "xla"
    assert xla.max_ulp_diff == result.report.max_ulp_diff  # the same comparison
    if cpu_kind() in MEASURED_ON:
        assert result.report.identical, result.report
