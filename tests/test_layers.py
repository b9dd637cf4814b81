"""Layer surgery: delete, insert, replace and deepen, exact where they promise it.

Every exact case is judged as users run models, with compiled `predict`
(and XLA on TensorFlow), with pretrained-like weights (non-zero biases and
BN offsets), on Sequential, Functional, nested, shared-layer, multi-IO and
traced subclassed models.
"""

import warnings

import keras
import numpy as np
import pytest

import surgery
from surgery.errors import SurgeryError
from surgery.synthetic import pretrained_like
from tests.helpers import TORCH

L = keras.layers
RNG = np.random.default_rng(11)
TF = keras.backend.backend() == "tensorflow"


def _x(*shape, scale=2.0):
    return (RNG.normal(size=shape) * scale).astype("float32")


def _flat(out):
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return list(out) if isinstance(out, list | tuple) else [out]


def _state(model):
    return (
        [(layer.name, len(layer._inbound_nodes)) for layer in model.layers],
        [w.copy() for w in model.get_weights()],
    )


def assert_exact(model, new, x):
    """Bit-identical in compiled predict (and XLA on TF), nothing shared."""
    a, b = _flat(model.predict(x, verbose=0)), _flat(new.predict(x, verbose=0))
    assert len(a) == len(b)
    for p, q in zip(a, b, strict=True):
        assert p.shape == q.shape and np.array_equal(p, q)
    assert surgery.verify(model, new, x, verbose=0).identical
    if TF:
        assert surgery.verify(model, new, x, verbose=0, mode="xla").identical
    assert not {id(v) for v in new.weights} & {id(v) for v in model.weights}


def assert_untouched(model, before):
    names, weights = _state(model)
    assert names == before[0]
    assert all(np.array_equal(p, q) for p, q in zip(weights, before[1], strict=True))


def sequential():
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((12,)),
            L.Dense(24, activation="relu", name="fc1"),
            L.Dropout(0.5, name="drop"),
            L.BatchNormalization(name="bn"),
            L.Dense(16, activation="relu", name="fc2"),
            L.Dense(5, name="out"),
        ],
        name="seq",
    )
    return pretrained_like(model)


def functional():
    """A residual net: convolutions, depthwise, separable, an Add."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((10, 10, 3))
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inp)
    r = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    r = L.Activation("relu", name="act")(r)
    r = L.Dropout(0.3, name="drop")(r)
    h = L.Add(name="add")([h, r])
    h = L.SeparableConv2D(6, 3, activation="relu", name="sep")(h)
    h = L.Conv2D(4, 2, strides=2, name="conv2")(h)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    out = L.Dense(3, activation="softmax", name="head")(h)
    return pretrained_like(keras.Model(inp, out, name="res"))


def nested():
    keras.utils.set_random_seed(3)
    inner = keras.Sequential(
        [
            keras.Input((8,)),
            L.Dense(8, activation="relu", name="fc"),
            L.Dropout(0.2, name="drop"),
        ],
        name="inner",
    )
    mid_in = keras.Input((8,))
    mid = keras.Model(mid_in, inner(mid_in), name="mid")
    inp = keras.Input((6,))
    h = L.Dense(8, activation="relu", name="pre")(inp)
    out = L.Dense(2, name="post")(mid(h))
    return pretrained_like(keras.Model(inp, out, name="outer"))


def shared():
    keras.utils.set_random_seed(4)
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    dense = L.Dense(6, activation="relu", name="shared")
    drop = L.Dropout(0.4, name="drop")
    ha, hb = drop(dense(a)), drop(dense(b))
    out1 = L.Dense(3, name="o1")(L.Concatenate(name="cat")([ha, hb]))
    out2 = L.Dense(2, name="o2")(hb)
    return pretrained_like(keras.Model([a, b], [out1, out2], name="multi"))


def subclassed():
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.fc1 = L.Dense(10, activation="relu", name="fc1")
            self.drop = L.Dropout(0.5, name="drop")
            self.fc2 = L.Dense(4, name="fc2")

        def call(self, x, training=False):
            return self.fc2(self.drop(self.fc1(x), training=training))

    keras.utils.set_random_seed(5)
    net = Net()
    net(np.zeros((1, 7), "float32"))
    return surgery.functional(pretrained_like(net))


CASES = {
    "sequential": (sequential, lambda: _x(64, 12)),
    "functional": (functional, lambda: _x(32, 10, 10, 3)),
    "nested": (nested, lambda: _x(64, 6)),
    "shared": (shared, lambda: [_x(64, 6), _x(64, 6)]),
    "subclassed": (subclassed, lambda: _x(64, 7)),
}
DROPOUT = {
    "sequential": "drop",
    "functional": "drop",
    "nested": "mid/inner/drop",
    "shared": "drop",
    "subclassed": "drop",
}
DEEPEN = {
    "sequential": ["fc1", "fc2"],
    "functional": ["conv1", "dw", "sep", "conv2", "head"],
    "nested": ["pre", "mid/inner/fc"],
    "shared": ["shared", "o1"],
    "subclassed": ["fc1"],
}


@pytest.mark.parametrize("kind", CASES)
def test_deleting_dropout_is_exact_on_every_graph_kind(kind):
    build, data = CASES[kind]
    model, x = build(), data()
    before = _state(model)
    new = surgery.delete_layer(model, DROPOUT[kind])
    assert_exact(model, new, x)
    assert_untouched(model, before)
    assert type(new) is type(model)
    names = [path for path, _ in _paths(new)]
    assert DROPOUT[kind] not in names and len(names) == len(list(_paths(model))) - 1


@pytest.mark.parametrize("kind", CASES)
def test_deepening_is_exact_on_every_graph_kind(kind):
    build, data = CASES[kind]
    model, x = build(), data()
    before = _state(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = surgery.deepen(model, after=DEEPEN[kind], data=x)
    assert not [w for w in caught if "not bit-identical" in str(w.message)]
    assert_exact(model, new, x)
    assert_untouched(model, before)
    paths = [path for path, _ in _paths(new)]
    for name in DEEPEN[kind]:
        assert f"{name}_deep" in paths
    assert type(new) is type(model)


def _paths(model):
    from surgery.graph.spots import walk_layers

    return walk_layers(model)


def test_deepened_layers_are_identity_copies_of_their_kind():
    model = functional()
    with pytest.warns(UserWarning, match="'head' uses activation 'softmax'"):
        new = surgery.deepen(model, after=["conv2", "dw", "sep", "head"])
    conv = new.get_layer("conv2_deep")
    assert isinstance(conv, L.Conv2D) and conv.padding == "same"
    assert conv.kernel_size == (1, 1) and conv.strides == (1, 1)  # 2 -> 1: a centre
    kernel = keras.ops.convert_to_numpy(conv.kernel)
    assert np.array_equal(kernel[0, 0], np.eye(4))
    dw = keras.ops.convert_to_numpy(new.get_layer("dw_deep").kernel)
    assert dw.shape == (3, 3, 8, 1) and np.array_equal(dw[1, 1], np.ones((8, 1)))
    assert dw.sum() == 8
    assert new.get_layer("sep_deep").activation.__name__ == "relu"
    assert new.get_layer("head_deep").activation.__name__ == "linear"
    assert new.get_layer("dw_deep").activation.__name__ == "linear"


def test_deepen_refuses_what_it_cannot_copy():
    model = sequential()
    with pytest.raises(SurgeryError, match="cannot deepen 'bn': it is a Batch"):
        surgery.deepen(model, after="bn")
    with pytest.raises(SurgeryError, match="no layer 'fc3' in model 'seq'"):
        surgery.deepen(model, after=["fc3"])
    with pytest.raises(SurgeryError, match="check must be True, False or one of"):
        surgery.deepen(model, after=["fc1"], check="fast")


def test_deepen_says_when_the_compiled_model_differs(monkeypatch):
    """The check's message, with an identity made inexact on purpose."""
    from surgery.editing import identity_layers
    from surgery.editing import plan as layer_plan

    def almost(layer, name, path):
        copy = identity_layers.identity_copy(layer, name, path)
        copy.weights[0][0, 0] = 1.0 + 2.0**-10
        return copy

    monkeypatch.setattr(layer_plan, "identity_copy", almost)
    model = sequential()
    with pytest.warns(UserWarning, match="not bit-identical to the original") as w:
        surgery.deepen(model, after="fc1", data=_x(64, 12))
    (message,) = [str(m.message) for m in w if "not bit-identical" in str(m.message)]
    assert "batch-size noise" in message and "max " in message


def test_deleting_an_inserted_identity_bn_restores_the_model():
    model = sequential()
    x = _x(256, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bn = surgery.insert_identity_bn(
            model, after=["fc1", "out"], data=x, verbose=0, zero_mean=TORCH
        )
    assert len(bn.layers) > len(model.layers)
    back = surgery.delete_layer(bn, ["fc1_bn", "out_bn"])
    assert [layer.name for layer in back.layers] == [
        layer.name for layer in model.layers
    ]
    assert_exact(model, back, x)


def test_delete_refuses_a_layer_that_changes_the_shape():
    model = sequential()
    with pytest.raises(SurgeryError, match="output shape .* differs from its input"):
        surgery.delete_layer(model, "fc2")
    with pytest.raises(SurgeryError, match="only a layer with one input and one"):
        surgery.delete_layer(shared(), "cat")
    with pytest.raises(SurgeryError, match="'drop' is called 2 time"):
        surgery.delete_layer(shared(), "drop:2")


def test_one_call_of_a_shared_layer():
    model = shared()
    x = [_x(64, 6), _x(64, 6)]
    new = surgery.delete_layer(model, "drop:1")
    assert_exact(model, new, x)
    assert len(new.get_layer("drop")._inbound_nodes) == 1
    deeper = surgery.deepen(model, after="shared:0")
    assert len(deeper.get_layer("shared_deep")._inbound_nodes) == 1
    assert_exact(model, deeper, x)
    relu = L.ReLU(name="relu_b")
    swapped = surgery.replace_layer(model, "shared:1", relu, copy_weights=False)
    assert len(swapped.get_layer("shared")._inbound_nodes) == 1
    assert swapped.get_layer("relu_b") is relu


def test_insert_a_layer_a_list_or_a_factory():
    model = sequential()
    x = _x(32, 12)
    taken = L.Dense(24, name="fc2")  # name clash: renamed
    new = surgery.insert_layer(model, taken, after="fc1")
    assert taken.name == "fc2_1" and new.get_layer("fc2_1") is taken
    assert isinstance(new, keras.Sequential)
    assert [layer.name for layer in new.layers][:3] == ["fc1", "fc2_1", "drop"]

    shapes = []

    def make(shape):
        shapes.append(shape)
        return [L.Identity(name="a"), L.Identity(name="b")]

    new = surgery.insert_layer(model, make, before="out")
    assert shapes == [(None, 16)]
    assert [layer.name for layer in new.layers][-3:] == ["a", "b", "out"]
    assert_exact(model, new, x)
    with pytest.raises(SurgeryError, match="not both"):
        surgery.insert_layer(model, L.Identity(), after="fc1", before="fc2")
    with pytest.raises(SurgeryError, match="returned 3, not a Keras layer"):
        surgery.insert_layer(model, lambda shape: 3, after="fc1")
    with pytest.raises(SurgeryError, match="belongs to the input model"):
        surgery.insert_layer(model, model.get_layer("bn"), after="fc1")


def test_replace_keeps_weights_where_they_fit():
    model = sequential()
    x = _x(64, 12)
    new = surgery.replace_layer(model, "fc2", L.Dense(16, activation=None, name="fc2"))
    assert new.get_layer("fc2").activation.__name__ == "linear"
    old_fc2, new_fc2 = model.get_layer("fc2"), new.get_layer("fc2")
    assert len(old_fc2.weights) == len(new_fc2.weights) == 2
    for old, got in zip(old_fc2.weights, new_fc2.weights, strict=True):
        assert np.array_equal(
            keras.ops.convert_to_numpy(old), keras.ops.convert_to_numpy(got)
        )
    report = surgery.verify(model, new, x, verbose=0)
    assert not report.identical and report.max_abs_diff > 0
    relu = surgery.replace_layer(
        model, "fc2", L.Dense(16, activation="relu", name="fc2")
    )
    assert_exact(model, relu, x)


def test_replace_activation_with_relu_layer_is_exact():
    model = functional()
    new = surgery.replace_layer(model, "act", L.ReLU())
    assert_exact(model, new, _x(32, 10, 10, 3))


def test_replace_with_another_dtype_policy():
    model = sequential()
    new = surgery.replace_layer(
        model, "fc2", L.Dense(16, activation="relu", dtype="mixed_float16")
    )
    report = surgery.verify(model, new, _x(64, 12), verbose=0)
    assert report.max_abs_diff < 0.05  # float16 arithmetic in one layer
    assert new.layers[-2].compute_dtype == "float16"


def test_replace_refuses_what_does_not_fit():
    model = sequential()
    with pytest.raises(SurgeryError, match=r"outputs shape \(None, 8\) where the old"):
        surgery.replace_layer(model, "fc2", L.Dense(8))
    with pytest.raises(SurgeryError, match="pass copy_weights=False"):
        surgery.replace_layer(model, "fc2", L.Dense(16, use_bias=False))
    own = L.Dense(16, use_bias=False, kernel_initializer="ones", name="own")
    new = surgery.replace_layer(model, "fc2", own, copy_weights=False)
    assert np.all(keras.ops.convert_to_numpy(new.get_layer("own").kernel) == 1)


def test_several_edits_in_one_rebuild():
    model = functional()
    x = _x(32, 10, 10, 3)
    before = _state(model)
    new = surgery.edit(
        model,
        delete=["drop"],
        replace={"act": L.ReLU(name="act")},
        deepen=["conv1", "sep"],
        insert_after={"conv1": L.Identity(name="tap")},
        insert_before={"gap": L.Identity(name="pre_gap")},
    )
    names = [layer.name for layer in new.layers]
    assert "drop" not in names
    assert names.index("conv1") < names.index("conv1_deep") < names.index("tap")
    assert names.index("pre_gap") == names.index("gap") - 1
    assert_exact(model, new, x)
    assert_untouched(model, before)


def test_edit_refuses_conflicts_and_bad_arguments():
    model = sequential()
    with pytest.raises(
        SurgeryError, match="deepen 'fc1' and delete 'fc1' name the same layer"
    ):
        surgery.edit(model, deepen=["fc1"], delete=["fc1"])
    with pytest.raises(SurgeryError, match="name the same layer"):
        surgery.edit(model, replace={"fc1": L.Dense(24)}, deepen=["fc1"])
    with pytest.raises(SurgeryError, match="insert_after 'drop' and delete 'drop'"):
        surgery.edit(model, delete="drop", insert_after={"drop": L.Identity()})
    with pytest.raises(SurgeryError, match="no edits"):
        surgery.edit(model)
    with pytest.raises(SurgeryError, match="replace must be a dict"):
        surgery.edit(model, replace=["fc1"])
    twice = L.Identity()
    with pytest.raises(SurgeryError, match="already given for insert_after 'fc1'"):
        surgery.edit(model, insert_after={"fc1": twice, "fc2": twice})
    with pytest.raises(SurgeryError, match="trace it with surgery.functional"):
        surgery.delete_layer(_Unbuilt(), "x")


class _Unbuilt(keras.Model):
    def call(self, x):
        return x


@keras.saving.register_keras_serializable("test_layers")
class TimesFactor(L.Layer):
    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


class NoConfig(L.Layer):
    """A config that leaves out an argument: it cannot rebuild the layer."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return super().get_config()


def _custom(layer):
    keras.utils.set_random_seed(6)
    inp = keras.Input((5,))
    h = L.Dense(5, name="fc")(inp)
    out = L.Dense(2, name="out")(layer(h))
    return pretrained_like(keras.Model(inp, out))


def test_custom_layers_through_their_config():
    model = _custom(TimesFactor(3.0, name="scale"))
    x = _x(32, 5)
    new = surgery.deepen(model, after="fc")
    assert isinstance(new.get_layer("scale"), TimesFactor)
    assert new.get_layer("scale").factor == 3.0
    assert_exact(model, new, x)
    with pytest.raises(SurgeryError, match=r"cannot copy layer 'odd' \(NoConfig\)"):
        surgery.deepen(_custom(NoConfig(2.0, name="odd")), after="fc")


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_deepen_in_every_float_policy(policy):
    keras.utils.set_random_seed(8)
    inp = keras.Input((6, 6, 3))
    h = L.Conv2D(8, 3, activation="relu", name="conv", dtype=policy)(inp)
    h = L.Flatten(name="flat")(h)
    h = L.Dense(10, activation="relu", name="fc", dtype=policy)(h)
    out = L.Activation("linear", dtype="float32", name="cast")(L.Dense(3, name="o")(h))
    model = pretrained_like(keras.Model(inp, out))
    x = _x(32, 6, 6, 3)
    new = surgery.deepen(model, after=["conv", "fc"], data=x)
    assert new.get_layer("fc_deep").dtype_policy.name == policy
    assert_exact(model, new, x)


def test_deleting_a_cast_says_so():
    keras.utils.set_random_seed(9)
    inp = keras.Input((4,))
    h = L.Dense(4, dtype="mixed_float16", name="fc")(inp)
    model = keras.Model(inp, L.Activation("linear", dtype="float32", name="cast")(h))
    with pytest.warns(UserWarning, match="the layer cast float16 to float32"):
        new = surgery.delete_layer(model, "cast")
    assert new.outputs[0].dtype == "float16"


DENSE = {
    "sequential": ("fc1", 24, "relu"),
    "functional": ("head", 3, "softmax"),
    "nested": ("mid/inner/fc", 8, "relu"),
    "shared": ("shared", 6, "relu"),
    "subclassed": ("fc1", 10, "relu"),
}


@pytest.mark.parametrize("kind", CASES)
def test_identity_insert_and_like_for_like_replace_on_every_graph_kind(kind):
    build, data = CASES[kind]
    model, x = build(), data()
    before = _state(model)
    path, units, activation = DENSE[kind]
    same = L.Dense(units, activation=activation, name="same")
    new = surgery.edit(
        model,
        replace={path: same},
        insert_after={path: L.Identity(name="tap")},
        insert_before={path: L.Activation("linear", name="pre")},
    )
    assert_exact(model, new, x)
    assert_untouched(model, before)
    assert type(new) is type(model)
    paths = [p for p, _ in _paths(new)]
    scope = path.rpartition("/")[0]
    for name in ("same", "tap", "pre"):
        assert (f"{scope}/{name}" if scope else name) in paths


def test_replace_conv_padding_where_the_shape_allows():
    keras.utils.set_random_seed(10)
    inp = keras.Input((None, None, 3))
    h = L.Conv2D(8, 1, padding="valid", activation="relu", name="pw")(inp)
    model = pretrained_like(keras.Model(inp, L.Conv2D(2, 3, name="out")(h)))
    new = surgery.replace_layer(
        model, "pw", L.Conv2D(8, 1, padding="same", activation="relu", name="pw")
    )
    assert new.get_layer("pw").padding == "same"
    assert_exact(model, new, _x(16, 9, 9, 3))


def test_an_insert_that_changes_what_a_layer_reads_is_refused():
    model = sequential()
    with pytest.raises(SurgeryError, match="layer 'fc2' cannot keep its weights: an"):
        surgery.insert_layer(model, L.Dense(5), after="bn")
    new = surgery.insert_layer(model, L.Dense(7), after="out")  # nothing after it
    assert new.outputs[0].shape == (None, 7)


def test_deleting_the_last_layer_of_a_sequential_model_is_refused():
    model = keras.Sequential([keras.Input((4,)), L.Dropout(0.2, name="d")], name="s")
    with pytest.raises(SurgeryError, match="'s' would have no layers left"):
        surgery.delete_layer(model, "d")
