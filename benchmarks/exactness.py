"""Where identity BN is bit-identical: case x mode x oneDNN, before and after.

`python -m benchmarks.exactness` prints a Markdown table. Each case is a
small model with pretrained-like weights (`surgery.synthetic`); a BN goes
after the layer named in the case. "float32 BN" is the parameterisation
before compiled inference was taken into account (`bn_dtype="float32"`,
`check=False`); "default" is what `insert_identity_bn` does now. Cells give
the max ulp difference of the outputs on 64 samples (0 = bit-identical).
Graph mode runs once with oneDNN's fused kernels on and once off, each in a
subprocess, since TensorFlow reads `TF_ENABLE_ONEDNN_OPTS` at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ACTIVATIONS = ("relu", "gelu", "silu", "hard_silu", "mish", "sigmoid", "tanh", "elu")
CONFIGS = (("graph", "1"), ("graph", "0"), ("xla", "1"))


def cases():
    """(name, builder) pairs; a builder returns (model, x, layer to follow)."""
    import keras
    import numpy as np

    L = keras.layers
    rng = np.random.default_rng(0)
    dense_x = rng.normal(size=(64, 24)).astype("float32")
    conv_x = rng.normal(size=(64, 8, 8, 3)).astype("float32")

    def dense(act, separate, after):
        def build():
            inp = keras.Input((24,))
            if separate:
                h = L.Activation(act, name="act")(L.Dense(32, name="t")(inp))
            else:
                h = L.Dense(32, activation=act, name="t")(inp)
            return keras.Model(inp, L.Dense(8, name="out")(h)), dense_x, after

        return build

    def conv(act):
        def build():
            inp = keras.Input((8, 8, 3))
            h = L.Conv2D(16, 3, activation=act, name="t")(inp)
            return keras.Model(inp, L.Conv2D(8, 3, name="out")(h)), conv_x, "t"

        return build

    def residual():
        inp = keras.Input((8, 8, 8))
        h = L.BatchNormalization(name="bn1")(L.Conv2D(8, 3, padding="same")(inp))
        h = L.Activation("relu")(L.Add()([h, inp]))
        x = rng.normal(size=(64, 8, 8, 8)).astype("float32")
        return keras.Model(inp, L.Conv2D(4, 1, name="out")(h)), x, "bn1"

    out = []
    for act in ACTIVATIONS:
        out += [
            (f"Dense({act}) -> BN", dense(act, False, "t")),
            (f"Conv2D({act}) -> BN", conv(act)),
            (f"Activation({act}) -> BN", dense(act, True, "act")),
            (f"Dense -> BN -> Activation({act})", dense(act, True, "t")),
        ]
    return out + [("BN feeding an Add -> BN", residual)]


def measure(mode: str) -> dict:
    """{case: {"float32": ulp, "default": ulp}} in this process's setup."""
    import warnings

    import surgery
    from surgery.synthetic import pretrained_like

    warnings.simplefilter("ignore")
    results = {}
    for name, build in cases():
        model, x, after = build()
        pretrained_like(model)
        row = {}
        for label, kwargs in (
            ("float32", {"bn_dtype": "float32", "check": False}),
            ("default", {}),
        ):
            new = surgery.insert_identity_bn(
                model, after=[after], data=x, verbose=0, **kwargs
            )
            row[label] = surgery.verify(
                model, new, x, verbose=0, mode=mode
            ).max_ulp_diff
        results[name] = row
    return results


def run() -> str:
    columns = {}
    for mode, onednn in CONFIGS:
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="3")
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.exactness", "--measure", mode],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        columns[(mode, onednn)] = json.loads(done.stdout.strip().splitlines()[-1])
    head = [f"{m}, oneDNN {'on' if o == '1' else 'off'}" for m, o in CONFIGS]
    lines = [
        "| case | " + " | ".join(f"{h}: float32 BN / default" for h in head) + " |",
        "|---|" + "---|" * len(CONFIGS),
    ]
    for name in columns[CONFIGS[0]]:
        cells = [
            f"{columns[c][name]['float32']} / {columns[c][name]['default']}"
            for c in CONFIGS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--measure" in sys.argv:
        print(json.dumps(measure(sys.argv[sys.argv.index("--measure") + 1])))
    else:
        print(run())
