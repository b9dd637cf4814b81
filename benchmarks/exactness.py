"""Where identity BN is bit-identical: case x mode x oneDNN x backend.

`python -m benchmarks.exactness` prints a Markdown table, headed by the CPU
kind it ran on (`surgery.runtime.machine.cpu_kind()`): compiled kernels differ by
CPU, so a table is a fact about that kind. Each case is a small model with
pretrained-like weights (`surgery.testing.synthetic`); a BN goes after the layer(s)
named in the case. "float32 BN" forces `bn_dtype="float32"` (what surgery
did before compiled inference was taken into account); "default" is what
`insert_identity_bn` does, its check run in the column's mode (as it is for
a model compiled for that mode). Cells give the max ulp difference of the
outputs on 64 samples (0 = bit-identical). TensorFlow runs once with
oneDNN's fused kernels on and once off, and JAX under its jit, each in a
subprocess, since both are read at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ACTIVATIONS = ("relu", "gelu", "silu", "hard_silu", "mish", "sigmoid", "tanh", "elu")
# (backend, mode, TF_ENABLE_ONEDNN_OPTS)
CONFIGS = (
    ("tensorflow", "graph", "1"),
    ("tensorflow", "graph", "0"),
    ("tensorflow", "xla", "1"),
    ("jax", "xla", "1"),
)


def cases():
    """(name, builder) pairs; a builder returns (model, x, layer to follow)."""
    import keras
    import numpy as np

    L = keras.layers
    rng = np.random.default_rng(0)
    dense_x = rng.normal(size=(64, 24)).astype("float32")
    conv_x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    seq_x = rng.normal(size=(64, 10, 6)).astype("float32")

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

    def at_output(kind):
        def build():
            if kind == "dense":
                inp = keras.Input((24,))
                out = L.Dense(8, activation="relu", name="t")(inp)
                return keras.Model(inp, out), dense_x, "t"
            if kind == "conv":
                inp = keras.Input((8, 8, 3))
                h = L.Conv2D(16, 3, activation="silu", name="c")(inp)
                out = L.Dense(8, name="t")(L.Flatten()(h))
                return keras.Model(inp, out), conv_x, ["c", "t"]
            inp = keras.Input((24,))
            h = L.Dense(32, activation="relu", name="t")(inp)
            return keras.Model(inp, L.Dense(8)(h * 2.0)), dense_x, "t"

        return build

    def recurrent(cell, stacked):
        def build():
            inp = keras.Input((10, 6))
            if stacked:  # chars2vec's shape: LSTM(seq) -> LSTM, BN after both
                h = cell(16, return_sequences=True, name="r1")(inp)
                return keras.Model(inp, cell(16, name="t")(h)), seq_x, ["r1", "t"]
            h = cell(16, name="t")(inp)
            return keras.Model(inp, L.Dense(4, name="out")(h)), seq_x, "t"

        return build

    def pooled(act):
        def build():
            inp = keras.Input((8, 8, 3))
            h = L.Conv2D(16, 3, activation=act, name="t")(inp)
            h = L.GlobalAveragePooling2D()(h)
            return keras.Model(inp, L.Dense(8, name="out")(h)), conv_x, "t"

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
    return out + [
        ("BN feeding an Add -> BN", residual),
        ("Dense(relu) -> BN at the model output", at_output("dense")),
        ("Conv2D(silu) -> BN, Dense -> BN at the output", at_output("conv")),
        ("Dense(relu) -> BN -> x * 2 (a non-Layer op)", at_output("op")),
        ("LSTM -> BN -> Dense", recurrent(L.LSTM, False)),
        ("GRU -> BN -> Dense", recurrent(L.GRU, False)),
        ("SimpleRNN -> BN -> Dense", recurrent(L.SimpleRNN, False)),
        ("LSTM(seq) -> BN -> LSTM -> BN at the output", recurrent(L.LSTM, True)),
        ("Conv2D(relu) -> BN -> GlobalAveragePooling2D", pooled("relu")),
        ("Conv2D(silu) -> BN -> GlobalAveragePooling2D", pooled("silu")),
    ]


def measure(mode: str) -> dict:
    """{case: {"float32": ulp, "default": ulp}} in this process's setup."""
    import warnings

    import surgery
    from surgery.testing.synthetic import pretrained_like

    warnings.simplefilter("ignore")
    results = {}
    for name, build in cases():
        model, x, after = build()
        pretrained_like(model)
        row = {}
        for label, kwargs in (
            ("float32", {"bn_dtype": "float32"}),
            ("default", {}),
        ):
            new = surgery.insert_identity_bn(
                model, after=after, data=x, verbose=0, check=mode, **kwargs
            )
            row[label] = surgery.verify(
                model, new, x, verbose=0, mode=mode
            ).max_ulp_diff
        results[name] = row
    return results


def run() -> str:
    from surgery.runtime.machine import cpu_kind

    columns = {}
    for backend, mode, onednn in CONFIGS:
        env = dict(
            os.environ,
            KERAS_BACKEND=backend,
            TF_ENABLE_ONEDNN_OPTS=onednn,
            TF_CPP_MIN_LOG_LEVEL="3",
        )
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.exactness", "--measure", mode],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        key = (backend, mode, onednn)
        columns[key] = json.loads(done.stdout.strip().splitlines()[-1])
    head = [
        f"{mode}, oneDNN {'on' if o == '1' else 'off'}" if b == "tensorflow" else
        f"JAX {mode}"
        for b, mode, o in CONFIGS
    ]  # fmt: skip
    lines = [
        f"CPU: {cpu_kind()}",
        "",
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
