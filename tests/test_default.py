"""Tests for the shipped default model, surgery.default."""

import os

import keras
import numpy as np
import pytest
from PIL import Image

from surgery import default

CLASSES = [str(digit) for digit in range(10)]


@pytest.fixture(scope="module")
def model():
    return default.load()


def _shipped_images():
    """Loads every PNG under images_dir(), as an image-folder reader would."""
    root = default.images_dir()
    images, labels = [], []
    for label, name in enumerate(sorted(os.listdir(root))):
        for file in sorted(os.listdir(os.path.join(root, name))):
            with Image.open(os.path.join(root, name, file)) as image:
                assert image.mode == "RGB" and image.size == (32, 32)
                images.append(np.asarray(image, dtype="float32"))
            labels.append(label)
    return np.stack(images), np.array(labels)


def test_model_has_the_vgg_names_and_shapes(model):
    assert model.name == "digits_vgg"
    assert isinstance(model, keras.Model) and not model.compiled
    assert tuple(model.input.shape) == (None, 32, 32, 3)
    assert tuple(model.output.shape) == (None, 10)
    names = [layer.name for layer in model.layers]
    assert names[-6:] == [
        "flatten",
        "fc1",
        "dropout",
        "fc2",
        "dropout_1",
        "predictions",
    ]
    for block in (1, 2, 3):
        assert {
            f"block{block}_conv1",
            f"block{block}_conv2",
            f"block{block}_pool",
        } <= set(names)


@pytest.mark.parametrize("name", ["fc1", "fc2"])
def test_fc_layers_are_relu_dense(model, name):
    layer = model.get_layer(name)
    assert isinstance(layer, keras.layers.Dense)
    assert layer.activation is keras.activations.relu
    kernel, bias = layer.get_weights()
    assert kernel.shape[1] == bias.shape[0] == 256
    assert model.get_layer("predictions").activation is keras.activations.softmax


def test_model_rescales_its_own_input(model):
    rescaling = model.layers[1]
    assert isinstance(rescaling, keras.layers.Rescaling)
    assert rescaling.scale == pytest.approx(1 / 255)


def test_images_follow_the_class_folder_layout():
    root = default.images_dir()
    assert sorted(os.listdir(root)) == CLASSES
    for name in CLASSES:
        files = os.listdir(os.path.join(root, name))
        assert len(files) == 20
        assert all(file.endswith(".png") for file in files)


def test_model_classifies_the_shipped_images(model):
    images, labels = _shipped_images()
    assert images.shape == (200, 32, 32, 3) and images.max() > 200
    predicted = np.argmax(model.predict(images, verbose=0), axis=-1)
    accuracy = np.mean(predicted == labels)
    assert accuracy > 0.9
    assert accuracy == pytest.approx(default.meta()["images_accuracy"])


def test_meta_describes_the_model():
    meta = default.meta()
    assert meta["input_shape"] == [32, 32, 3]
    assert meta["class_names"] == CLASSES
    assert meta["test_accuracy"] > 0.95
    assert "0..255" in meta["preprocessing"]


def test_shipped_files_fit_in_five_megabytes():
    root = os.path.dirname(default.model_path())
    total = sum(
        os.path.getsize(os.path.join(folder, file))
        for folder, _, files in os.walk(root)
        for file in files
        if not folder.endswith("__pycache__")
    )
    assert total <= 5 * 2**20
