"""Tests for surgery.files.models: loading models and legacy/Keras 3 weights files."""

import hashlib
import os
import shutil
import time

import h5py
import keras
import numpy as np
import pytest

from surgery.errors import SurgeryError
from surgery.files.models import load_model
from surgery.testing.legacy_vgg16 import write_legacy_vgg16_weights

SMALL = (32, 32, 3)


def _images(shape, count=4, seed=0):
    """A small batch of VGG-preprocessed random 'images'."""
    pixels = np.random.default_rng(seed).uniform(0, 255, (count, *shape))
    return keras.applications.vgg16.preprocess_input(pixels.astype("float32"))


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _assert_same_model(model, reference, x):
    """Same layer names, every weight and the predictions bit for bit."""
    weighted = [layer for layer in reference.layers if layer.weights]
    assert [layer.name for layer in model.layers if layer.weights] == [
        layer.name for layer in weighted
    ]
    for layer in weighted:
        got = model.get_layer(layer.name).get_weights()
        for a, b in zip(got, layer.get_weights(), strict=True):
            assert np.array_equal(a, b), layer.name
    predictions = model.predict(x, verbose=0)
    assert np.array_equal(predictions, reference.predict(x, verbose=0))
    assert predictions.std() > 0  # not a dead network


def _assert_refused(call, *fragments, directory):
    """`call` raises a one-line SurgeryError and leaves `directory` as it was."""
    before = sorted(os.listdir(directory))
    with pytest.raises(SurgeryError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert sorted(os.listdir(directory)) == before
    return message


@pytest.fixture(scope="session", params=[False, True], ids=["names", "split-names"])
def notop_file(request, tmp_path_factory):
    """A legacy `_notop` file (~59 MB), with and without split layer names."""
    path = tmp_path_factory.mktemp("notop") / "vgg16_notop.h5"
    write_legacy_vgg16_weights(
        str(path), include_top=False, seed=1, split_names=request.param
    )
    yield path
    path.unlink()


def _copy(path, tmp_path, name="copy.h5"):
    target = tmp_path / name
    shutil.copyfile(path, target)
    return target


# The writer reproduces the legacy layout


def test_writer_uses_the_legacy_layout(notop_file):
    with h5py.File(notop_file, "r") as f:
        assert "keras_version" not in f.attrs and "backend" not in f.attrs
        if "layer_names" in f.attrs:
            chunks = [f.attrs["layer_names"]]
        else:
            assert "layer_names0" in f.attrs and "layer_names1" in f.attrs
            chunks = [f.attrs["layer_names0"], f.attrs["layer_names1"]]
        names = [name for chunk in chunks for name in chunk]
        assert all(isinstance(name, bytes) for name in names)
        assert names[:4] == [
            b"input_1",
            b"block1_conv1",
            b"block1_conv2",
            b"block1_pool",
        ]
        assert names[-1] == b"block5_pool" and b"fc1" not in names
        conv = f["block1_conv1"]
        assert list(conv.attrs["weight_names"]) == [
            b"block1_conv1_W_1:0",
            b"block1_conv1_b_1:0",
        ]
        assert conv["block1_conv1_W_1:0"].shape == (3, 3, 3, 64)
        assert conv["block1_conv1_W_1:0"].dtype == np.float32
        assert len(f["block1_pool"].attrs["weight_names"]) == 0


def test_writer_is_seeded_and_leaves_no_temporary_file(tmp_path):
    a, b, c = (str(tmp_path / name) for name in ("a.h5", "b.h5", "c.h5"))
    write_legacy_vgg16_weights(a, include_top=False, seed=5)
    write_legacy_vgg16_weights(b, include_top=False, seed=5)
    write_legacy_vgg16_weights(c, include_top=False, seed=6)
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "b.h5", "c.h5"]
    key = "block3_conv2/block3_conv2_W_1:0"
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb, h5py.File(c, "r") as fc:
        assert np.array_equal(fa[key][()], fb[key][()])
        assert not np.array_equal(fa[key][()], fc[key][()])


def test_writer_refuses_a_top_without_fixed_size_and_writes_nothing(tmp_path):
    _assert_refused(
        lambda: write_legacy_vgg16_weights(
            str(tmp_path / "w.h5"), include_top=True, input_shape=(None, None, 3)
        ),
        "include_top=True",
        directory=tmp_path,
    )


# Legacy weights files load like Keras' own loaders


def test_legacy_notop_matches_keras_positional_loader(notop_file):
    model = load_model(str(notop_file), family="vgg16")
    assert "fc1" not in [layer.name for layer in model.layers]
    reference = keras.applications.VGG16(
        weights=str(notop_file), include_top=False, input_shape=SMALL
    )
    _assert_same_model(model, reference, _images(SMALL))


def test_legacy_notop_matches_keras_by_name_loader(notop_file):
    model = load_model(str(notop_file), family="vgg16")
    reference = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=SMALL
    )
    reference.load_weights(str(notop_file), by_name=True)
    _assert_same_model(model, reference, _images(SMALL, seed=1))


def test_legacy_values_are_the_files(notop_file):
    model = load_model(str(notop_file), family="vgg16")
    with h5py.File(notop_file, "r") as f:
        kernel = f["block5_conv3/block5_conv3_W_1:0"][()]
        bias = f["block5_conv3/block5_conv3_b_1:0"][()]
    got_kernel, got_bias = model.get_layer("block5_conv3").get_weights()
    assert np.array_equal(got_kernel, kernel)
    assert np.array_equal(got_bias, bias)


def test_loading_leaves_the_file_unchanged(notop_file):
    digest, mtime = _digest(notop_file), os.stat(notop_file).st_mtime_ns
    load_model(str(notop_file), family="vgg16")
    assert _digest(notop_file) == digest
    assert os.stat(notop_file).st_mtime_ns == mtime


def test_legacy_top_matches_keras_and_round_trips_as_weights_h5(top_file, tmp_path):
    # Uses the session's 553 MB file; see `top_file` for timings.
    start = time.perf_counter()
    model = load_model(str(top_file), family="vgg16")
    reference = keras.applications.VGG16(weights=str(top_file))
    x = _images((224, 224, 3), count=2)
    _assert_same_model(model, reference, x)
    assert model.get_layer("predictions").get_weights()[0].shape == (4096, 1000)

    keras3 = str(tmp_path / "vgg16.weights.h5")
    model.save_weights(keras3)
    _assert_same_model(load_model(keras3, family="vgg16"), reference, x)
    print(f"top variant: {time.perf_counter() - start:.1f} s")


# Keras 3 .weights.h5 files


def test_keras3_notop_weights_load(notop_file, tmp_path):
    reference = load_model(str(notop_file), family="vgg16")
    path = str(tmp_path / "notop.weights.h5")
    reference.save_weights(path)
    model = load_model(path, family="vgg16")
    assert "fc1" not in [layer.name for layer in model.layers]
    _assert_same_model(model, reference, _images(SMALL))


def test_keras3_weights_with_wrong_shapes_are_refused(tmp_path):
    gray = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=(32, 32, 1)
    )
    path = str(tmp_path / "gray.weights.h5")
    gray.save_weights(path)
    _assert_refused(
        lambda: load_model(path, family="vgg16"),
        "block1_conv1",
        "(3, 3, 3, 64)",
        "(3, 3, 1, 64)",
        directory=tmp_path,
    )


def test_keras3_weights_of_another_architecture_are_refused(tmp_path):
    # VGG19 without top has 32 arrays, as many as VGG16 with top: shapes differ.
    path = str(tmp_path / "vgg19.weights.h5")
    keras.applications.VGG19(weights=None, include_top=False).save_weights(path)
    _assert_refused(
        lambda: load_model(path, family="vgg16"),
        "does not fit vgg16",
        "'block4_conv1/kernel' expected shape (3, 3, 256, 512)",
        "found (3, 3, 256, 256)",
        directory=tmp_path,
    )


def test_keras3_weights_with_another_count_are_refused(tmp_path):
    path = str(tmp_path / "tiny.weights.h5")
    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    tiny.save_weights(path)
    _assert_refused(
        lambda: load_model(path, family="vgg16"),
        "holds 2 weight arrays",
        "26 (include_top=False) or 32 (include_top=True)",
        directory=tmp_path,
    )


def test_keras3_weights_under_an_h5_name_get_a_hint(tmp_path):
    path = str(tmp_path / "notop.weights.h5")
    keras.applications.VGG16(weights=None, include_top=False).save_weights(path)
    renamed = str(tmp_path / "notop.h5")
    os.replace(path, renamed)
    _assert_refused(
        lambda: load_model(renamed, family="vgg16"),
        "rename it to end in .weights.h5",
        directory=tmp_path,
    )


# Legacy files that do not fit


def test_legacy_shape_mismatch_names_layer_and_shapes(notop_file, tmp_path):
    path = _copy(notop_file, tmp_path)
    with h5py.File(path, "r+") as f:
        del f["block3_conv2/block3_conv2_W_1:0"]
        f["block3_conv2"].create_dataset(
            "block3_conv2_W_1:0", data=np.zeros((3, 3, 256, 128), "float32")
        )
    _assert_refused(
        lambda: load_model(str(path), family="vgg16"),
        "'block3_conv2'",
        "expected shape (3, 3, 256, 256)",
        "found (3, 3, 256, 128)",
        directory=tmp_path,
    )


def test_legacy_channels_first_kernels_are_refused(notop_file, tmp_path):
    path = _copy(notop_file, tmp_path)
    with h5py.File(path, "r+") as f:
        kernel = f["block1_conv1/block1_conv1_W_1:0"][()]
        del f["block1_conv1/block1_conv1_W_1:0"]
        f["block1_conv1"].create_dataset(
            "block1_conv1_W_1:0", data=kernel.transpose(3, 2, 0, 1)
        )
    _assert_refused(
        lambda: load_model(str(path), family="vgg16"),
        "'block1_conv1'",
        "(3, 3, 3, 64)",
        "(64, 3, 3, 3)",
        directory=tmp_path,
    )


def _drop_weights(path, layer):
    """Empties `layer`'s weight list, as if the file lacked the layer."""
    with h5py.File(path, "r+") as f:
        f[layer].attrs["weight_names"] = []


def test_legacy_missing_layer_is_named(notop_file, tmp_path):
    path = _copy(notop_file, tmp_path)
    _drop_weights(path, "block5_conv3")
    _assert_refused(
        lambda: load_model(str(path), family="vgg16"),
        "no weights for layer 'block5_conv3'",
        directory=tmp_path,
    )


def test_legacy_partial_top_is_refused(notop_file, tmp_path):
    path = _copy(notop_file, tmp_path)
    with h5py.File(path, "r+") as f:
        names = [n for chunk in _name_chunks(f) for n in chunk] + [b"predictions"]
        for key in [k for k in f.attrs if k.startswith("layer_names")]:
            del f.attrs[key]
        f.attrs["layer_names"] = np.array(names, dtype="S")
        group = f.create_group("predictions")
        group.attrs["weight_names"] = np.array(
            [b"predictions_W_1:0", b"predictions_b_1:0"], dtype="S"
        )
        group["predictions_W_1:0"] = np.zeros((4096, 1000), "float32")
        group["predictions_b_1:0"] = np.zeros((1000,), "float32")
    _assert_refused(
        lambda: load_model(str(path), family="vgg16"),
        "include_top=True",
        "no weights for layer 'fc1'",
        directory=tmp_path,
    )


def _name_chunks(f):
    if "layer_names" in f.attrs:
        return [f.attrs["layer_names"]]
    return [f.attrs["layer_names0"], f.attrs["layer_names1"]]


def test_legacy_unknown_layer_is_refused(notop_file, tmp_path):
    path = _copy(notop_file, tmp_path)
    with h5py.File(path, "r+") as f:
        names = [n for chunk in _name_chunks(f) for n in chunk] + [b"block6_conv1"]
        for key in [k for k in f.attrs if k.startswith("layer_names")]:
            del f.attrs[key]
        f.attrs["layer_names"] = np.array(names, dtype="S")
        group = f.create_group("block6_conv1")
        group.attrs["weight_names"] = np.array([b"block6_conv1_b_1:0"], dtype="S")
        group["block6_conv1_b_1:0"] = np.zeros((512,), "float32")
    _assert_refused(
        lambda: load_model(str(path), family="vgg16"),
        "block6_conv1",
        "right family",
        directory=tmp_path,
    )


# Whole models and Lambda layers


def _lambda_model():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="dense")(inputs)
    outputs = keras.layers.Lambda(lambda t: t * 2.0, name="double")(hidden)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_code_is_refused_unless_unsafe(tmp_path, suffix):
    original = _lambda_model()
    path = str(tmp_path / f"lambda{suffix}")
    original.save(path)
    digest = _digest(path)
    _assert_refused(lambda: load_model(path), "Lambda", "--unsafe", directory=tmp_path)

    loaded = load_model(path, unsafe=True)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    assert np.array_equal(loaded.predict(x, verbose=0), original.predict(x, verbose=0))
    assert np.array_equal(
        loaded.predict(x, verbose=0), 2.0 * original.get_layer("dense")(x)
    )
    assert _digest(path) == digest


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_whole_model_files_load(tmp_path, suffix):
    original = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=SMALL
    )
    path = str(tmp_path / f"model{suffix}")
    original.save(path)
    model = load_model(path, family="vgg16")  # a whole model ignores family
    assert not model.compiled
    _assert_same_model(model, original, _images(SMALL))


# Files that cannot be loaded


def test_missing_file(tmp_path):
    _assert_refused(
        lambda: load_model(str(tmp_path / "nope.h5"), family="vgg16"),
        "nope.h5' does not exist",
        directory=tmp_path,
    )


def test_unknown_extension(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02}q\x00.")
    _assert_refused(
        lambda: load_model(str(path)),
        "unknown file type",
        ".keras",
        ".h5",
        directory=tmp_path,
    )


def test_weights_without_family(notop_file, tmp_path):
    path = _copy(notop_file, tmp_path)
    message = _assert_refused(
        lambda: load_model(str(path)),
        "weights only",
        "vgg16 --weights",
        ".json --weights",
        directory=tmp_path,
    )
    assert "--family" not in message  # no command has that flag


def test_unknown_family_lists_known_ones(notop_file, tmp_path):
    path = _copy(notop_file, tmp_path)
    message = _assert_refused(
        lambda: load_model(str(path), family="vgg17"),
        "'vgg17'",
        directory=tmp_path,
    )
    assert message.endswith("known families: vgg16")


@pytest.mark.parametrize("name", ["junk.h5", "junk.hdf5", "junk.weights.h5"])
def test_non_hdf5_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not HDF5 at all" * 100)
    _assert_refused(
        lambda: load_model(str(path), family="vgg16"),
        "not an HDF5 file",
        directory=tmp_path,
    )


def test_truncated_hdf5_file(notop_file, tmp_path):
    path = tmp_path / "truncated.h5"
    with open(notop_file, "rb") as f:
        path.write_bytes(f.read(4096))
    _assert_refused(
        lambda: load_model(str(path), family="vgg16"),
        "truncated.h5",
        "corrupt",
        directory=tmp_path,
    )


def test_corrupt_keras_file(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"PK but not really a zip archive")
    _assert_refused(
        lambda: load_model(str(path)),
        "not a valid .keras file",
        directory=tmp_path,
    )


def test_hdf5_of_another_kind(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    _assert_refused(
        lambda: load_model(str(path), family="vgg16"),
        "neither a Keras model nor a Keras weights file",
        directory=tmp_path,
    )
