"""Keras 1 whole-model VGG16 files (fast.ai era): Lambda, th kernels, Theano flip."""

import json

import h5py
import keras
import numpy as np
import pytest
from keras.applications import vgg16

import surgery
from surgery import cli
from surgery.files.legacy_weights import th_dense_rows
from surgery.files.models import load_model
from surgery.testing.keras1 import vgg_preprocess, write_keras1_vgg16

SIZE, FC, CLASSES = 32, 64, 10


@pytest.fixture(scope="module")
def keras1_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keras1") / "vgg16_keras1.h5"
    write_keras1_vgg16(str(path), size=SIZE, fc_units=FC, classes=CLASSES, seed=4)
    return path


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def _file_weights(path):
    with h5py.File(path, "r") as f:
        group = f["model_weights"]
        names = [n.decode() for n in group.attrs["layer_names"]]
        return {
            n: [group[n][w.decode()][()] for w in group[n].attrs["weight_names"]]
            for n in names
            if len(group[n].attrs["weight_names"])
        }


def test_vgg_preprocess_lambda_becomes_bit_equal_stock_layers(keras1_file):
    model = load_model(str(keras1_file))  # no unsafe: no code is loaded
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)
    pre = keras.Model(model.inputs, model.get_layer("lambda_1_bgr").output)
    x = _images()
    expected = vgg_preprocess(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    assert np.array_equal(pre.predict_on_batch(x), expected)
    assert np.array_equal(pre.predict_on_batch(x), vgg16.preprocess_input(x.copy()))


def test_theano_kernels_are_flipped_into_a_true_convolution(keras1_file):
    model = load_model(str(keras1_file))
    kernel, bias = _file_weights(keras1_file)["convolution2d_1"]
    first = keras.Model(model.inputs, model.get_layer("convolution2d_1").output)
    x = _images(2)
    got = first.predict_on_batch(x)
    xp = np.pad(
        vgg_preprocess(x.transpose(0, 3, 1, 2)), ((0, 0), (0, 0), (1, 1), (1, 1))
    )
    expected = np.zeros((2, kernel.shape[0], SIZE, SIZE))
    for a in range(3):  # Theano conv2d: out[y] = sum_a w[a] * in[y + 2 - a]
        for b in range(3):
            window = xp[:, :, 2 - a : 2 - a + SIZE, 2 - b : 2 - b + SIZE]
            expected += np.einsum("oi,nihw->nohw", kernel[:, :, a, b], window)
    expected = np.maximum(expected + bias[None, :, None, None], 0).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_legacy_file_matches_the_same_weights_loaded_the_modern_way(keras1_file):
    model = load_model(str(keras1_file))
    weights = _file_weights(keras1_file)
    trunk = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)
    )
    convs = [layer for layer in trunk.layers if layer.weights]
    for i, layer in enumerate(convs, start=1):
        kernel, bias = weights[f"convolution2d_{i}"]
        layer.set_weights([np.flip(kernel, (2, 3)).transpose(2, 3, 1, 0), bias])
    x = keras.layers.Flatten()(trunk.output)  # 1x1x512: th and tf orders agree
    for i, (units, act) in enumerate(
        [(FC, "relu"), (FC, "relu"), (CLASSES, "softmax")]
    ):
        dense = keras.layers.Dense(units, activation=act)
        x = dense(x)
        dense.set_weights(weights[f"dense_{i + 1}"])
    modern = keras.Model(trunk.input, x)
    images = _images(4, seed=1)
    expected = modern.predict_on_batch(vgg16.preprocess_input(images.copy()))
    got = model.predict_on_batch(images)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_tensorflow_trained_th_kernels_are_transposed_not_flipped(tmp_path):
    path = tmp_path / "tf_backend.h5"
    write_keras1_vgg16(
        str(path), size=SIZE, fc_units=8, classes=2, backend="tensorflow"
    )
    kernel = _file_weights(path)["convolution2d_3"][0]
    got = load_model(str(path)).get_layer("convolution2d_3").get_weights()[0]
    assert np.array_equal(got, kernel.transpose(2, 3, 1, 0))


def test_other_lambdas_are_refused_without_unsafe(tmp_path, keras1_file):
    path = tmp_path / "other_lambda.h5"
    path.write_bytes(keras1_file.read_bytes())
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        config["config"][0]["config"]["function"][0] = "bm90IHZnZw=="
        f.attrs["model_config"] = json.dumps(config).encode()
    with pytest.raises(surgery.SurgeryError, match="not VGG preprocessing.*--unsafe"):
        load_model(str(path))


def test_cli_converts_a_keras1_file_into_a_plain_keras_model(keras1_file, tmp_path):
    np.save(tmp_path / "x.npy", _images(16, seed=2))
    out = tmp_path / "bn.keras"
    argv = ["convert", keras1_file, "--data", tmp_path / "x.npy", "--after", "Dense"]
    assert cli.main([*map(str, argv), "--out", str(out)]) == 0
    converted = keras.models.load_model(out, safe_mode=True)
    names = {layer.name for layer in converted.layers}
    assert {"dense_1_bn", "dense_2_bn", "dense_3_bn"} <= names
    x = _images(3, seed=5)
    reference = load_model(str(keras1_file)).predict_on_batch(x)
    assert np.array_equal(converted.predict_on_batch(x), reference)


def _green_first(x):
    return x[:, ::-1] * 2.0  # th layout: reverses the channel axis


def test_unsafe_runs_another_lambda_on_the_layout_it_was_written_for(
    tmp_path, keras1_file
):
    import marshal

    path = tmp_path / "own_lambda.h5"
    path.write_bytes(keras1_file.read_bytes())
    code = marshal.dumps(_green_first.__code__).decode("raw_unicode_escape")
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        config["config"][0]["config"]["function"][0] = code
        f.attrs["model_config"] = json.dumps(config).encode()
    model = load_model(str(path), unsafe=True)
    lam = keras.Model(model.inputs, model.get_layer("lambda_1_from_th").output)
    x = _images(2)
    assert np.array_equal(lam.predict_on_batch(x), x[..., ::-1] * 2.0)


def test_by_order_loads_keras1_weights_into_the_family(tmp_path, capsys):
    weights_only = tmp_path / "vgg16_keras1_weights.h5"
    whole = tmp_path / "vgg16_keras1_notop.h5"
    for path, only in ((weights_only, True), (whole, False)):
        write_keras1_vgg16(
            str(path), size=SIZE, seed=7, include_top=False, weights_only=only
        )
    with pytest.raises(surgery.SurgeryError, match="pass --by-order"):
        load_model(str(weights_only), family="vgg16")
    model = load_model(str(weights_only), family="vgg16", by_order=True)
    kernel = _file_weights(whole)["convolution2d_13"][0]
    got = model.get_layer("block5_conv3").get_weights()[0]
    assert np.array_equal(got, np.flip(kernel, (2, 3)).transpose(2, 3, 1, 0))
    x = _images(2, seed=3)
    expected = load_model(str(whole)).predict_on_batch(x)
    got = model.predict_on_batch(vgg16.preprocess_input(x.copy()))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    argv = ["inspect", "vgg16", "--weights", str(weights_only), "--by-order"]
    assert cli.main(argv) == 0 and "block5_conv3" in capsys.readouterr().out


def test_dense_rows_follow_the_flatten_order():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((4, 3, 2))  # (C, H, W)
    kernel = rng.standard_normal((24, 5))  # rows in th flatten order
    tf_rows = th_dense_rows(kernel, (3, 2, 4))
    expected = features.reshape(-1) @ kernel
    np.testing.assert_allclose(
        features.transpose(1, 2, 0).reshape(-1) @ tf_rows, expected
    )
