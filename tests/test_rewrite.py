"""The rewrite engine: every edit kind on every kind of graph, in one rebuild."""

import keras
import numpy as np
import pytest
from keras import ops

import surgery
from surgery.graph.edits import InsertAfter, InsertBefore, Remove, Replace, SetWeights
from surgery.graph.rewrite import rewrite

L = keras.layers
RNG = np.random.default_rng(7)


def _x(*shape):
    return RNG.normal(size=shape).astype("float32")


def _run(model, x):
    out = model(x)
    if isinstance(out, (list, tuple)):
        return [ops.convert_to_numpy(o) for o in out]
    return ops.convert_to_numpy(out)


def _same(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return a.shape == b.shape and np.array_equal(a, b)


def _state(model):
    """Everything a rewrite must leave alone in the input model."""
    return (
        [
            (layer.name, type(layer), len(layer._inbound_nodes))
            for layer in model.layers
        ],
        [w.copy() for w in model.get_weights()],
    )


def _check_untouched(model, before, new):
    names, weights = _state(model)
    assert names == before[0]
    assert all(np.array_equal(a, b) for a, b in zip(weights, before[1], strict=True))
    old = {id(v) for v in model.weights}
    assert not any(id(v) in old for v in new.weights)


def _dense(units, name, weights, activation=None):
    layer = L.Dense(units, name=name, activation=activation)
    layer.build((None, weights[0].shape[0]))
    layer.set_weights(weights)
    return layer


def _sequential():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(8, name="d1"),
            L.Activation("relu", name="act"),
            L.Dropout(0.5, name="drop"),
            L.Dense(3, name="d2"),
        ],
        name="seq",
    )


def test_sequential_stays_sequential_with_dropout_removed_and_relu_replaced():
    model = _sequential()
    x, before = _x(5, 6), _state(model)
    new = rewrite(model, [Remove("drop"), Replace("act", L.ReLU(name="relu"))])
    assert isinstance(new, keras.Sequential) and new.name == "seq"
    assert [type(layer) for layer in new.layers] == [L.Dense, L.ReLU, L.Dense]
    assert _same(_run(new, x), _run(model, x))  # both edits are identities
    _check_untouched(model, before, new)


def test_same_weights_give_the_same_outputs_and_other_weights_a_new_function():
    model = _sequential()
    x, before = _x(5, 6), _state(model)
    w1, w2 = model.get_layer("d1").get_weights(), model.get_layer("d2").get_weights()
    same = rewrite(model, [SetWeights("d1", w1)])
    assert _same(_run(same, x), _run(model, x))
    doubled = [w1[0] * 2, w1[1] - 1]
    new = rewrite(model, [SetWeights("d1", doubled)])
    reference = keras.Sequential(
        [keras.Input((6,)), _dense(8, "a", doubled, "relu"), _dense(3, "b", w2)]
    )
    assert _same(_run(new, x), _run(reference, x))
    assert np.array_equal(new.get_layer("d1").get_weights()[0], doubled[0])
    _check_untouched(model, before, new)


def _branches():
    """x -> d1 -> (a, b) -> add; d1's output read by two layers."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((4,), name="x")
    h = L.Dense(5, activation="relu", name="d1")(inputs)
    a = L.Dense(3, name="a")(h)
    b = L.Dense(3, name="b")(h)
    return keras.Model(inputs, L.Add(name="add")([a, b]), name="branches")


def _weights(model, *names):
    return [model.get_layer(name).get_weights() for name in names]


def test_insert_after_reaches_every_consumer_and_before_only_its_own():
    model = _branches()
    x, before = _x(6, 4), _state(model)
    w1, wa, wb = _weights(model, "d1", "a", "b")
    e1 = [_x(5, 5), _x(5)]
    e2 = [_x(5, 5), _x(5)]
    new = rewrite(
        model,
        [
            InsertAfter("d1", [_dense(5, "after_d1", e1)]),
            InsertBefore("b", _dense(5, "before_b", e2)),
        ],
    )
    inputs = keras.Input((4,))
    h = _dense(5, "r1", w1, "relu")(inputs)
    h = _dense(5, "r_after", e1)(h)
    a = _dense(3, "ra", wa)(h)
    b = _dense(3, "rb", wb)(_dense(5, "r_before", e2)(h))
    reference = keras.Model(inputs, L.Add()([a, b]))
    assert _same(_run(new, x), _run(reference, x))
    assert new.get_layer("before_b").output is new.get_layer("b").input
    assert new.get_layer("a").input is new.get_layer("after_d1").output
    _check_untouched(model, before, new)


def test_several_edits_apply_in_one_rebuild():
    model = _branches()
    x, before = _x(6, 4), _state(model)
    w1, wa, wb = _weights(model, "d1", "a", "b")
    wa2 = [wa[0] + 1, wa[1]]
    new = rewrite(
        model,
        [
            Replace("d1", L.Dense(5, name="d1")),  # relu gone, weights given below
            SetWeights("d1", w1),
            SetWeights("a", wa2),
            InsertAfter("add", L.Activation("tanh", name="tanh")),
        ],
    )
    inputs = keras.Input((4,))
    h = _dense(5, "r1", w1)(inputs)
    out = L.Add()([_dense(3, "ra", wa2)(h), _dense(3, "rb", wb)(h)])
    reference = keras.Model(inputs, L.Activation("tanh")(out))
    assert _same(_run(new, x), _run(reference, x))
    assert [layer.name for layer in new.layers][-1] == "tanh"
    _check_untouched(model, before, new)


def _nested():
    keras.utils.set_random_seed(3)
    inner_in = keras.Input((4,))
    h = L.Dense(4, name="inner_d")(inner_in)
    h = L.Activation("relu", name="act")(h)
    inner = keras.Model(inner_in, L.Dropout(0.3, name="drop")(h), name="inner")
    inputs = keras.Input((4,))
    return keras.Model(inputs, L.Dense(2, name="out")(inner(inputs)), name="outer")


def test_edits_inside_a_nested_model_keep_it_nested():
    model = _nested()
    x, before = _x(3, 4), _state(model)
    new = rewrite(model, [Remove("inner/drop"), Replace("inner/act", L.ReLU())])
    inner = new.get_layer("inner")
    assert isinstance(inner, keras.Model)
    assert [type(layer) for layer in inner.layers] == [L.InputLayer, L.Dense, L.ReLU]
    assert _same(_run(new, x), _run(model, x))
    _check_untouched(model, before, new)
    old_inner = model.get_layer("inner")
    assert [layer.name for layer in old_inner.layers][-1] == "drop"


def _shared():
    """One Dense called on two inputs; each result goes to its own output."""
    keras.utils.set_random_seed(4)
    left, right = keras.Input((3,), name="left"), keras.Input((3,), name="right")
    shared = L.Dense(3, name="shared")
    out1 = L.Dense(2, name="o1")(shared(left))
    out2 = L.Dense(2, name="o2")(shared(right))
    return keras.Model([left, right], [out1, out2], name="shared_model")


def _shared_reference(model, extra, at):
    ws, w1, w2 = _weights(model, "shared", "o1", "o2")
    left, right = keras.Input((3,)), keras.Input((3,))
    shared, dense = _dense(3, "s", ws), _dense(3, "e", extra)
    h1, h2 = shared(left), shared(right)
    h1 = dense(h1) if 0 in at else h1
    h2 = dense(h2) if 1 in at else h2
    outputs = [_dense(2, "p1", w1)(h1), _dense(2, "p2", w2)(h2)]
    return keras.Model([left, right], outputs)


@pytest.mark.parametrize("call", [None, 0, 1])
def test_a_shared_layer_is_edited_at_every_call_or_at_one(call):
    model = _shared()
    x, before = [_x(4, 3), _x(4, 3)], _state(model)
    extra = [_x(3, 3), _x(3)]
    inserted = _dense(3, "extra", extra)
    new = rewrite(model, [InsertAfter("shared", [inserted], call=call)])
    at = {0, 1} if call is None else {call}
    assert _same(_run(new, x), _run(_shared_reference(model, extra, at), x))
    assert len(new.get_layer("shared")._inbound_nodes) == 2  # still shared
    assert len(new.get_layer("extra")._inbound_nodes) == len(at)
    _check_untouched(model, before, new)


def test_multi_io_replace_at_one_call_and_remove():
    model = _shared()
    x, before = [_x(4, 3), _x(4, 3)], _state(model)
    ws, w1, w2 = _weights(model, "shared", "o1", "o2")
    other = [ws[0] * 3, ws[1]]
    new = rewrite(model, [Replace("shared", _dense(3, "twin", other), call=1)])
    left, right = keras.Input((3,)), keras.Input((3,))
    outputs = [
        _dense(2, "p1", w1)(_dense(3, "s", ws)(left)),
        _dense(2, "p2", w2)(_dense(3, "t", other)(right)),
    ]
    reference = keras.Model([left, right], outputs)
    assert _same(_run(new, x), _run(reference, x))
    assert len(new.get_layer("shared")._inbound_nodes) == 1
    removed = rewrite(model, [Remove("shared")])  # both calls: a shape-keeping Dense
    reference = keras.Model(
        [left, right], [_dense(2, "q1", w1)(left), _dense(2, "q2", w2)(right)]
    )
    assert _same(_run(removed, x), _run(reference, x))
    assert "shared" not in [layer.name for layer in removed.layers]
    _check_untouched(model, before, removed)


def test_no_edit_gives_a_copy_that_owns_its_variables():
    model = _nested()
    x, before = _x(3, 4), _state(model)
    new = rewrite(model, [])
    assert _same(_run(new, x), _run(model, x))
    _check_untouched(model, before, new)


def test_inserted_layers_can_be_made_from_the_tensor_they_get():
    model = _branches()
    seen = []

    def make(tensor):
        seen.append(tuple(tensor.shape))
        return [L.Identity(name="same")]

    new = rewrite(model, [InsertAfter("d1", make)])
    x = _x(2, 4)
    assert seen == [(None, 5)]
    assert _same(_run(new, x), _run(model, x))


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ([Remove("dense_nowhere")], "no layer 'dense_nowhere'"),
        ([Remove("d1")], "output shape .* differs"),
        ([Remove("add")], "one input and one output"),
        ([InsertAfter("d1", L.Identity(), call=1)], "called 1 time"),
        ([InsertAfter("d1", L.Identity(), output=1)], "output=1"),
        ([Replace("a", L.Dense(3)), Replace("a", L.Dense(3))], "clashes"),
        (["d1"], "is not an edit"),
    ],
)
def test_bad_edits_are_one_clear_error(edits, message):
    model = _branches()
    with pytest.raises(surgery.SurgeryError, match=message):
        rewrite(model, edits)


def test_a_layer_of_the_input_model_is_refused():
    model = _branches()
    with pytest.raises(surgery.SurgeryError, match="belongs to the input model"):
        rewrite(model, [Replace("a", model.get_layer("b"))])


def test_weights_that_do_not_fit_are_one_clear_error():
    model = _branches()
    with pytest.raises(surgery.SurgeryError, match="do not fit"):
        rewrite(model, [SetWeights("a", [np.zeros((2, 2))])])
