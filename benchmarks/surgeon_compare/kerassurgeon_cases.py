"""keras-surgeon 0.2.0 (tf.keras 2.15) on the comparison cases; writes kerassurgeon.json.

Runs in its own venv, outside the project (keras-surgeon needs Keras 2):

    python3 -m venv /work/tmp/ksvenv
    /work/tmp/ksvenv/bin/pip install tensorflow-cpu==2.15.1 kerassurgeon==0.2.0
    /work/tmp/ksvenv/bin/python benchmarks/surgeon_compare/kerassurgeon_cases.py

keras-surgeon takes layer objects, not names, and inserts *before* a layer:
"insert after fc1" is `insert_layer(model, bn1, new)` here.

As installed, keras-surgeon 0.2.0 cannot run on TensorFlow >= 2.4: it calls
`len()` on the symbolic tensors, which Keras 2.4+ tensors (KerasTensor) refuse
(keras-surgeon issues #57, #61, #69; the fix in PR #58 was never merged).
So every case runs twice: `as_installed`, and `patched`, where keras-surgeon's
`isinstance(x, tf.Tensor)` checks also accept KerasTensor (the minimal change
in the spirit of PR #58; keras-surgeon's own code is otherwise unchanged).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging  # noqa: E402

import kerassurgeon  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from kerassurgeon import Surgeon, operations  # noqa: E402
from tensorflow import keras  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared as S  # noqa: E402

logging.getLogger().setLevel(logging.WARNING)  # kerassurgeon sets INFO
tf.get_logger().setLevel("ERROR")

HERE = Path(__file__).resolve().parent


class _TFWithKerasTensor:
    """`tensorflow` as keras-surgeon's modules see it, with KerasTensor a tf.Tensor."""

    def __init__(self):
        from keras.src.engine.keras_tensor import KerasTensor

        self.Tensor = (tf.Tensor, KerasTensor)

    def __getattr__(self, name):
        return getattr(tf, name)


def patch_keras_tensors():
    import kerassurgeon.surgeon
    import kerassurgeon.utils

    shim = _TFWithKerasTensor()
    kerassurgeon.surgeon.tf = shim
    kerassurgeon.utils.tf = shim


def find(model, kind, name):
    """The layer object the way a user gets it: from the model, by name."""
    if kind == "nested":
        return model.get_layer("inner").get_layer(name)
    return model.get_layer(name)


def jobs(model, kind, edit):
    """The edit as keras-surgeon jobs: (job, layer, kwargs)."""
    if edit[0] == "many":
        return [j for e in edit[1] for j in jobs(model, kind, e)]
    op, name = edit[0], edit[1]
    if op == "delete":
        kw = {"node_indices": [edit[2]]} if len(edit) > 2 else {}
        return [("delete_layer", find(model, kind, name), kw)]
    if op == "insert_after":
        new = edit[2](keras, kind == "conv_sequential")
        return [
            ("insert_layer", find(model, kind, S.layer_after(name)), {"new_layer": new})
        ]
    if op == "replace":
        new = edit[2](keras, kind == "conv_sequential")
        return [("replace_layer", find(model, kind, name), {"new_layer": new})]
    raise ValueError(edit)


def apply(model, kind, edit):
    js = jobs(model, kind, edit)
    if len(js) == 1:  # the one-operation functions, as documented
        job, layer, kw = js[0]
        return getattr(operations, job)(model, layer, **kw)
    surgeon = Surgeon(model, copy=True)  # several jobs, one rebuild
    for job, layer, kw in js:
        surgeon.add_job(job, layer, **kw)
    return surgeon.operate()


def channel_cases():
    """delete_channels on dead channels (zero kernel and bias): outputs should not move."""
    cases = [(kind, None) for kind in S.CHANNEL_KINDS]
    cases += [("depthwise", "stem"), ("separable", "stem")]  # prune what feeds them
    out = []
    for kind, target in cases:
        keras.backend.clear_session()
        model, default = S.build_channels(keras, kind)
        target = target or default
        S.set_pretrained(model, dead={target: S.DEAD})
        x = S.data(model)
        before = S.predict(model, x)
        rec = {"case": "delete_channels", "kind": kind, "layer": target}
        rec["layer_class"] = type(model.get_layer(target)).__name__
        try:
            new = operations.delete_channels(model, model.get_layer(target), S.DEAD)
        except Exception as exc:  # the error is the measurement
            rec.update(ran=False, error=S.one_line(exc))
        else:
            rec.update(ran=True, error=None, result_class=type(new).__name__)
            try:
                rec["vs_original"] = S.compare(before, S.predict(new, x))
                rec["params"] = [int(model.count_params()), int(new.count_params())]
            except Exception as exc:
                rec["predict_error"] = S.one_line(exc)
        print(rec, flush=True)
        out.append(rec)
    return out


def main():
    t0 = time.time()
    import keras as keras_pkg  # the Keras 2 package behind tf.keras

    results: dict = {
        "tool": "kerassurgeon",
        "versions": {
            "kerassurgeon": kerassurgeon.__version__,
            "tensorflow": tf.__version__,
            "keras": keras_pkg.__version__,
            "numpy": np.__version__,
        },
        "machine": S.machine(),
        "predict": f"model.predict(x, batch_size={S.N}) (compiled tf.function)",
    }
    for variant in ("as_installed", "patched"):
        if variant == "patched":
            patch_keras_tensors()
        print(f"--- {variant}", flush=True)
        results[variant] = {
            "layer_cases": S.run_layer_cases(keras, apply),
            "isolation": [
                S.isolation(keras, apply, "delete_dropout"),
                S.isolation(keras, apply, "replace_activation_relu"),
            ],
            "channel_cases": channel_cases(),
        }
        print("isolation:", results[variant]["isolation"], flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    (HERE / "kerassurgeon.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
