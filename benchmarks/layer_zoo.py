"""Layer surgery on keras.applications: are the exact edits bit-identical?

`python -m benchmarks.layer_zoo` builds each architecture offline
(`weights=None`, then `pretrained_like` for non-zero biases and BN
statistics) at the smallest input it accepts, and measures three edits that
should leave the outputs bit-identical:

- **deepen**: `surgery.deepen` after every Dense and convolution
  (`surgery.editing.identity_layers.KINDS`); layers it refuses are counted;
- **delete noise**: `surgery.delete_layer` of every Dropout and noise layer,
  where the model has any;
- **BN round trip**: `insert_identity_bn` after three Conv/Dense layers
  (first, middle, last; its check in the column's mode), then
  `delete_layer` of the BNs it inserted, compared with the original.

Each cell is `surgery.verify(..., mode=...).max_ulp_diff` on 16
standard-normal samples (0 = bit-identical). Each (model, configuration)
runs in a subprocess of its own, since `KERAS_BACKEND` and
`TF_ENABLE_ONEDNN_OPTS` are read at import: TF graph with oneDNN on and
off, TF XLA, JAX (XLA) and torch (eager). When a deepened model is not
bit-identical, the child bisects the deepened layers to the ones that
break it. The table, headed by the CPU kind, goes to `layer_zoo.md`.

    python -m benchmarks.layer_zoo [--all] [--samples 16] [--timeout 600] [MODEL ...]

The default run covers `MODELS` (about 45 minutes on 2 shared cores); `--all`
adds `SLOW` (NASNetMobile, about 15 minutes more; Keras has no torch
NASNet).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

MODELS = (
    "VGG16",
    "ResNet50",
    "MobileNet",
    "MobileNetV2",
    "EfficientNetB0",
    "DenseNet121",
    "Xception",
    "ConvNeXtTiny",
)
# Only with --all (or named): NASNetMobile's 771 layers took 382 s in TF XLA
# on 2 loaded cores, over the 3 minutes a configuration may take by default.
SLOW = ("NASNetMobile",)
# (label, KERAS_BACKEND, verify mode, TF_ENABLE_ONEDNN_OPTS)
CONFIGS = (
    ("TF graph, oneDNN on", "tensorflow", "graph", "1"),
    ("TF graph, oneDNN off", "tensorflow", "graph", "0"),
    ("TF XLA", "tensorflow", "xla", "1"),
    ("JAX XLA", "jax", "xla", "1"),
    ("torch eager", "torch", "eager", "1"),
)
BN_TAPS = 3
OUT = Path(__file__).with_name("layer_zoo.md")
QUOTED = re.compile(r"'([^']+)'")


# ---------------------------------------------------------------- child side


def deepen_all(model, paths: list[str]):
    """Deepen after every layer of `paths` it accepts: (new, kept, refused)."""
    import surgery

    kept, refused = list(paths), {}
    while True:
        try:
            return surgery.deepen(model, after=kept, check=False), kept, refused
        except surgery.SurgeryError as e:
            m = QUOTED.search(str(e))
            if not m or m.group(1) not in kept:
                raise
            kept.remove(m.group(1))
            refused[m.group(1)] = str(e).splitlines()[0]


def culprits(model, paths: list[str], differs) -> list[list[str]]:
    """The smallest sets of `paths` whose deepening makes `differs` true.

    Bisects: a failing set is split in halves and each half tried alone; a
    failing single layer is a culprit, and a set neither of whose halves
    fails alone (an interaction) is reported whole.
    """
    if len(paths) == 1:
        return [paths]
    half = len(paths) // 2
    found = []
    for part in (paths[:half], paths[half:]):
        if differs(part):
            found += culprits(model, part, differs)
    return found or [paths]


def measure(name: str, mode: str, samples: int) -> dict:
    import warnings

    import keras
    import numpy as np

    import surgery
    from benchmarks.common import conv_dense_taps
    from benchmarks.zoo import build  # imports Keras: child side only
    from surgery.editing.identity_layers import KINDS
    from surgery.graph.spots import find_spots, layer_paths, walk_layers
    from surgery.numerics.compare import compare_outputs
    from surgery.synthetic import pretrained_like
    from surgery.verbs.verify import flat_outputs, runner

    warnings.simplefilter("ignore")
    L = keras.layers
    start = time.perf_counter()
    model, size = build(name)
    pretrained_like(model)
    row = {
        "model": name,
        "input": size,
        "layers": sum(1 for _ in walk_layers(model)),
        "build_s": time.perf_counter() - start,
    }
    x = np.random.default_rng(0).standard_normal((samples, size, size, 3))
    x = x.astype("float32")

    def verify(new) -> dict:
        r = surgery.verify(model, new, x, verbose=0, mode=mode)
        return {
            "identical": r.identical,
            "ulp": r.max_ulp_diff,
            "noise": r.noise_ulp,
            "nonfinite": r.nonfinite_mismatches,
        }

    # (a) deepen after every Dense / convolution
    paths = layer_paths(model, KINDS)
    start = time.perf_counter()
    new, kept, refused = deepen_all(model, paths)
    row["deepen"] = {
        "candidates": len(paths),
        "deepened": len(kept),
        "refused": refused,
        "seconds": time.perf_counter() - start,
        **verify(new),
    }
    del new
    if not row["deepen"]["identical"]:
        run = runner(model, mode)
        reference = flat_outputs(run(x))

        def differs(subset):
            sub = surgery.deepen(model, after=subset, check=False)
            got = flat_outputs(runner(sub, mode)(x))
            return not compare_outputs(reference, got)[0]

        found = []
        for group in culprits(model, kept, differs):
            sub = surgery.deepen(model, after=group, check=False)
            ulp = compare_outputs(reference, flat_outputs(runner(sub, mode)(x)))[2]
            kinds = []
            for path in group:
                layer = dict(walk_layers(model))[path]
                kinds.append(
                    f"{type(layer).__name__}"
                    f"({keras.activations.serialize(layer.activation)})"
                )
            found.append({"layers": group, "kinds": kinds, "ulp": ulp})
        row["deepen"]["culprits"] = found

    # (b) delete every Dropout / noise layer
    noise = (L.Dropout, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout)
    drops = layer_paths(model, noise)
    if drops:
        start = time.perf_counter()
        new = surgery.delete_layer(model, drops)
        row["delete"] = {
            "deleted": len(drops),
            "seconds": time.perf_counter() - start,
            **verify(new),
        }
        del new

    # (c) identity BN after three Conv/Dense layers, then delete it again
    taps = []
    for tap in conv_dense_taps(model):
        try:
            find_spots(model, after=[tap])
            taps.append(tap)
        except surgery.SurgeryError:
            pass
    taps = sorted({taps[0], taps[len(taps) // 2], taps[-1]}, key=taps.index)
    start = time.perf_counter()
    bn_model = surgery.insert_identity_bn(
        model, after=taps, data=x, verbose=0, check=mode
    )
    insert_s = time.perf_counter() - start
    before = {p for p, _ in walk_layers(model)}
    bns = [
        p
        for p, op in walk_layers(bn_model)
        if p not in before and isinstance(op, L.BatchNormalization)
    ]
    start = time.perf_counter()
    back = surgery.delete_layer(bn_model, bns)
    row["roundtrip"] = {
        "taps": taps,
        "bns": len(bns),
        "insert_s": insert_s,
        "delete_s": time.perf_counter() - start,
        "with_bn": verify(bn_model),
        "layers_back": sum(1 for _ in walk_layers(back)) == row["layers"],
        **verify(back),
    }
    return row


# --------------------------------------------------------------- parent side


def child(name: str, config: tuple, samples: int, timeout: float) -> dict:
    _, backend, mode, onednn = config
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        TF_ENABLE_ONEDNN_OPTS=onednn,
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    cmd = [sys.executable, "-m", "benchmarks.layer_zoo", "--measure", name, mode]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [*cmd, "--samples", str(samples)],
            env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s", "wall_s": timeout}
    wall = time.perf_counter() - start
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:160], "wall_s": wall}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall}


def cell(result: dict, edit: str) -> str:
    if "error" in result:
        return "—"
    part = result.get(edit)
    if part is None:
        return "n/a"
    ulp = "0" if part["identical"] else f"**{part['ulp']}**"
    if part.get("nonfinite"):
        ulp += f" ({part['nonfinite']} non-finite)"
    return ulp


def table(
    results: dict, models: list[str], samples: int, total_s: float, command: str
) -> str:
    from surgery.runtime.machine import cpu_kind

    heads = [c[0] for c in CONFIGS]
    lines = [
        f"CPU: {cpu_kind()}; {samples} standard-normal samples; cells: max ulp "
        "difference of the outputs from the original's (0 = bit-identical).",
        "",
    ]
    for edit, title in (
        ("deepen", "Deepen after every Dense / convolution"),
        ("delete", "Delete every Dropout / noise layer"),
        ("roundtrip", f"insert_identity_bn after {BN_TAPS} layers, then delete_layer"),
    ):
        lines += [f"### {title}", "", "| model | input | " + " | ".join(heads) + " |"]
        lines.append("|---|---|" + "---|" * len(heads))
        for name in models:
            row = results[name]
            first = next((r for r in row.values() if "error" not in r), None)
            if edit == "delete" and first is not None and "delete" not in first:
                continue
            size = first["input"] if first else "?"
            cells = [cell(row[c[0]], edit) for c in CONFIGS]
            lines.append(f"| {name} | {size} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "### Details (TF graph, oneDNN on, unless stated)",
        "",
        'Per config in the column order above. "BN model itself": the model '
        "with the inserted BNs, before they are deleted (Keras' torch BN is not "
        "an exact identity without `zero_mean=True`). Batch-size noise: the "
        "original's own, whole batch against two halves (`Report.noise_ulp`).",
        "",
        "| model | layers | deepened / candidates (refused) | deepen s | "
        "dropout layers | BN taps | BN model itself, ulp per config | "
        "batch-size noise, ulp per config | wall s per config |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in models:
        row = results[name]
        r = row[CONFIGS[0][0]]
        walls = " / ".join(f"{row[c[0]]['wall_s']:.0f}" for c in CONFIGS)
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | | | {walls} |")
            continue
        d = r["deepen"]
        with_bn = " / ".join(
            str(row[c[0]]["roundtrip"]["with_bn"]["ulp"]) if "error" not in row[c[0]]
            else "—" for c in CONFIGS
        )  # fmt: skip
        noise = " / ".join(
            str(row[c[0]]["deepen"]["noise"]) if "error" not in row[c[0]] else "—"
            for c in CONFIGS
        )
        lines.append(
            f"| {name} | {r['layers']} | {d['deepened']} / {d['candidates']} "
            f"({len(d['refused'])}) | {d['seconds']:.1f} | "
            f"{r.get('delete', {}).get('deleted', 0)} | "
            f"{', '.join(r['roundtrip']['taps'])} | {with_bn} | {noise} | {walls} |"
        )
    notes = []
    for name in models:
        for label, *_ in CONFIGS:
            r = results[name][label]
            if "error" in r:
                notes.append(f"- {name}, {label}: not measured ({r['error']}).")
                continue
            for path, why in r["deepen"]["refused"].items():
                notes.append(f"- {name}: deepen refused `{path}`: {why}")
            for c in r["deepen"].get("culprits", []):
                notes.append(
                    f"- {name}, {label}: deepening {', '.join(c['layers'])} "
                    f"({', '.join(c['kinds'])}) alone gives {c['ulp']} ulp."
                )
            if not r["roundtrip"]["layers_back"]:
                notes.append(f"- {name}, {label}: round trip left extra layers.")
    lines += [
        "",
        *dict.fromkeys(notes),
        "",
        f"`{command}` took {total_s / 60:.1f} min wall.",
    ]
    return "\n".join(lines)


def run(models: list[str], samples: int, timeout: float, command: str) -> str:
    start = time.perf_counter()
    results = {}
    for name in models:
        results[name] = {}
        for config in CONFIGS:
            r = child(name, config, samples, timeout)
            results[name][config[0]] = r
            status = r.get("error") or (
                f"deepen {r['deepen']['deepened']} ulp {r['deepen']['ulp']}, "
                f"delete {r.get('delete', {}).get('ulp', '-')}, "
                f"round trip {r['roundtrip']['ulp']}"
            )
            print(f"  {name} / {config[0]}: {status} ({r['wall_s']:.0f} s)", flush=True)
    Path("/tmp/layer_zoo.json").write_text(json.dumps(results, indent=1))
    text = table(results, models, samples, time.perf_counter() - start, command)
    OUT.write_text(text + "\n")
    return text


def _option(args: list[str], flag: str, default):
    if flag in args:
        i = args.index(flag)
        value = args[i + 1]
        del args[i : i + 2]
        return type(default)(value)
    return default


if __name__ == "__main__":
    args = sys.argv[1:]
    samples = _option(args, "--samples", 16)
    if "--measure" in args:
        i = args.index("--measure")
        print(json.dumps(measure(args[i + 1], args[i + 2], samples)))
    else:
        command = " ".join(["python -m benchmarks.layer_zoo", *args])
        timeout = _option(args, "--timeout", 600.0)
        everything = "--all" in args
        args = [a for a in args if a != "--all"]
        models = args or list(MODELS) + (list(SLOW) if everything else [])
        print(run(models, samples, timeout, command))
