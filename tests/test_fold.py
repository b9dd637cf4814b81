"""fold_bn: outputs match the BN model within rtol 1e-5 (atol 1e-5 x output scale)."""

import warnings

import keras
import numpy as np
import pytest
from helpers import snapshot
from keras import tree

import surgery
from surgery.verbs.fold import fold_bn, foldable

L = keras.layers
RNG = np.random.default_rng(1)
RTOL = 1e-5


def data(*shape, n=16):
    return RNG.normal(size=(n, *shape)).astype("float32")


def randomise_bn(model):
    """Non-trivial gamma, beta and moving statistics for every BN."""
    for layer in _all_layers(model):
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            values = {
                "gamma": RNG.uniform(0.5, 1.5, n),
                "beta": RNG.normal(0, 0.5, n),
                "moving_mean": RNG.normal(0, 0.5, n),
                "moving_variance": RNG.uniform(0.5, 2.0, n),
            }
            for name, v in values.items():
                if getattr(layer, name, None) is not None:
                    getattr(layer, name).assign(v.astype("float32"))
    return model


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def bn_count(model):
    return sum(isinstance(layer, L.BatchNormalization) for layer in _all_layers(model))


def assert_close(reference, got):
    for a, b in zip(tree.flatten(reference), tree.flatten(got), strict=True):
        scale = float(np.abs(a).max())
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=RTOL * scale)


def checked_fold(model, x, **kwargs):
    """Fold; check outputs, that the original is untouched and shares nothing."""
    before = snapshot(model)
    reference = model.predict_on_batch(x)
    new = fold_bn(model, **kwargs)
    assert_close(reference, new.predict_on_batch(x))
    for a, b in zip(before, model.get_weights(), strict=True):
        assert np.array_equal(a, b)
    assert not {id(v) for v in new.weights} & {id(v) for v in model.weights}
    return new


@pytest.mark.parametrize(
    "layer,shape,axis",
    [
        (L.Dense(6, name="p"), (5,), -1),
        (L.Dense(6, use_bias=False, name="p"), (3, 5), -1),
        (L.Conv1D(4, 3, name="p"), (10, 3), -1),
        (L.Conv2D(4, 3, use_bias=False, name="p"), (8, 8, 3), -1),
        (L.Conv2D(6, 3, groups=3, name="p"), (8, 8, 3), -1),
        (L.Conv3D(4, 2, name="p"), (5, 5, 5, 2), -1),
        (L.Conv3D(4, 2, data_format="channels_first", name="p"), (2, 5, 5, 6), 1),
        (L.DepthwiseConv1D(3, depth_multiplier=2, name="p"), (10, 3), -1),
        (L.DepthwiseConv2D(3, depth_multiplier=2, name="p"), (8, 8, 3), -1),
        (L.SeparableConv1D(5, 3, depth_multiplier=2, name="p"), (10, 3), -1),
        (
            L.SeparableConv2D(5, 3, depth_multiplier=2, use_bias=False, name="p"),
            (8, 8, 3),
            -1,
        ),
        (L.Conv1DTranspose(4, 3, strides=2, name="p"), (6, 3), -1),
        (L.Conv2DTranspose(4, 3, use_bias=False, name="p"), (6, 6, 3), -1),
        (L.Conv3DTranspose(4, 2, name="p"), (4, 4, 4, 2), -1),
    ],
)
def test_every_producer_type_folds(layer, shape, axis):
    inp = keras.Input(shape)
    out = L.ReLU()(L.BatchNormalization(axis=axis, name="bn")(layer(inp)))
    model = randomise_bn(keras.Model(inp, out))
    assert foldable(model) == {"bn": "ok"}
    new = checked_fold(model, data(*shape))
    assert bn_count(new) == 0
    assert new.get_layer("p").use_bias


def test_identity_bn_folds_back_to_the_original_weights():
    inp = keras.Input((8, 8, 3))
    h = L.Conv2D(6, 3, name="conv", bias_initializer="random_normal")(inp)
    h = L.Dense(5, name="fc", bias_initializer="random_normal")(L.Flatten()(h))
    model = keras.Model(inp, L.Dense(2, name="out")(L.ReLU()(h)))
    x = data(8, 8, 3, n=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # units without an exact identity pair
        with_bn = surgery.insert_identity_bn(
            model, after=["conv", "fc"], data=x, verbose=0
        )
    folded = fold_bn(with_bn)
    assert bn_count(with_bn) == 2 and bn_count(folded) == 0
    for name in ("conv", "fc"):
        for old, new in zip(
            model.get_layer(name).get_weights(),
            folded.get_layer(name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_max_ulp(new, old, maxulp=1)


def test_resnet50_nested_folds_every_bn():
    resnet = keras.applications.ResNet50(
        weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3)
    )
    randomise_bn(resnet)
    inp = keras.Input((32, 32, 3))
    model = keras.Model(inp, L.Dense(10, name="head")(resnet(inp)))
    report = foldable(model)
    assert len(report) == 53 == bn_count(model)
    assert set(report.values()) == {"ok"}
    assert "resnet50/conv1_bn" in report
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        new = checked_fold(model, data(32, 32, 3, n=4))
    assert bn_count(new) == 0
    assert isinstance(new.get_layer("resnet50"), keras.Model)


def unfoldable_model():
    x = keras.Input((6,), name="x")
    y = keras.Input((6,), name="y")
    at_input = L.BatchNormalization(name="bn_input")(x)
    act = L.BatchNormalization(name="bn_act")(L.Dense(4, activation="relu")(at_input))
    shared = L.Dense(4, name="shared")
    after_shared = L.BatchNormalization(name="bn_shared_dense")(shared(x))
    plain = L.Dense(4, name="used_twice")(y)
    used_twice = L.Add()([L.BatchNormalization(name="bn_used_twice")(plain), plain])
    after_add = L.BatchNormalization(name="bn_add")(L.Add()([act, shared(y)]))
    bn_twice = L.BatchNormalization(name="bn_twice")
    twice = L.Add()([bn_twice(L.Dense(4)(x)), bn_twice(L.Dense(4)(y))])
    image = keras.Input((5, 5, 2), name="image")
    wrong_axis = L.BatchNormalization(axis=1, name="bn_axis")(L.Conv2D(5, 1)(image))
    ok = L.BatchNormalization(center=False, scale=False, name="bn_ok")(
        L.Dense(4, name="fine")(y)
    )
    outputs = [after_shared, used_twice, after_add, twice, L.Flatten()(wrong_axis), ok]
    return randomise_bn(keras.Model([x, y, image], outputs))


def test_unfoldable_bns_are_left_in_place_and_listed():
    model = unfoldable_model()
    reasons = foldable(model)
    expected = {
        "bn_input": "ok: forward into Dense",
        "bn_act": "has activation 'relu'",
        "bn_shared_dense": "Dense 'shared' is shared (called 2 times)",
        "bn_used_twice": "output of Dense 'used_twice' is also used elsewhere",
        "bn_add": "follows Add",
        "bn_twice": "BN layer is shared (called 2 times)",
        "bn_axis": "normalises axis 1, but the channels of Conv2D",
        "bn_ok": "ok",
    }
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reason in reasons[name], (name, reasons[name])
    x = [data(6), data(6), data(5, 5, 2)]
    with pytest.warns(UserWarning, match="left 6 BatchNormalization") as caught:
        new = checked_fold(model, x)
    message = next(str(w.message) for w in caught if "left 6" in str(w.message))
    folded = {"bn_ok", "bn_input"}
    assert all(f"'{name}'" in message for name in expected if name not in folded)
    left = {
        layer.name for layer in new.layers if isinstance(layer, L.BatchNormalization)
    }
    assert left == set(expected) - folded
    assert new.get_layer("fine").use_bias


def test_layers_selects_and_refuses_bad_names():
    model = unfoldable_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        new = checked_fold(model, [data(6), data(6), data(5, 5, 2)], layers="bn_ok")
    assert bn_count(new) == bn_count(model) - 1
    with pytest.raises(surgery.SurgeryError, match="cannot fold 'bn_act': .*relu"):
        fold_bn(model, layers=["bn_ok", "bn_act"])
    with pytest.raises(surgery.SurgeryError, match="did you mean 'bn_ok'"):
        fold_bn(model, layers="bn_okk")
    with pytest.raises(surgery.SurgeryError, match="'fine' is not a BatchNorm"):
        fold_bn(model, layers="fine")
    no_bn = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    with pytest.raises(surgery.SurgeryError, match="no BatchNormalization layer"):
        fold_bn(no_bn)


def test_nested_sequential_selection_by_path():
    inner = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            L.Conv2D(4, 3, name="conv"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(),
            L.Conv2D(4, 1, name="conv2"),
            L.BatchNormalization(name="bn2"),
        ],
        name="inner",
    )
    inp = keras.Input((6, 6, 3))
    model = randomise_bn(keras.Model(inp, inner(inp)))
    assert foldable(model) == {"inner/bn1": "ok", "inner/bn2": "ok"}
    new = checked_fold(model, data(6, 6, 3), layers=["inner/bn1"])
    names = [layer.name for layer in new.get_layer("inner").layers]
    assert "bn1" not in names and "bn2" in names


def test_sequential_stays_sequential_and_survives_keras_round_trip(tmp_path):
    model = randomise_bn(
        keras.Sequential(
            [
                keras.Input((8, 8, 3)),
                L.Conv2D(4, 3, use_bias=False, name="conv"),
                L.BatchNormalization(name="bn1"),
                L.ReLU(),
                L.Flatten(),
                L.Dense(5, name="fc"),
                L.BatchNormalization(name="bn2"),
            ]
        )
    )
    x = data(8, 8, 3)
    new = checked_fold(model, x)
    assert isinstance(new, keras.Sequential) and bn_count(new) == 0
    path = tmp_path / "folded.keras"
    new.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras.Sequential)
    assert np.array_equal(loaded.predict_on_batch(x), new.predict_on_batch(x))


def test_channels_first_bias_that_keras_would_misplace_is_not_folded():
    # TF's ops.add adds a (1, C, 1, 1, 1) bias along the last axis when the
    # last dimension equals C (Keras 3.15); here the output is (N, 4, 4, 4, 4).
    conv = L.Conv3D(4, 2, data_format="channels_first", name="p")
    inp = keras.Input((2, 5, 5, 5))
    model = randomise_bn(
        keras.Model(inp, L.BatchNormalization(axis=1, name="bn")(conv(inp)))
    )
    if keras.backend.backend() != "tensorflow":  # other backends broadcast it
        assert foldable(model)["bn"] == "ok"
        assert bn_count(checked_fold(model, data(2, 5, 5, 5))) == 0
        return
    assert "wrong axis" in foldable(model)["bn"]
    with pytest.warns(UserWarning, match="left 1 BatchNormalization"):
        new = checked_fold(model, data(2, 5, 5, 5))
    assert bn_count(new) == 1
