"""A pretrained two-LSTM model from PyPI: chars2vec's eng_50, BN after both.

`python -m benchmarks.chars2vec` fetches the chars2vec sdist with `pip
download` (its setup.py would run `pip install -r requirements.txt`, so it
is not installed), rebuilds its embedding model (one-hot characters ->
LSTM(50, return_sequences) -> LSTM(50)) in Keras 3, loads the shipped
Keras 2 weights, inserts an identity BN after both LSTMs and prints the max
ulp difference in graph and XLA mode for the default and for float32 BNs
(`bn_dtype="float32"`, the BN at the output as it was before the cast-back
layer), on 64 random 12-character words.
"""

from __future__ import annotations

import glob
import subprocess
import sys
import tarfile
import tempfile
import warnings

VOCAB, DIM, LENGTH = 59, 50, 12


def weights_file(folder: str) -> str:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
         ":all:", "-q", "-d", folder, "chars2vec==0.1.7"],
        check=True,
    )  # fmt: skip
    with tarfile.open(glob.glob(f"{folder}/chars2vec-*.tar.gz")[0]) as tar:
        tar.extractall(folder, filter="data")
    return glob.glob(f"{folder}/chars2vec-*/chars2vec/trained_models/eng_50/*.h5")[0]


def model_and_words(path):
    import h5py
    import keras
    import numpy as np

    inp = keras.Input((None, VOCAB))
    h = keras.layers.LSTM(DIM, return_sequences=True, name="lstm1")(inp)
    model = keras.Model(inp, keras.layers.LSTM(DIM, name="lstm2")(h))
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                arrays.__setitem__(name, obj[()])
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    by_layer: dict = {}
    for name, value in arrays.items():
        by_layer.setdefault(name.split("/")[0], {})[name.split("/")[-1][:-2]] = value
    model.set_weights(
        [
            by_layer[layer][part]
            for layer in sorted(by_layer)
            for part in ("kernel", "recurrent_kernel", "bias")
        ]
    )
    rng = np.random.default_rng(0)
    x = np.zeros((64, LENGTH, VOCAB), "float32")
    x[
        np.arange(64)[:, None], np.arange(LENGTH), rng.integers(0, VOCAB, (64, LENGTH))
    ] = 1
    return model, x


def main() -> None:
    import surgery
    from surgery.runtime.machine import cpu_kind

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as folder:
        model, x = model_and_words(weights_file(folder))
    print(f"CPU: {cpu_kind()}")
    for label, kwargs in (("float32 BN", {"bn_dtype": "float32"}), ("default", {})):
        cells = []
        for mode in ("graph", "xla"):
            new = surgery.insert_identity_bn(
                model, after=["lstm1", "lstm2"], data=x, verbose=0, check=mode, **kwargs
            )
            report = surgery.verify(model, new, x, verbose=0, mode=mode)
            cells.append(f"{mode} {report.max_ulp_diff} ulp (noise {report.noise_ulp})")
        print(f"{label}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
