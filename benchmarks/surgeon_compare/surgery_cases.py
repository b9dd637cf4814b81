"""surgery's layer edits on the comparison cases; writes surgery.json.

Run in the project venv (Keras 3, TensorFlow backend), from the repo root:

    python benchmarks/surgeon_compare/surgery_cases.py

The package is imported from this checkout (not from wherever the venv's
editable install points). Layers are named by path ("inner/drop1" in the
nested model) and one call of a shared layer as "bn1:0". Each result is also
compared with `surgery.verify` (compiled, as `predict` runs), which adds the
ulp distance and the original's own batch-size noise. Channel pruning
(keras-surgeon's delete_channels) is not in surgery: planned (issue 23).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import shared as S  # noqa: E402

import surgery  # noqa: E402


def path(kind, name):
    return f"inner/{name}" if kind == "nested" else name


def apply(model, kind, edit):
    conv = kind == "conv_sequential"
    if edit[0] == "many":
        delete, insert_after, replace = [], {}, {}
        for e in edit[1]:
            if e[0] == "delete":
                delete.append(path(kind, e[1]))
            elif e[0] == "insert_after":
                insert_after[path(kind, e[1])] = e[2](keras, conv)
            else:
                replace[path(kind, e[1])] = e[2](keras, conv)
        return surgery.edit(
            model, delete=delete, insert_after=insert_after, replace=replace
        )
    op, name = edit[0], path(kind, edit[1])
    if op == "delete":
        return surgery.delete_layer(
            model, f"{name}:{edit[2]}" if len(edit) > 2 else name
        )
    if op == "insert_after":
        return surgery.insert_layer(model, edit[2](keras, conv), after=name)
    if op == "replace":
        return surgery.replace_layer(model, name, edit[2](keras, conv))
    raise ValueError(edit)


def verified(model, new, x):
    """surgery.verify's report (compiled, as predict runs) and the result's kind."""
    report = surgery.verify(model, new, x, batch_size=S.N, verbose=0)
    d = report.as_dict()
    return {
        "verify": {
            k: d[k]
            for k in ("identical", "max_abs_diff", "max_ulp_diff", "noise_ulp", "mode")
        },
    }


def deepen_cases():
    """Net2DeeperNet: an identity-initialised copy of fc1 right after it."""
    out = []
    for kind in S.KINDS:
        keras.backend.clear_session()
        model = S.set_pretrained(S.build(keras, kind))
        x = S.data(model)
        before = S.predict(model, x)
        rec = {"case": "deepen_fc1", "kind": kind}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                new = surgery.deepen(model, after=[path(kind, "fc1")], data=x)
        except Exception as exc:  # the error is the measurement
            rec.update(ran=False, error=S.one_line(exc))
        else:
            rec.update(ran=True, error=None, result_class=type(new).__name__)
            rec["new_layers"] = sorted(set(S.structure(new)) - set(S.structure(model)))
            rec["warnings"] = [str(w.message)[:200] for w in caught]
            rec["vs_original"] = S.compare(before, S.predict(new, x))
            rec.update(verified(model, new, x))
            rec["input_model_unchanged"] = bool(
                S.compare(before, S.predict(model, x))["identical"]
            )
        print(rec, flush=True)
        out.append(rec)
    return out


def commit():
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    t0 = time.time()
    import tensorflow as tf

    results: dict = {
        "tool": "surgery",
        "versions": {
            "surgery_commit": commit(),
            "surgery_path": str(Path(surgery.__file__).parent),
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
            "tensorflow": tf.__version__,
            "numpy": np.__version__,
        },
        "machine": S.machine(),
        "predict": f"model.predict(x, batch_size={S.N}) (compiled tf.function)",
        "layer_cases": S.run_layer_cases(keras, apply, extra=verified),
        "deepen": deepen_cases(),
        "isolation": [
            S.isolation(keras, apply, "delete_dropout"),
            S.isolation(keras, apply, "replace_activation_relu"),
        ],
        "channel_cases": "not in surgery: planned (issue 23)",
    }
    print("isolation:", results["isolation"], flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    (HERE / "surgery.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
