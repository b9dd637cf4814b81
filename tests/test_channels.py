"""channel_groups and delete_channels on every coupled structure.

Each deletion is checked three ways: the exact shapes of every weight, the
weights themselves (the new kernel is the old one with exactly the right
rows and columns taken out, computed here with `np.delete`), and the
outputs: with the deleted channels' readers zeroed in the original first, the
two models compute the same function, so compiled predictions agree to
float32 rounding (the readers sum fewer terms).
"""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np
import pytest

import surgery
from surgery.errors import SurgeryError

L = keras.layers
RNG = np.random.default_rng(0)


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        new = []
        for v, w in zip(layer.weights, weights, strict=True):
            name = v.path.rsplit("/", 1)[-1]
            if name == "moving_variance":
                new.append(rng.uniform(0.5, 2.0, w.shape).astype(w.dtype))
            else:
                new.append(rng.normal(0, 0.3, w.shape).astype(w.dtype))
        layer.set_weights(new)
    return model


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def _x(model, n=16, seed=1):
    shape = tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def _close(a, b):
    """Same function to float32 rounding, and `b` loads with plain Keras."""
    pa, pb = a.predict(_x(a), verbose=0), b.predict(_x(a), verbose=0)
    np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pruned.keras")
        b.save(path)
        loaded = keras.models.load_model(path)
    assert np.array_equal(loaded.predict(_x(a), verbose=0), pb)


def _zero_rows(layer, rows, axis):
    """Zero a reader's kernel on the input channels `rows`."""
    weights = layer.get_weights()
    kernel = weights[0]
    index = [slice(None)] * kernel.ndim
    index[axis] = rows
    kernel[tuple(index)] = 0
    layer.set_weights([kernel, *weights[1:]])


def _group(model, producer):
    return next(g for g in surgery.channel_groups(model) if producer in g.producers)


def test_residual_add_couples_both_branches_and_the_bn_after():
    x = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(x)
    b = L.Conv2D(8, 1, name="b", use_bias=False)(x)
    y = L.Add(name="add")([a, b])
    y = L.BatchNormalization(name="bn")(y)
    y = L.ReLU(name="relu")(y)
    y = L.Conv2D(4, 3, name="c")(y)
    model = _randomize(keras.Model(x, y))
    group = _group(model, "a")
    assert group.producers == ("a", "b")
    assert set(group.layers) == {"a", "b", "bn", "c"}
    assert group.size == 8 and group.fixed is None
    np.testing.assert_array_equal(group.channels["b"], np.arange(8))
    before = _weights(model)
    new = surgery.delete_channels(model, "b", [1, 6])
    for old, now in zip(before, model.get_weights(), strict=True):
        assert np.array_equal(old, now)  # the input model is untouched
    a_old, a_new = model.get_layer("a"), new.get_layer("a")
    assert np.array_equal(
        a_new.kernel.numpy(), np.delete(a_old.kernel.numpy(), [1, 6], -1)
    )
    assert np.array_equal(a_new.bias.numpy(), np.delete(a_old.bias.numpy(), [1, 6]))
    assert new.get_layer("b").kernel.shape == (1, 1, 3, 6)
    assert [w.shape for w in new.get_layer("bn").get_weights()] == [(6,)] * 4
    c_old = model.get_layer("c").kernel.numpy()
    assert np.array_equal(
        new.get_layer("c").kernel.numpy(), np.delete(c_old, [1, 6], 2)
    )


def test_residual_add_deletion_keeps_the_function_when_readers_ignore_it():
    x = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(x)
    b = L.Conv2D(8, 1, name="b")(x)
    y = L.Add(name="add")([a, b])
    y = L.Conv2D(4, 3, name="c")(y)
    model = _randomize(keras.Model(x, y))
    _zero_rows(model.get_layer("c"), [2, 5], axis=2)
    _close(model, surgery.delete_channels(model, "add", [2, 5]))


def test_concatenate_offsets():
    x = keras.Input((5, 5, 2))
    p = L.Conv2D(3, 1, name="p")(x)
    q = L.Conv2D(4, 1, name="q")(x)
    y = L.Concatenate(name="cat")([p, q])
    y = L.Conv2D(2, 3, name="r")(y)
    model = _randomize(keras.Model(x, y))
    groups = surgery.channel_groups(model)
    assert [g.producers for g in groups if g.fixed is None] == [("p",), ("q",)]
    new = surgery.delete_channels(model, "q", [0, 3])
    r_old = model.get_layer("r").kernel.numpy()
    # q's channels sit after p's 3 in the concatenation
    assert np.array_equal(
        new.get_layer("r").kernel.numpy(), np.delete(r_old, [3, 6], 2)
    )
    assert new.get_layer("q").filters == 2 and new.get_layer("p").filters == 3
    # the concatenation's own channel 4 is q's channel 1
    new = surgery.delete_channels(model, "cat", [4])
    assert new.get_layer("q").filters == 3
    assert np.array_equal(new.get_layer("r").kernel.numpy(), np.delete(r_old, [4], 2))


def test_depthwise_with_multiplier_and_separable():
    x = keras.Input((7, 7, 3))
    y = L.Conv2D(5, 1, name="p")(x)
    y = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(y)  # 10 channels
    y = L.SeparableConv2D(4, 3, depth_multiplier=2, name="sep")(y)
    y = L.Conv2D(3, 1, name="out")(y)
    model = _randomize(keras.Model(x, y))
    group = _group(model, "p")
    assert set(group.layers) >= {"p", "dw", "sep"} and group.size == 5
    new = surgery.delete_channels(model, "p", [1])
    dw_old, dw_new = model.get_layer("dw"), new.get_layer("dw")
    assert np.array_equal(
        dw_new.kernel.numpy(), np.delete(dw_old.kernel.numpy(), [1], 2)
    )
    # depthwise output channel c*2+k comes from input c: 2 and 3 go
    assert np.array_equal(dw_new.bias.numpy(), np.delete(dw_old.bias.numpy(), [2, 3]))
    sep_old, sep_new = model.get_layer("sep"), new.get_layer("sep")
    depth = np.delete(sep_old.depthwise_kernel.numpy(), [2, 3], 2)
    assert np.array_equal(sep_new.depthwise_kernel.numpy(), depth)
    point = np.delete(sep_old.pointwise_kernel.numpy(), [4, 5, 6, 7], 2)
    assert np.array_equal(sep_new.pointwise_kernel.numpy(), point)
    new = surgery.delete_channels(model, "sep", [0, 2])
    assert new.get_layer("sep").pointwise_kernel.shape == (1, 1, 20, 2)
    assert new.get_layer("out").kernel.shape == (1, 1, 2, 3)


def test_conv_transpose_kernel_layout():
    x = keras.Input((4, 4, 3))
    y = L.Conv2DTranspose(6, 3, strides=2, name="up")(x)
    y = L.Conv2DTranspose(2, 3, name="up2")(y)
    model = _randomize(keras.Model(x, y))
    new = surgery.delete_channels(model, "up", [0, 4])
    old1, old2 = (
        model.get_layer("up").kernel.numpy(),
        model.get_layer("up2").kernel.numpy(),
    )
    assert np.array_equal(
        new.get_layer("up").kernel.numpy(), np.delete(old1, [0, 4], 2)
    )
    assert np.array_equal(
        new.get_layer("up2").kernel.numpy(), np.delete(old2, [0, 4], 3)
    )
    _zero_rows(model.get_layer("up2"), [0, 4], axis=3)
    _close(model, surgery.delete_channels(model, "up", [0, 4]))


def test_flatten_into_dense_removes_every_position_of_a_channel():
    x = keras.Input((3, 3, 2))
    y = L.Conv2D(4, 2, name="conv")(x)  # (2, 2, 4)
    y = L.Flatten(name="flat")(y)
    y = L.Dense(5, name="fc")(y)
    model = _randomize(keras.Model(x, y))
    new = surgery.delete_channels(model, "conv", [1])
    positions = [s * 4 + 1 for s in range(4)]  # channels_last: channel fastest
    old = model.get_layer("fc").kernel.numpy()
    assert np.array_equal(
        new.get_layer("fc").kernel.numpy(), np.delete(old, positions, 0)
    )
    _zero_rows(model.get_layer("fc"), positions, axis=0)
    _close(model, surgery.delete_channels(model, "conv", [1]))


def test_squeeze_excite_reshape_and_multiply():
    x = keras.Input((5, 5, 3))
    f = L.Conv2D(6, 3, padding="same", activation="relu", name="f")(x)
    s = L.GlobalAveragePooling2D(name="gap")(f)
    s = L.Reshape((1, 1, 6), name="shape")(s)
    s = L.Conv2D(2, 1, activation="relu", name="reduce")(s)
    s = L.Conv2D(6, 1, activation="sigmoid", name="expand")(s)
    y = L.Multiply(name="scale")([f, s])
    y = L.Conv2D(3, 1, name="out")(y)
    model = _randomize(keras.Model(x, y))
    assert _group(model, "f").producers == ("f", "expand")
    new = surgery.delete_channels(model, "f", [0, 3])
    assert new.get_layer("shape").target_shape == (1, 1, 4)
    assert new.get_layer("reduce").kernel.shape == (1, 1, 4, 2)
    assert new.get_layer("expand").kernel.shape == (1, 1, 2, 4)
    assert new.get_layer("out").kernel.shape == (1, 1, 4, 3)
    _zero_rows(model.get_layer("out"), [0, 3], axis=2)
    _zero_rows(model.get_layer("reduce"), [0, 3], axis=2)
    _close(model, surgery.delete_channels(model, "f", [0, 3]))


def test_nested_model_is_followed_inside():
    inner_in = keras.Input((6,))
    h = L.Dense(8, activation="relu", name="hidden")(inner_in)
    h = L.BatchNormalization(name="bn")(h)
    inner = keras.Model(inner_in, h, name="inner")
    x = keras.Input((6,))
    y = L.Dense(3, name="head")(inner(x))
    model = _randomize(keras.Model(x, y))
    new = surgery.delete_channels(model, "inner/hidden", [0, 7])
    assert new.get_layer("inner").get_layer("hidden").units == 6
    assert new.get_layer("inner").get_layer("bn").moving_mean.shape == (6,)
    assert new.get_layer("head").kernel.shape == (6, 3)
    _zero_rows(model.get_layer("head"), [0, 7], axis=0)
    _close(model, surgery.delete_channels(model, "inner/hidden", [0, 7]))


def test_shared_layer_couples_what_it_reads_at_each_call():
    x = keras.Input((4,))
    p = L.Dense(6, name="p")(x)
    q = L.Dense(6, name="q")(x)
    shared = L.Dense(2, name="shared")
    y = L.Concatenate(name="cat")([shared(p), shared(q)])
    model = _randomize(keras.Model(x, y))
    group = _group(model, "p")
    assert group.producers == ("p", "q") and "shared" in group.layers
    new = surgery.delete_channels(model, "p", [5])
    assert new.get_layer("q").units == 5 and new.get_layer("shared").kernel.shape == (
        5,
        2,
    )
    assert len(new.get_layer("shared")._inbound_nodes) == 2  # still shared


def test_sequential_stays_sequential_and_loads_with_plain_keras(tmp_path):
    model = _randomize(
        keras.Sequential(
            [
                keras.Input((10,)),
                L.Dense(12, activation="relu", name="fc1"),
                L.Dropout(0.5),
                L.Dense(3, name="fc2"),
            ]
        )
    )
    new = surgery.delete_channels(model, "fc1", [0, 1, 2])
    assert isinstance(new, keras.Sequential)
    path = tmp_path / "pruned.keras"
    new.save(path)
    loaded = keras.models.load_model(path)
    x = _x(model)
    assert np.array_equal(loaded.predict(x, verbose=0), new.predict(x, verbose=0))
    assert loaded.get_layer("fc1").units == 9


@pytest.mark.parametrize(
    "layer, channels, message",
    [
        ("fc2", [0], "it reaches model output 'fc2'"),
        ("input_layer", [0], "it is model input"),
        ("fc1", [12], "out of range"),
        ("fc1", [], "non-empty list of ints"),
        ("fc1", [3, 3], "repeat an index"),
        ("fc1", list(range(12)), "would have no channels left"),
        ("fc", [0], "no layer 'fc'"),
    ],
)
def test_refusals_are_one_line(layer, channels, message):
    model = keras.Sequential(
        [
            keras.Input((10,), name="input_layer"),
            L.Dense(12, name="fc1"),
            L.Dense(3, name="fc2"),
        ]
    )
    with pytest.raises(SurgeryError, match=message) as e:
        surgery.delete_channels(model, layer, channels)
    assert "\n" not in str(e.value)


def test_layers_it_cannot_follow_fix_their_channels():
    x = keras.Input((6, 6, 4))
    a = L.Conv2D(8, 1, name="a")(x)
    g = L.Conv2D(8, 3, groups=2, name="grouped")(a)
    h = L.Conv2D(8, 1, name="h")(g)
    lam = L.Lambda(lambda t: t * 2.0, name="lam")(h)
    y = L.Conv2D(2, 1, name="out")(lam)
    model = keras.Model(x, y)
    by = {g.producers: g for g in surgery.channel_groups(model)}
    assert "grouped convolution" in by[("a",)].fixed
    assert "cannot be followed" in by[("grouped",)].fixed
    assert "Lambda 'lam'" in by[("h",)].fixed
    with pytest.raises(
        SurgeryError, match="channel 0 of 'a' cannot be removed: 'grouped'"
    ):
        surgery.delete_channels(model, "a", [0])


def test_embedding_conv1d_layernorm_and_prelu():
    x = keras.Input((7,), dtype="int32")
    e = L.Embedding(20, 6, name="emb")(x)
    h = L.Conv1D(5, 3, padding="same", name="conv")(e)
    h = L.LayerNormalization(name="ln")(h)
    h = L.PReLU(name="prelu")(h)
    h = L.ZeroPadding1D(1)(h)
    h = L.GlobalMaxPooling1D()(h)
    y = L.Dense(2, name="out")(h)
    model = _randomize(keras.Model(x, y))
    by = {g.producers: g for g in surgery.channel_groups(model)}
    assert by[("conv",)].mixed == "ln"  # removing a channel changes the others
    assert by[("emb",)].fixed is None
    new = surgery.delete_channels(model, "emb", [0, 5])
    old = model.get_layer("emb").embeddings.numpy()
    assert np.array_equal(new.get_layer("emb").embeddings.numpy(), old[:, 1:5])
    assert new.get_layer("conv").kernel.shape == (3, 4, 5)
    new = surgery.delete_channels(model, "conv", [2])
    assert new.get_layer("ln").gamma.shape == (4,)
    alpha = model.get_layer("prelu").alpha.numpy()
    assert np.array_equal(
        new.get_layer("prelu").alpha.numpy(), np.delete(alpha, [2], -1)
    )
    assert new.get_layer("out").kernel.shape == (4, 2)


def test_conv3d_channels_first_follows_axis_1():
    x = keras.Input((2, 4, 4, 4))
    h = L.Conv3D(6, 3, padding="same", data_format="channels_first", name="c")(x)
    h = L.BatchNormalization(axis=1, name="bn")(h)
    h = L.MaxPooling3D(2, data_format="channels_first")(h)
    h = L.Flatten(data_format="channels_first")(h)
    y = L.Dense(3, name="out")(h)
    model = _randomize(keras.Model(x, y))
    new = surgery.delete_channels(model, "c", [4])
    assert new.get_layer("bn").gamma.shape == (5,)
    # channels_first Flatten moves channels last: position = s * 6 + c, s in 0..7
    old = model.get_layer("out").kernel.numpy()
    positions = [s * 6 + 4 for s in range(8)]
    assert np.array_equal(
        new.get_layer("out").kernel.numpy(), np.delete(old, positions, 0)
    )


def test_channels_pruned_before_a_nested_model_resize_its_input():
    inner_in = keras.Input((5, 5, 6))
    h = L.BatchNormalization(name="bn")(inner_in)
    h = L.Conv2D(3, 1, name="inner_conv")(h)
    inner = keras.Model(inner_in, h, name="inner")
    x = keras.Input((5, 5, 2))
    y = inner(L.Conv2D(6, 1, name="outer_conv")(x))
    model = _randomize(keras.Model(x, L.Flatten()(y)))
    new = surgery.delete_channels(model, "outer_conv", [0, 1])
    nested = new.get_layer("inner")
    assert nested.inputs[0].shape == (None, 5, 5, 4)
    assert nested.get_layer("bn").gamma.shape == (4,)
    assert nested.get_layer("inner_conv").kernel.shape == (1, 1, 4, 3)
    _zero_rows(model.get_layer("inner").get_layer("inner_conv"), [0, 1], axis=2)
    _close(model, surgery.delete_channels(model, "outer_conv", [0, 1]))


def test_inception_resnet_scaled_sum_joins_its_branches():
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    x = keras.Input((5, 5, 3))
    trunk = L.Conv2D(6, 1, name="trunk")(x)
    branch = L.Conv2D(6, 3, padding="same", name="branch")(trunk)
    y = CustomScaleLayer(0.2, name="scaled")([trunk, branch])
    y = L.Conv2D(2, 1, name="out")(y)
    model = _randomize(keras.Model(x, y))
    assert _group(model, "trunk").producers == ("trunk", "branch")
    new = surgery.delete_channels(model, "trunk", [3])
    assert new.get_layer("branch").kernel.shape == (3, 3, 5, 5)
    _zero_rows(model.get_layer("out"), [3], axis=2)
    _zero_rows(model.get_layer("branch"), [3], axis=2)
    _close(model, surgery.delete_channels(model, "trunk", [3]))
