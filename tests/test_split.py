import keras
import numpy as np
import pytest

import surgery
import surgery.default

X = np.random.default_rng(0).uniform(0, 255, (48, 32, 32, 3)).astype("float32")


def test_split_then_combine_equals_the_original():
    model = surgery.default.load()
    trunk, head = surgery.split(model, "block3_pool")
    assert trunk.outputs[0].shape[1:] == model.get_layer("block3_pool").output.shape[1:]
    assert "fc1" in {layer.name for layer in head.layers}
    assert "block1_conv1" not in {layer.name for layer in head.layers}
    features = trunk.predict_on_batch(X)
    assert np.array_equal(head.predict_on_batch(features), model.predict_on_batch(X))
    assert surgery.verify(model, surgery.combine(trunk, head), X, verbose=0).identical


def test_bn_in_head_on_features_equals_direct_insertion():
    model = surgery.default.load()
    trunk, head = surgery.split(model, "block3_pool")
    features = trunk.predict(X, verbose=0)
    exact = keras.backend.backend() == "torch"  # torch: exact only with zero_mean
    head_bn = surgery.insert_identity_bn(
        head, after=["fc1", "fc2"], data=features, verbose=0, zero_mean=exact
    )
    full = surgery.combine(trunk, head_bn)
    direct = surgery.insert_identity_bn(
        model, after=["fc1", "fc2"], data=X, verbose=0, zero_mean=exact
    )
    assert surgery.verify(model, full, X, verbose=0).identical
    for name in ("fc1_bn", "fc2_bn"):
        spliced = full.get_layer(head_bn.name).get_layer(name).get_weights()
        np.testing.assert_allclose(
            spliced[2], direct.get_layer(name).get_weights()[2], rtol=1e-5, atol=1e-6
        )


def test_split_leaves_original_alone_and_rejects_bad_points():
    model = surgery.default.load()
    before = [w.copy() for w in model.get_weights()]
    trunk, head = surgery.split(model, "fc1")
    head.get_layer("fc2").kernel.assign(np.zeros(head.get_layer("fc2").kernel.shape))
    assert all(
        np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True)
    )
    with pytest.raises(surgery.SurgeryError, match="no layer 'fc7'"):
        surgery.split(model, "fc7")
    x1, x2 = keras.Input((3,)), keras.Input((3,))
    two = keras.Model(
        [x1, x2], keras.layers.Add()([keras.layers.Dense(3, name="d")(x1), x2])
    )
    with pytest.raises(surgery.SurgeryError, match="cannot be computed"):
        surgery.split(two, "d")
