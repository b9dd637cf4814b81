"""Keras 3 `keras.models.clone_model` on the comparison cases; writes clone_model.json.

Run in the project venv (Keras 3, TensorFlow backend):

    python benchmarks/surgeon_compare/clone_model_cases.py

Each edit is done the way a Keras 3 user would: `call_function` to delete
(return the input) or insert (call the new layer on the output), and
`clone_function` to replace; `recursive=True` for the nested model. Two
variants of what happens to the untouched layers:

- `reuse_layers`: `clone_function=lambda layer: layer`, the idiom in
  clone_model's docstring: the result calls the original's layer objects.
- `clone_then_copy`: clone_model's default cloning (layers rebuilt from their
  config, so fresh weights), then the user copies the weights by layer name
  wherever the shapes match (not clone_model's doing: it copies none).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared as S  # noqa: E402

HERE = Path(__file__).resolve().parent


def default_clone(layer):
    return layer.__class__.from_config(layer.get_config())


def flatten_edits(edit):
    return (
        [e for x in edit[1] for e in flatten_edits(x)] if edit[0] == "many" else [edit]
    )


def functions(kind, edit, base_clone):
    """(clone_function, call_function or None) doing `edit`."""
    conv = kind == "conv_sequential"
    deletes, inserts, replaces = {}, {}, {}
    for e in flatten_edits(edit):
        if e[0] == "delete":
            deletes[e[1]] = e[2] if len(e) > 2 else None  # call index or all
        elif e[0] == "insert_after":
            inserts[e[1]] = e[2](keras, conv)
        elif e[0] == "replace":
            replaces[e[1]] = e[2](keras, conv)
    calls = {}

    def clone_function(layer):
        if layer.name in replaces:
            return replaces[layer.name]
        return base_clone(layer)

    def call_function(layer, *args, **kwargs):
        k = calls[layer.name] = calls.get(layer.name, -1) + 1
        if layer.name in deletes and deletes[layer.name] in (None, k):
            return args[0]
        out = layer(*args, **kwargs)
        if layer.name in inserts:
            out = inserts[layer.name](out)
        return out

    return clone_function, (call_function if deletes or inserts else None)


def copy_weights_by_name(source, target):
    """User code: copy weights from `source` to `target` layers of the same name."""
    have = {layer.name: layer for layer in S.flat_layers(source)}
    for layer in S.flat_layers(target):
        old = have.get(layer.name)
        if old is None or not layer.get_weights():
            continue
        w = old.get_weights()
        if [a.shape for a in w] == [a.shape for a in layer.get_weights()]:
            layer.set_weights(w)


def make_apply(variant, recursive_nested=True):
    def apply(model, kind, edit):
        base = (lambda layer: layer) if variant == "reuse_layers" else default_clone
        clone_function, call_function = functions(kind, edit, base)
        kwargs = {"clone_function": clone_function}
        if call_function is not None:
            kwargs["call_function"] = call_function
        if kind == "nested" and recursive_nested:
            kwargs["recursive"] = True
        new = keras.models.clone_model(model, **kwargs)
        if variant == "clone_then_copy":
            copy_weights_by_name(model, new)
        return new

    return apply


def plain_clones():
    """clone_model(model) with no arguments: what happens to the weights."""
    out = []
    for kind in S.KINDS:
        keras.backend.clear_session()
        model = S.set_pretrained(S.build(keras, kind))
        x = S.data(model)
        before = S.predict(model, x)
        rec = {"case": "plain_clone", "kind": kind}
        try:
            new = keras.models.clone_model(model)
            rec.update(ran=True, result_class=type(new).__name__)
            rec["vs_original"] = S.compare(before, S.predict(new, x))
            ids = {id(v) for v in model.weights}
            rec["variables_shared_with_input"] = sum(id(v) in ids for v in new.weights)
        except Exception as exc:  # the error is the measurement
            rec.update(ran=False, error=S.one_line(exc))
        print(rec, flush=True)
        out.append(rec)
    return out


def main():
    t0 = time.time()
    import tensorflow as tf

    results: dict = {
        "tool": "keras.models.clone_model",
        "versions": {
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
            "tensorflow": tf.__version__,
            "numpy": np.__version__,
        },
        "machine": S.machine(),
        "predict": f"model.predict(x, batch_size={S.N}) (compiled tf.function)",
        "plain_clone": plain_clones(),
    }
    for variant in ("reuse_layers", "clone_then_copy"):
        print(f"--- {variant}", flush=True)
        apply = make_apply(variant)
        results[variant] = {
            "layer_cases": S.run_layer_cases(keras, apply),
            "isolation": [
                S.isolation(keras, apply, "delete_dropout"),
                S.isolation(keras, apply, "replace_activation_relu"),
            ],
        }
        print("isolation:", results[variant]["isolation"], flush=True)
    # The nested model without recursive=True: call_function sees `inner` whole.
    print("--- nested, recursive=False", flush=True)
    results["nested_not_recursive"] = [
        S.run_layer_case(
            keras, "nested", case, make_apply("clone_then_copy", recursive_nested=False)
        )
        for case in S.LAYER_CASES
        if case["id"] in ("delete_dropout", "replace_activation_relu")
    ]
    for rec in results["nested_not_recursive"]:
        print(S.summary(rec), flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    (HERE / "clone_model.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
