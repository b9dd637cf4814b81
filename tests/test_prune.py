"""prune_channels: what each criterion removes, and what the report says.

Which channels a criterion should pick is computed here from the weights or
the data with NumPy, independently of the code under test. The dead and
constant criteria are exact in real arithmetic; in float32 the readers sum
fewer terms, so compiled outputs are compared at a stated bound: at most
1e-5 relative to the output scale (float32's eps is 1.2e-7; a reader summing
a few hundred products rounds well inside it).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import surgery
from surgery.errors import SurgeryError

L = keras.layers
BOUND = 1e-5


def _x(shape, n=128, seed=1):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def _set(layer, **named):
    weights = []
    for v, w in zip(layer.weights, layer.get_weights(), strict=True):
        weights.append(named.get(v.path.rsplit("/", 1)[-1], w))
    layer.set_weights(weights)


def _agree(a, b, x):
    pa, pb = a.predict(x, verbose=0), b.predict(x, verbose=0)
    scale = np.abs(pa).max()
    assert np.abs(pa - pb).max() <= BOUND * scale, np.abs(pa - pb).max() / scale


def _dead_mlp(seed=0):
    """fc1 has 16 ReLU units; units 2, 7 and 11 never fire (bias -100)."""
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            L.Dense(16, activation="relu", name="fc1"),
            L.Dense(4, name="fc2"),
        ]
    )
    bias = rng.normal(0, 0.1, 16).astype("float32")
    bias[[2, 7, 11]] = -100.0
    _set(
        model.get_layer("fc1"),
        kernel=rng.normal(0, 0.5, (8, 16)).astype("float32"),
        bias=bias,
    )
    _set(
        model.get_layer("fc2"),
        kernel=rng.normal(0, 0.5, (16, 4)).astype("float32"),
        bias=rng.normal(0, 0.1, 4).astype("float32"),
    )
    return model


def test_dead_relu_units_are_removed_and_outputs_agree():
    model = _dead_mlp()
    x = _x((8,))
    new, report = surgery.prune_channels(model, criterion="dead", data=x, verbose=0)
    fc1_old = model.get_layer("fc1").kernel.numpy()
    assert np.array_equal(
        new.get_layer("fc1").kernel.numpy(), np.delete(fc1_old, [2, 7, 11], 1)
    )
    assert new.get_layer("fc2").kernel.shape == (13, 4)
    assert report.removed == 3 and [g.producers for g in report.groups] == [("fc1",)]
    assert report.params_before == model.count_params()
    assert (
        report.params_after
        == new.count_params()
        == model.count_params() - 3 * (8 + 1 + 4)
    )
    assert not report.recalibrated  # the dead criterion keeps every BN's input
    assert report.difference is not None and report.difference.samples == 128
    noted = any("real arithmetic" in note for note in report.notes)
    assert noted == (not report.difference.identical)
    _agree(model, new, _x((8,), seed=5))


def test_constant_channel_after_bn_moves_into_the_dense_bias():
    """A dead ReLU unit through BN is the constant beta - mean * inv."""
    model = keras.Sequential(
        [
            keras.Input((8,)),
            L.Dense(12, activation="relu", name="fc1"),
            L.BatchNormalization(name="bn"),
            L.Dense(3, name="fc2"),
        ]
    )
    rng = np.random.default_rng(2)
    bias = np.zeros(12, "float32")
    bias[[0, 5]] = -50.0
    _set(
        model.get_layer("fc1"),
        kernel=rng.normal(0, 0.5, (8, 12)).astype("float32"),
        bias=bias,
    )
    _set(
        model.get_layer("bn"),
        beta=rng.normal(0, 1, 12).astype("float32"),
        moving_mean=rng.uniform(0, 1, 12).astype("float32"),
        gamma=rng.uniform(0.5, 2, 12).astype("float32"),
    )
    _set(model.get_layer("fc2"), bias=rng.normal(0, 1, 3).astype("float32"))
    x = _x((8,))
    dead, _ = surgery.prune_channels(model, criterion="dead", data=x, verbose=0)
    assert dead.get_layer("fc1").units == 12  # not zero where fc2 reads them
    new, report = surgery.prune_channels(model, criterion="constant", data=x, verbose=0)
    assert new.get_layer("fc1").units == 10 and new.get_layer(
        "bn"
    ).moving_mean.shape == (10,)
    assert not np.array_equal(
        new.get_layer("fc2").bias.numpy(), model.get_layer("fc2").bias.numpy()
    )
    _agree(model, new, _x((8,), seed=9))


def test_constant_channel_read_by_a_padding_conv_stays_unless_zero():
    x_in = keras.Input((6, 6, 2))
    h = L.Conv2D(4, 1, activation="relu", name="c1")(x_in)
    h = L.Add(name="shift")([h, L.Conv2D(4, 1, name="c0", use_bias=True)(x_in)])
    y = L.Conv2D(3, 3, padding="same", name="c2")(h)
    model = keras.Model(x_in, y)
    # channel 1 of the sum is constant 0.5 (c1 dead, c0 constant); channel 3 is 0
    for name in ("c1", "c0"):
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        kernel[..., [1, 3]] = 0
        bias[1], bias[3] = (-5.0, 0.0) if name == "c1" else (0.5, 0.0)
        layer.set_weights([kernel, bias])
    x = _x((6, 6, 2), n=32)
    new, report = surgery.prune_channels(model, criterion="constant", data=x, verbose=0)
    assert new.get_layer("c1").filters == 3  # only the zero one: c2 pads
    assert new.get_layer("c2").kernel.shape == (3, 3, 3, 3)
    _agree(model, new, x)


def test_l1_removes_the_smallest_norms_per_group():
    rng = np.random.default_rng(3)
    x_in = keras.Input((5, 5, 3))
    a = L.Conv2D(10, 3, padding="same", name="a")(x_in)
    b = L.Conv2D(10, 1, name="b")(x_in)
    y = L.ReLU()(L.Add()([a, b]))
    y = L.Conv2D(6, 3, name="c")(y)
    y = L.GlobalAveragePooling2D()(y)
    y = L.Dense(2, name="out")(y)
    model = keras.Model(x_in, y)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(
                [
                    rng.normal(size=w.shape).astype("float32")
                    for w in layer.get_weights()
                ]
            )
    new, report = surgery.prune_channels(model, 0.3, "l1")
    norms = np.abs(model.get_layer("a").kernel.numpy()).reshape(-1, 10).sum(0) + np.abs(
        model.get_layer("b").kernel.numpy()
    ).reshape(-1, 10).sum(0)
    gone = np.sort(np.argsort(norms)[:3])
    kept = np.setdiff1d(np.arange(10), gone)
    assert np.array_equal(
        new.get_layer("a").kernel.numpy(),
        model.get_layer("a").kernel.numpy()[..., kept],
    )
    c_norms = np.abs(model.get_layer("c").kernel.numpy()).reshape(-1, 6).sum(0)
    c_kept = np.sort(np.argsort(c_norms)[1:])  # floor(0.3 * 6) = 1 goes
    assert np.array_equal(
        new.get_layer("c").bias.numpy(), model.get_layer("c").bias.numpy()[c_kept]
    )
    assert [(g.before, g.after) for g in report.groups] == [(10, 7), (6, 5)]
    assert report.difference is None and report.flops_after < report.flops_before


def test_count_amount_and_floor_keep_a_channel():
    model = _dead_mlp()
    new, report = surgery.prune_channels(model, 40, "l2")
    assert new.get_layer("fc1").units == 1
    l2 = np.linalg.norm(model.get_layer("fc1").kernel.numpy(), axis=0)
    kept = new.get_layer("fc1").kernel.numpy()[:, 0]
    assert np.array_equal(kept, model.get_layer("fc1").kernel.numpy()[:, np.argmax(l2)])


def test_bn_scale_and_recalibration():
    rng = np.random.default_rng(4)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(8, name="fc1"),
            L.BatchNormalization(name="bn"),
            L.ReLU(name="re_lu"),
            L.Dense(8, name="fc2"),
            L.BatchNormalization(name="bn2"),
            L.Dense(3, name="out"),
        ]
    )
    gamma = rng.uniform(0.1, 2, 8).astype("float32")
    _set(model.get_layer("bn"), gamma=gamma)
    x = _x((6,), n=256)
    new, report = surgery.prune_channels(model, 0.5, "bn_scale", data=x, verbose=0)
    keep = np.sort(np.argsort(gamma)[4:])
    assert np.array_equal(new.get_layer("bn").gamma.numpy(), gamma[keep])
    assert report.recalibrated
    # bn2 reads fc2, which lost half its inputs: its statistics are the data's now
    h = new.get_layer("fc2")(
        new.get_layer("re_lu")(new.get_layer("bn")(new.get_layer("fc1")(x)))
    )
    h = keras.ops.convert_to_numpy(h)
    np.testing.assert_allclose(
        new.get_layer("bn2").moving_mean.numpy(), np.mean(h, 0), rtol=1e-4, atol=1e-5
    )
    # bn2's group (fc2) has no BN scale of its own after it? it does: bn2
    assert {g.producers for g in report.groups} == {("fc1",), ("fc2",)}


def test_apoz_removes_the_units_that_are_zero_most_often():
    rng = np.random.default_rng(5)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(10, activation="relu", name="fc1"),
            L.Dense(2, name="out"),
        ]
    )
    bias = np.linspace(-3, 1, 10).astype("float32")
    rng.shuffle(bias)
    _set(model.get_layer("fc1"), bias=bias)
    x = _x((4,), n=512)
    h = keras.ops.convert_to_numpy(model.get_layer("fc1")(x))
    apoz = np.mean(h == 0, axis=0)
    new, _ = surgery.prune_channels(model, 0.2, "apoz", data=x, verbose=0)
    keep = np.sort(np.argsort(-apoz, kind="stable")[2:])
    assert np.array_equal(new.get_layer("fc1").bias.numpy(), bias[keep])


def test_report_accuracy_with_labels():
    model = _dead_mlp()
    x = _x((8,), n=200)
    y = np.random.default_rng(0).integers(0, 4, 200)
    new, report = surgery.prune_channels(model, 0.5, "l1", data=(x, y), verbose=0)
    expect = [np.mean(np.argmax(m.predict(x, verbose=0), 1) == y) for m in (model, new)]
    assert (report.accuracy_before, report.accuracy_after) == pytest.approx(expect)
    text = str(report)
    assert "accuracy:" in text and "parameters:" in text
    assert report.as_dict()["removed"] == report.removed


def test_layers_restricts_which_groups_go():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(10, name="fc1"),
            L.Dense(10, name="fc2"),
            L.Dense(2, name="o"),
        ]
    )
    new, report = surgery.prune_channels(model, 0.5, "l1", layers=["fc2"])
    assert new.get_layer("fc1").units == 10 and new.get_layer("fc2").units == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(criterion="taylor"), "unknown criterion 'taylor'"),
        (dict(criterion="dead", amount=0.3), "takes no amount"),
        (dict(criterion="l1"), "needs an amount"),
        (dict(criterion="l1", amount=1.5), "needs an amount"),
        (dict(criterion="l1", amount=0), "needs an amount"),
        (dict(criterion="dead"), "pass data"),
        (dict(criterion="apoz", amount=0.2), "pass data"),
        (dict(criterion="l1", amount=0.2, layers=["fc"]), "no layer 'fc'"),
    ],
)
def test_bad_arguments_are_one_line(kwargs, message):
    with pytest.raises(SurgeryError, match=message) as e:
        surgery.prune_channels(_dead_mlp(), **kwargs)
    assert "\n" not in str(e.value)


def test_a_free_image_size_takes_its_flops_from_the_data():
    x_in = keras.Input((None, None, 3))
    y = L.Conv2D(8, 3, padding="same", name="c1")(x_in)
    y = L.Conv2D(4, 1, name="c2")(y)
    y = L.GlobalAveragePooling2D()(y)
    model = keras.Model(x_in, L.Dense(2, name="out")(y))
    _, no_data = surgery.prune_channels(model, 0.5, "l1")
    assert no_data.flops_before is None
    _, report = surgery.prune_channels(
        model, 0.5, "l1", data=_x((10, 10, 3), n=8), verbose=0
    )
    # c1: 10*10*8 outputs, 27 multiply-adds and a bias each; c2: 8 inputs; out: 4 -> 2
    before = 2 * 100 * 8 * 27 + 100 * 8 + 2 * 100 * 4 * 8 + 100 * 4 + 2 * 4 * 2 + 2
    after = 2 * 100 * 4 * 27 + 100 * 4 + 2 * 100 * 2 * 4 + 100 * 2 + 2 * 2 * 2 + 2
    assert (report.flops_before, report.flops_after) == (before, after)


# JAX and torch compile these models for over a minute each: -m slow there
NOT_TF = [pytest.mark.slow] if keras.backend.backend() != "tensorflow" else []


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=NOT_TF) for n in ("MobileNetV2", "EfficientNetB0")]
)
def test_applications_prune_run_and_load(name, tmp_path):
    """Inverted residuals, depthwise convs, squeeze-excite, Rescaling."""
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3))
    new, report = surgery.prune_channels(model, 0.3, "l1")
    assert report.params_after < 0.8 * report.params_before
    x = _x((32, 32, 3), n=2)
    out = new.predict(x, verbose=0)
    assert out.shape == (2, 1000) and np.isfinite(out).all()
    new.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert np.array_equal(loaded.predict(x, verbose=0), out)


@pytest.mark.parametrize("marked", [pytest.param(None, marks=NOT_TF)])
def test_an_image_folder_with_class_folders_gives_accuracy(marked):
    from surgery import default
    from surgery.sources import folder_labels, open_source

    model = default.load()
    new, report = surgery.prune_channels(
        model, 0.3, "l1", data=default.images_dir(), verbose=0
    )
    labels, _ = folder_labels(default.images_dir())
    x = np.concatenate(list(open_source(default.images_dir(), model=model)))
    expect = [
        np.mean(np.argmax(m.predict(x, verbose=0), 1) == labels) for m in (model, new)
    ]
    assert (report.accuracy_before, report.accuracy_after) == pytest.approx(expect)
    assert report.difference.samples == len(labels) == 200
