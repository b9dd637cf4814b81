"""The default model shipped in the package, so a first run needs no download.

`digits_vgg` is a small VGG16-shaped CNN (`block1_conv1` ... `fc1`, `fc2`,
`predictions`) trained on scikit-learn's digits by `surgery.default.train`.
It takes (32, 32, 3) RGB pixels in 0..255 and rescales them itself. Held-out
sample images sit in `images_dir()` as `<class>/<i>.png`; `meta.json` holds
the accuracy, preprocessing and class names.
"""

import json
import os

import keras

_HERE = os.path.dirname(os.path.abspath(__file__))


def model_path() -> str:
    """Returns the path of the shipped `digits_vgg.keras`."""
    return os.path.join(_HERE, "digits_vgg.keras")


def images_dir() -> str:
    """Returns the folder of shipped images, one subfolder per class."""
    return os.path.join(_HERE, "images")


def meta() -> dict:
    """Returns the training record: accuracy, preprocessing, class names."""
    with open(os.path.join(_HERE, "meta.json")) as f:
        return json.load(f)


def load() -> keras.Model:
    """Loads the shipped model, uncompiled, refusing any pickled code."""
    return keras.models.load_model(model_path(), safe_mode=True, compile=False)
