"""fold_bn to a fixed point, and forward folding into the next Dense/Conv."""

import keras
import pytest
from test_fold import bn_count, checked_fold, data, randomise_bn

from surgery.verbs.fold import fold_bn, foldable

L = keras.layers


def _model(*layers, shape=(8, 8, 3)):
    inputs = keras.Input(shape)
    x = inputs
    for layer in layers:
        x = layer(x)
    return randomise_bn(keras.Model(inputs, x))


def test_bn_bn_chain_folds_to_a_fixed_point():
    model = _model(
        L.Conv2D(4, 3, name="conv"),
        L.BatchNormalization(name="bn1"),
        L.BatchNormalization(name="bn2"),
        L.ReLU(),
    )
    assert foldable(model) == {"bn1": "ok", "bn2": "ok (pass 2)"}
    assert bn_count(checked_fold(model, data(8, 8, 3))) == 0


@pytest.mark.parametrize(
    "consumer,shape",
    [
        (L.Conv2D(5, 3, padding="valid", name="next"), (8, 8, 3)),
        (L.Conv1D(5, 2, strides=2, use_bias=False, name="next"), (9, 3)),
        (L.Dense(5, name="next"), (4, 3)),
    ],
)
def test_bn_after_an_activation_folds_forward(consumer, shape):
    first = L.Conv2D(3, 1) if len(shape) == 3 else L.Dense(3)
    model = _model(
        first,
        L.ReLU(),
        L.BatchNormalization(name="bn"),
        consumer,
        shape=shape,
    )
    reason = foldable(model)["bn"]
    assert reason == f"ok: forward into {type(consumer).__name__} 'next'"
    new = checked_fold(model, data(*shape))
    assert bn_count(new) == 0 and new.get_layer("next").use_bias


def test_same_padding_folds_forward_only_without_a_shift():
    def build():
        return _model(
            L.Conv2D(3, 1),
            L.ReLU(),
            L.BatchNormalization(name="bn"),
            L.Conv2D(4, 3, padding="same", name="next"),
        )

    model = build()
    reason = foldable(model)["bn"]
    assert "follows ReLU" in reason and "padding='same'" in reason
    with pytest.warns(UserWarning, match="left 1 BatchNormalization"):
        assert bn_count(fold_bn(model)) == 1
    scaled_only = build()
    bn = scaled_only.get_layer("bn")
    bn.beta.assign(bn.moving_mean * 0)
    bn.moving_mean.assign(bn.moving_mean * 0)
    assert foldable(scaled_only)["bn"] == "ok: forward into Conv2D 'next'"
    assert bn_count(checked_fold(scaled_only, data(8, 8, 3))) == 0
