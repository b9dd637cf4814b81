"""Trains the small VGG-style digits model shipped as the default model.

Run `python -m surgery.default.train` (needs scikit-learn, which carries the
digits data inside its package, and Pillow). It writes, next to this file:

- `digits_vgg.keras`: a Functional model named `digits_vgg` with VGG16's
  layer names (`block1_conv1` ... `block3_pool`, `flatten`, `fc1`, `dropout`,
  `fc2`, `dropout_1`, `predictions`).
- `images/<class>/<i>.png`: 20 held-out 32x32 RGB images per class, in the
  class-subfolder layout of `flow_from_directory` and
  `image_dataset_from_directory`.
- `meta.json`: accuracy, preprocessing, input size and class names.

Preprocessing: the model takes RGB pixels in 0..255 (float32, as loaded from
the PNGs) and rescales them itself with its first layer, `Rescaling(1/255)`;
no mean subtraction, no channel swap.

Each 8x8 digit (values 0..16) is scaled to 0..255, upsampled to 32x32
bilinearly and repeated over 3 channels. Training is seeded and deterministic
on one machine and backend.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import keras
import numpy as np
from PIL import Image

from surgery.files.atomic import atomic_path

NAME = "digits_vgg"
SIZE = 32
CLASS_NAMES = [str(digit) for digit in range(10)]
BLOCKS = ((16, 2), (32, 2), (64, 2))  # (filters, convolutions) per block
FC_UNITS = 256
DROPOUT = 0.3
TEST_PER_CLASS = 36  # about 20% of each class
SHIPPED_PER_CLASS = 20
EPOCHS = 15
BATCH_SIZE = 32
SEED = 0
PREPROCESSING = (
    "RGB pixels in 0..255 (float32); the model's first layer rescales by "
    "1/255; no mean subtraction or channel swap"
)


def build_model():
    """Returns the uncompiled `digits_vgg` model with VGG16's layer names."""
    inputs = keras.Input((SIZE, SIZE, 3), name="input_layer")
    x = keras.layers.Rescaling(1.0 / 255, name="rescaling")(inputs)
    for block, (filters, convs) in enumerate(BLOCKS, start=1):
        for conv in range(1, convs + 1):
            x = keras.layers.Conv2D(
                filters,
                (3, 3),
                activation="relu",
                padding="same",
                name=f"block{block}_conv{conv}",
            )(x)
        x = keras.layers.MaxPooling2D(
            (2, 2), strides=(2, 2), name=f"block{block}_pool"
        )(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(FC_UNITS, activation="relu", name="fc1")(x)
    x = keras.layers.Dropout(DROPOUT, name="dropout")(x)
    x = keras.layers.Dense(FC_UNITS, activation="relu", name="fc2")(x)
    x = keras.layers.Dropout(DROPOUT, name="dropout_1")(x)
    outputs = keras.layers.Dense(
        len(CLASS_NAMES), activation="softmax", name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name=NAME)


def digit_images():
    """Returns the digits as (N, 32, 32, 3) uint8 images and (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype("uint8")
    images = np.stack([_upsample(image) for image in small])
    return images, digits.target.astype("int64")


def _upsample(image):
    gray = Image.fromarray(image, mode="L")
    big = gray.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(big.convert("RGB"))


def split(labels, seed=SEED):
    """Returns (train, test) indices holding out TEST_PER_CLASS per class.

    The first SHIPPED_PER_CLASS test indices of each class are the shipped
    images; `test` lists them class by class.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(len(CLASS_NAMES)):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.append(members[:TEST_PER_CLASS])
        train.append(members[TEST_PER_CLASS:])
    return np.sort(np.concatenate(train)), np.concatenate(test)


def train(images, labels, epochs=EPOCHS):
    """Trains a fresh model, seeded; returns it."""
    keras.utils.set_random_seed(SEED)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        images.astype("float32"),
        labels,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        shuffle=True,
        verbose=2,
    )
    return model


def accuracy(model, images, labels):
    predictions = model.predict(images.astype("float32"), verbose=0)
    return float(np.mean(np.argmax(predictions, axis=-1) == labels))


def save_model(model, path):
    """Saves the weights in a fresh, uncompiled copy (no optimizer state)."""
    clean = build_model()
    clean.set_weights(model.get_weights())
    with atomic_path(path, suffix=".keras", prefix=f".{NAME}-") as tmp:
        clean.save(tmp)


def save_images(images, labels, directory):
    """Writes `directory/<class>/<i>.png`, replacing any previous folder."""
    parent = os.path.dirname(os.path.abspath(directory))
    tmp = tempfile.mkdtemp(dir=parent, prefix=".images-")
    try:
        counts = dict.fromkeys(range(len(CLASS_NAMES)), 0)
        for name in CLASS_NAMES:
            os.mkdir(os.path.join(tmp, name))
        for image, label in zip(images, labels, strict=True):
            name = f"{counts[label]:02d}.png"
            Image.fromarray(image, mode="RGB").save(
                os.path.join(tmp, CLASS_NAMES[label], name)
            )
            counts[label] += 1
        _replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_directory(new, target):
    if os.path.exists(target):
        old = target + ".old"
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    else:
        os.replace(new, target)


def load_images(directory):
    """Reads `directory/<class>/*.png` back as (N, 32, 32, 3) uint8, labels."""
    images, labels = [], []
    for label, name in enumerate(CLASS_NAMES):
        folder = os.path.join(directory, name)
        for file in sorted(os.listdir(folder)):
            with Image.open(os.path.join(folder, file)) as image:
                images.append(np.asarray(image.convert("RGB")))
            labels.append(label)
    return np.stack(images), np.array(labels)


def save_meta(meta, path):
    with atomic_path(path, suffix=".json", prefix=".meta-") as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=os.path.dirname(os.path.abspath(__file__)), help="folder"
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    images, labels = digit_images()
    train_idx, test_idx = split(labels)
    model = train(images[train_idx], labels[train_idx], epochs=args.epochs)
    train_seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, images[test_idx], labels[test_idx])

    shipped = test_idx.reshape(len(CLASS_NAMES), TEST_PER_CLASS)[
        :, :SHIPPED_PER_CLASS
    ].ravel()
    model_path = os.path.join(args.out, f"{NAME}.keras")
    images_dir = os.path.join(args.out, "images")
    save_model(model, model_path)
    save_images(images[shipped], labels[shipped], images_dir)
    png_images, png_labels = load_images(images_dir)
    images_accuracy = accuracy(
        keras.models.load_model(model_path, compile=False), png_images, png_labels
    )
    save_meta(
        {
            "name": NAME,
            "input_shape": [SIZE, SIZE, 3],
            "preprocessing": PREPROCESSING,
            "class_names": CLASS_NAMES,
            "test_accuracy": test_accuracy,
            "test_size": int(len(test_idx)),
            "train_size": int(len(train_idx)),
            "images_accuracy": images_accuracy,
            "images": len(png_labels),
            "images_layout": "images/<class>/<i>.png",
            "source": "sklearn.datasets.load_digits, 8x8 upsampled bilinearly",
            "epochs": args.epochs,
            "seed": SEED,
            "keras_version": keras.__version__,
            "backend": keras.backend.backend(),
        },
        os.path.join(args.out, "meta.json"),
    )
    print(
        f"test accuracy {test_accuracy:.4f} on {len(test_idx)} held-out digits, "
        f"{images_accuracy:.4f} on the {len(png_labels)} shipped PNGs; "
        f"trained in {train_seconds:.1f} s; wrote {model_path}"
    )


if __name__ == "__main__":
    main()
