"""Layer surgery on pretrained weights from PyPI: mtcnn's RNet and ONet.

`python -m benchmarks.mtcnn_edit` installs mtcnn 1.0.0 with lz4 and joblib
into a temporary folder (`pip install --target`, so nothing lands in the
venv), builds RNet and ONet as mtcnn builds them (subclassed models, then
`set_weights` from the shipped `.lz4` files), traces each with
`surgery.functional`, deepens every Conv2D and Dense (the ones with softmax
get a linear identity layer, with the warning) and prints `verify`'s report
in each mode this backend runs (graph and XLA on TensorFlow), on 64 random
images normalised as mtcnn does. It also replaces every PReLU by a ReLU
(`copy_weights=False`), an edit that changes the outputs, to show what
`verify` reports then. Run it with `KERAS_BACKEND=jax` or `torch` for the
other backends, and with `TF_ENABLE_ONEDNN_OPTS=0` for TensorFlow without
oneDNN.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import warnings

SIZES = {"RNet": 24, "ONet": 48}


def install(folder: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
         folder, "mtcnn==1.0.0", "lz4", "joblib"],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, folder)


def pretrained(name: str):
    from mtcnn.network.onet import ONet
    from mtcnn.network.rnet import RNet
    from mtcnn.utils.tensorflow import load_weights

    net = {"RNet": RNet, "ONet": ONet}[name]()
    net.build()
    net.set_weights(load_weights(f"{name.lower()}.lz4"))
    return net


def run(log=print) -> list[dict]:
    import keras
    import numpy as np

    import surgery
    from surgery.graph.spots import walk_layers
    from surgery.runtime.machine import cpu_kind

    modes = ["graph", "xla"] if keras.backend.backend() == "tensorflow" else ["auto"]
    rng = np.random.default_rng(0)
    rows = []
    for name, size in SIZES.items():
        model = surgery.functional(pretrained(name), input_shape=(size, size, 3))
        pixels = rng.uniform(0, 255, (64, size, size, 3))
        x = ((pixels - 127.5) / 128).astype("float32")
        kinds = (keras.layers.Conv2D, keras.layers.Dense)
        deep = [p for p, op in walk_layers(model) if type(op) in kinds]
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            deeper = surgery.deepen(model, after=deep, data=x)
        seconds = time.perf_counter() - start
        prelus = [p for p, op in walk_layers(model) if type(op) is keras.layers.PReLU]
        relu = surgery.edit(
            model, replace={p: keras.layers.ReLU() for p in prelus}, copy_weights=False
        )
        for edit, new in (("deepen", deeper), ("PReLU -> ReLU", relu)):
            for mode in modes:
                report = surgery.verify(model, new, x, verbose=0, mode=mode)
                rows.append(
                    {
                        "model": name,
                        "edit": edit,
                        "layers": len(deep) if edit == "deepen" else len(prelus),
                        "seconds": round(seconds, 2) if edit == "deepen" else None,
                        "warnings": len(caught) if edit == "deepen" else 0,
                        **report.as_dict(),
                    }
                )
                log(f"{name} {edit} ({rows[-1]['layers']} layers, {mode}): {report}")
    log(f"on {cpu_kind()}, {keras.backend.backend()}")
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        install(folder)
        run()


if __name__ == "__main__":
    main()
