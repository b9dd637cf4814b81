"""Channel pruning on keras.applications: does it prune, run and save; is it faster?

    python -m benchmarks.prune_zoo [--only zoo|latency|dead ...] [--models A,B]
        [--latency-models A,B] [--rounds 7] [--timeout 1800] [--out DIR]

Three parts, each written to `prune_zoo.json` (a part that runs replaces its
entry; the others are kept) and rendered into `prune_zoo.md`:

- **zoo**: every `keras.applications` architecture (`benchmarks.zoo.build`:
  `weights=None`, smallest input), `surgery.prune_channels(model, amount=0.3,
  criterion="l1")` without data. Per model: whether it prunes, channels
  removed, groups pruned / prunable / all (`surgery.channel_groups`),
  parameters and FLOPs before and after (the report's), whether the pruned
  model runs (`predict` on 2 images: finite outputs of the original's
  shapes) and whether it survives plain Keras `save` / `load_model`
  (predictions `np.array_equal` to the pruned model's). Each model runs in a
  subprocess of its own (memory, and a crash or hang costs one row).
- **latency**: ResNet50, MobileNetV2 and VGG16 at 224x224 pruned 50% by l1;
  seconds per `predict_on_batch` at batch 1 and 32, unpruned and pruned
  interleaved in one run after a warm-up (`benchmarks.common.interleaved`).
- **dead**: the embedded default model pruned by `"dead"` and `"constant"`
  over its shipped images, and a small CNN with a quarter of its ReLU units
  forced dead (large negative biases), pruned by `"dead"`: units removed and
  the report's output difference.

`--models` picks zoo architectures (default: all of them), `--latency-models`
the latency ones. The full run took 26-36 minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("zoo", "latency", "dead")
LATENCY_MODELS = ("ResNet50", "MobileNetV2", "VGG16")
ZOO_AMOUNT = 0.3
LATENCY_AMOUNT = 0.5
BATCHES = (1, 32)
MIN_TIMED_S = 0.5  # a timed sample loops predict_on_batch at least this long
DEAD_FRACTION = 0.25
QUOTED = re.compile(r"'[^']*'")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def flat(outputs) -> list:
    import numpy as np

    if isinstance(outputs, dict):
        outputs = [outputs[k] for k in sorted(outputs)]
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return [np.asarray(o) for o in outputs]


# ------------------------------------------------------------------- zoo (child)


def zoo_one(name: str) -> dict:
    """Build, prune 30% by l1, run, save and load one architecture."""
    import warnings

    import keras
    import numpy as np

    import surgery
    from benchmarks.common import images
    from benchmarks.zoo import build, preprocess

    warnings.simplefilter("ignore")
    row: dict = {"model": name}
    start = time.perf_counter()
    model, size = build(name)
    row.update(
        input=size, layers=len(model.layers), build_s=time.perf_counter() - start
    )
    groups = surgery.channel_groups(model)
    row["groups_total"] = len(groups)
    row["groups_prunable"] = sum(g.fixed is None for g in groups)
    row["channels_prunable"] = sum(g.size for g in groups if g.fixed is None)
    reasons = [QUOTED.sub("'…'", g.fixed) for g in groups if g.fixed is not None]
    row["fixed_reasons"] = dict(collections.Counter(reasons).most_common())
    x = preprocess(name, images(2, size, seed=1))
    reference = flat(model.predict(x, verbose=0))
    start = time.perf_counter()
    try:
        new, report = surgery.prune_channels(
            model, amount=ZOO_AMOUNT, criterion="l1", verbose=0
        )
    except Exception as e:  # the row records it; the sweep goes on
        row.update(prunes=False, prune_error=first_line(e))
        return row
    row.update(
        prunes=True,
        prune_s=time.perf_counter() - start,
        removed=report.removed,
        groups_pruned=len(report.groups),
        params_before=report.params_before,
        params_after=report.params_after,
        flops_before=report.flops_before,
        flops_after=report.flops_after,
        notes=report.notes,
    )
    del model
    try:
        got = flat(new.predict(x, verbose=0))
        shapes = [o.shape for o in got] == [o.shape for o in reference]
        finite = all(np.isfinite(o).all() for o in got)
        row["runs"] = shapes and finite
        if not shapes:
            row["run_error"] = (
                f"output shapes {[o.shape for o in got]} != "
                f"{[o.shape for o in reference]}"
            )
        elif not finite:
            row["run_error"] = "non-finite outputs"
    except Exception as e:
        row.update(runs=False, run_error=first_line(e))
        return row
    try:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "pruned.keras")
            start = time.perf_counter()
            new.save(path)
            row["file_mb"] = os.path.getsize(path) / 2**20
            loaded = keras.models.load_model(path)
            row["save_load_s"] = time.perf_counter() - start
        back = flat(loaded.predict(x, verbose=0))
        row["saves"] = len(back) == len(got) and all(
            np.array_equal(a, b) for a, b in zip(got, back, strict=True)
        )
        if not row["saves"]:
            row["save_error"] = (
                "loaded model's predictions differ from the pruned one's"
            )
    except Exception as e:
        row.update(saves=False, save_error=first_line(e))
    return row


# ------------------------------------------------------------------ zoo (parent)


def zoo_child(name: str, timeout: float) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "benchmarks.prune_zoo", "--measure", name]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"model": name, "prunes": False, "prune_error": f"over {timeout:.0f} s",
                "wall_s": timeout}  # fmt: skip
    wall = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"model": name, "prunes": False,
                "prune_error": f"child exited {done.returncode}: {tail[:160]}",
                "wall_s": wall}  # fmt: skip
    return {**json.loads(lines[-1]), "wall_s": wall}


def zoo(models: list[str], timeout: float, log, save) -> dict:
    rows = []
    for name in models:
        row = zoo_child(name, timeout)
        rows.append(row)
        status = "  ".join(
            f"{k} {'yes' if row.get(k) else 'NO'}" for k in ("prunes", "runs", "saves")
        )
        error = row.get("prune_error") or row.get("run_error") or row.get("save_error")
        log(
            f"  {name}: {status} ({row['wall_s']:.0f} s){'  ' + error if error else ''}"
        )
        save({"rows": rows})
    return {"rows": rows}


# ----------------------------------------------------------------------- latency


def latency(models: list[str], rounds: int, log) -> dict:
    import warnings

    import keras

    import surgery
    from benchmarks.common import free_memory, images, interleaved
    from benchmarks.zoo import preprocess

    warnings.simplefilter("ignore")
    rows = []
    for name in models:
        model = getattr(keras.applications, name)(weights=None)  # 224x224
        size = model.input_shape[1]
        new, report = surgery.prune_channels(
            model, amount=LATENCY_AMOUNT, criterion="l1", verbose=0
        )
        x = preprocess(name, images(max(BATCHES), size, seed=1))
        for batch in BATCHES:  # trace both shapes before any timing
            for m in (model, new):
                m.predict_on_batch(x[:batch])
                m.predict_on_batch(x[:batch])
        for batch in BATCHES:
            xb = x[:batch]
            start = time.perf_counter()
            model.predict_on_batch(xb)
            once = time.perf_counter() - start
            calls = max(1, math.ceil(MIN_TIMED_S / once))

            def loop(m, xb=xb, calls=calls):
                for _ in range(calls):
                    m.predict_on_batch(xb)

            load_before = os.getloadavg()
            times = interleaved(
                {"unpruned": lambda m=model: loop(m), "pruned": lambda m=new: loop(m)},
                rounds,
            )
            per_call = {k: [t / calls for t in v] for k, v in times.items()}
            rows.append(
                _latency_row(name, size, batch, calls, per_call, report, load_before)
            )
            r = rows[-1]
            log(
                f"  {name} batch {batch}: {r['unpruned_s']['median'] * 1e3:.1f} -> "
                f"{r['pruned_s']['median'] * 1e3:.1f} ms, ratio "
                f"{r['ratio_of_medians']:.3f} (FLOPs {r['flops_ratio']:.3f}), load "
                f"{load_before[0]:.2f} -> {r['load_after'][0]:.2f}"
            )
        del model, new
        free_memory()
    return {"rounds": rounds, "amount": LATENCY_AMOUNT, "rows": rows}


def _latency_row(name, size, batch, calls, per_call, report, load_before) -> dict:
    def spread(v):
        return {"min": min(v), "median": statistics.median(v), "max": max(v)}

    ratios = [
        p / u for p, u in zip(per_call["pruned"], per_call["unpruned"], strict=True)
    ]
    return {
        "model": name,
        "input": size,
        "batch": batch,
        "calls_per_sample": calls,
        "unpruned_s": spread(per_call["unpruned"]),
        "pruned_s": spread(per_call["pruned"]),
        "seconds": per_call,
        "ratio_of_medians": statistics.median(per_call["pruned"])
        / statistics.median(per_call["unpruned"]),
        "round_ratio": spread(ratios),
        "flops_before": report.flops_before,
        "flops_after": report.flops_after,
        "flops_ratio": report.flops_after / report.flops_before,
        "params_ratio": report.params_after / report.params_before,
        "removed": report.removed,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


# -------------------------------------------------------------------------- dead


def dead(log) -> dict:
    import warnings

    import numpy as np

    import surgery
    from surgery import default
    from surgery.data.batches import Batches
    from surgery.data.images import folder_labels

    warnings.simplefilter("ignore")
    model = default.load()
    folder = default.images_dir()
    x = np.concatenate(list(Batches(folder, model=model)))
    y, _ = folder_labels(folder)
    rows = []
    for criterion in ("dead", "constant"):
        start = time.perf_counter()
        new, report = surgery.prune_channels(
            model, criterion=criterion, data=folder, verbose=0
        )
        row = _dead_row("embedded default (digits_vgg)", criterion, report, start)
        row["samples"] = len(x)
        row["dead_on_data"] = dead_on_data(
            model, x, {n: n for n in default_hidden(model)}
        )
        row["output_scale"] = float(np.abs(model.predict(x, verbose=0)).max())
        row["accuracy_before"] = float(
            np.mean(model.predict(x, verbose=0).argmax(1) == y)
        )
        row["accuracy_after"] = float(np.mean(new.predict(x, verbose=0).argmax(1) == y))
        rows.append(row)
        log(f"  default, {criterion}: {_dead_line(row)}")
    for bn in (False, True):
        model, forced = dead_cnn(bn)
        data = np.random.default_rng(1).standard_normal((256, 16, 16, 3), "float32")
        for criterion in ("dead", "constant"):
            start = time.perf_counter()
            new, report = surgery.prune_channels(
                model, criterion=criterion, data=data, verbose=0
            )
            name = "CNN, conv-BN-ReLU" if bn else "CNN, conv/dense with ReLU"
            row = _dead_row(name, criterion, report, start)
            row.update(samples=len(data), forced_dead=forced)
            row["dead_on_data"] = dead_on_data(model, data, forced_outputs(bn))
            row["output_scale"] = float(np.abs(model.predict(data, verbose=0)).max())
            rows.append(row)
            log(f"  {name}, {criterion}: {_dead_line(row)}")
    return {"rows": rows}


def dead_cnn(bn: bool, seed: int = 0):
    """A small CNN + Dense net (pretrained-like biases and BN statistics) with
    a quarter of each hidden layer's ReLU units dead: a bias (or BN beta) of
    -1e4 keeps them below zero on any input of ordinary size.

    Returns the model and `{layer: units forced dead}`.
    """
    import keras
    import numpy as np

    from surgery.synthetic import pretrained_like

    L = keras.layers
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((16, 16, 3))
    x = L.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(x)
    if bn:
        x = L.Conv2D(64, 3, padding="same", name="conv2")(x)
        x = L.BatchNormalization(name="bn2")(x)
        x = L.ReLU(name="relu2")(x)
    else:
        x = L.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(x)
    x = L.Flatten(name="flatten")(x) if bn else L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(128, activation="relu", name="fc1")(x)
    x = L.Dense(64, activation="relu", name="fc2")(x)
    outputs = L.Dense(10, name="logits")(x)
    model = keras.Model(inputs, outputs, name="dead_cnn_bn" if bn else "dead_cnn")
    pretrained_like(model, seed=seed)
    rng = np.random.default_rng(seed)
    forced = {}
    for layer in ("conv1", "bn2" if bn else "conv2", "conv3", "fc1", "fc2"):
        layer = model.get_layer(layer)
        var = layer.beta if bn and layer.name == "bn2" else layer.bias
        values = np.array(var.numpy())
        dead_units = rng.choice(len(values), int(DEAD_FRACTION * len(values)), False)
        values[dead_units] = -1e4
        var.assign(values)
        forced[layer.name] = len(dead_units)
    return model, forced


def default_hidden(model) -> list[str]:
    """The default model's hidden Conv/Dense layers (ReLU inside each)."""
    import keras

    kinds = (keras.layers.Conv2D, keras.layers.Dense)
    return [la.name for la in model.layers if isinstance(la, kinds)][:-1]


def forced_outputs(bn: bool) -> dict[str, str]:
    """`dead_cnn`'s hidden layers whose output is the ReLU's, by producer."""
    second = "relu2" if bn else "conv2"
    return dict(conv1="conv1", conv2=second, conv3="conv3", fc1="fc1", fc2="fc2")


def dead_on_data(model, x, layers: dict[str, str]) -> dict[str, int]:
    """Per producer, the units of its ReLU's output (layer `layers[producer]`)
    that are 0 at every position of every sample: counted with plain Keras,
    independently of `prune_channels`."""
    import keras
    import numpy as np

    names = list(layers)
    probe = keras.Model(
        model.inputs, [model.get_layer(layers[n]).output for n in names]
    )
    outs = probe.predict(x, verbose=0)
    return {
        n: int(np.all(o == 0, axis=tuple(range(o.ndim - 1))).sum())
        for n, o in zip(names, outs, strict=True)
    }


def _dead_row(name, criterion, report, start) -> dict:
    d = report.difference
    return {
        "model": name,
        "criterion": criterion,
        "seconds": time.perf_counter() - start,
        "removed": report.removed,
        "groups": [[" + ".join(g.producers), g.before, g.after] for g in report.groups],
        "params_before": report.params_before,
        "params_after": report.params_after,
        "flops_before": report.flops_before,
        "flops_after": report.flops_after,
        "identical": d.identical,
        "max_ulp_diff": d.max_ulp_diff,
        "max_abs_diff": d.max_abs_diff,
        "noise_ulp": d.noise_ulp,
        "mode": d.mode,
    }


def _dead_line(r) -> str:
    return (
        f"{r['removed']} removed, identical {r['identical']}, max ulp "
        f"{r['max_ulp_diff']}, max abs {r['max_abs_diff']:.3g}"
    )


# ------------------------------------------------------------------------ report


def machine() -> dict:
    from benchmarks.run import machine as run_machine
    from surgery.runtime.machine import cpu_kind

    return {**run_machine(), "cpu_kind": cpu_kind()}


def _pct(after, before) -> str:
    return f"{after / before:.1%}" if before else "n/a"


def _spread_ms(s: dict) -> str:
    return f"{s['min'] * 1e3:.1f} / **{s['median'] * 1e3:.1f}** / {s['max'] * 1e3:.1f}"


def _header(part: dict) -> list[str]:
    m = part["machine"]
    before = ", ".join(f"{v:.2f}" for v in m["load_average_at_start"])
    after = ", ".join(f"{v:.2f}" for v in part["load_after"])
    return [
        f"`{part['command']}` on {part['date']}, {part['seconds'] / 60:.1f} min wall. "
        f"CPU: {m['cpu']}, {m['cpu_kind']}, {m['usable_cores']} usable cores "
        f"(shared), {m['ram_gib']} GiB; Keras {m['keras']}, TensorFlow "
        f"{m['tensorflow']}, backend {m['backend']}. Load average (1, 5, 15 min) "
        f"before: {before}; after: {after}.",
        "",
    ]


def render(results: dict) -> str:
    lines = ["# Channel pruning over keras.applications", ""]
    lines += [
        "Written by `python -m benchmarks.prune_zoo` (see its docstring); "
        "`prune_zoo.json` holds every number. Each part names the command that "
        "produced it.",
        "",
    ]
    if "zoo" in results:
        lines += _render_zoo(results["zoo"])
    if "latency" in results:
        lines += _render_latency(results["latency"])
    if "dead" in results:
        lines += _render_dead(results["dead"])
    return "\n".join(lines) + "\n"


def _render_zoo(part: dict) -> list[str]:
    rows = part["data"]["rows"]
    n = len(rows)
    prunes = sum(bool(r.get("prunes")) for r in rows)
    runs = sum(bool(r.get("runs")) for r in rows)
    saves = sum(bool(r.get("saves")) for r in rows)
    lines = [
        f'## Zoo: `prune_channels(model, amount={ZOO_AMOUNT}, criterion="l1")`, no data',
        "",
    ]
    lines += _header(part)
    lines += [
        f"**{prunes} of {n} prune, {runs} of {n} run, {saves} of {n} save and "
        "load** (target: every one).",
        "",
        "Each architecture is built with `weights=None` at the smallest input "
        "it accepts (`benchmarks.zoo.build`). Groups: pruned (lost channels) / "
        "prunable (not fixed) / all (`surgery.channel_groups`). Removed: channels "
        "removed, of the channels in prunable groups. Runs: `predict` on 2 "
        "images gives finite outputs of the original's shapes. Saves: plain "
        "`model.save(.keras)` and `keras.models.load_model`, predictions "
        "`np.array_equal` to the pruned model's. Seconds: `prune_channels` "
        "alone, and the child process's wall time (build, groups, prune, "
        "predict, save, load); peak RSS: the child's `ru_maxrss`.",
        "",
        "| model | input | prunes | removed | groups pruned / prunable / all | "
        "params before → after | FLOPs before → after | runs | saves | prune s | "
        "wall s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for r in rows:
        yes = {k: "yes" if r.get(k) else "**no**" for k in ("prunes", "runs", "saves")}
        if not r.get("prunes"):
            lines.append(
                f"| {r['model']} | {r.get('input', '?')} | **no** | | | | | | | | "
                f"{r['wall_s']:.0f} | {_rss(r)} |"
            )
        else:
            flops = (
                f"{r['flops_before'] / 1e6:,.1f}M → {r['flops_after'] / 1e6:,.1f}M "
                f"({_pct(r['flops_after'], r['flops_before'])})"
                if r["flops_before"] is not None and r["flops_after"] is not None
                else "n/a"
            )
            lines.append(
                f"| {r['model']} | {r['input']} | yes | {r['removed']:,} / "
                f"{r['channels_prunable']:,} | {r['groups_pruned']} / "
                f"{r['groups_prunable']} / {r['groups_total']} | "
                f"{r['params_before'] / 1e6:.2f}M → {r['params_after'] / 1e6:.2f}M "
                f"({_pct(r['params_after'], r['params_before'])}) | {flops} | "
                f"{yes['runs'] if 'runs' in r else '—'} | "
                f"{yes['saves'] if 'saves' in r else '—'} | "
                f"{r['prune_s']:.1f} | {r['wall_s']:.0f} | {_rss(r)} |"
            )
        for key in ("prune_error", "run_error", "save_error"):
            if key in r:
                errors.append(f"- {r['model']} ({key.split('_')[0]}): `{r[key]}`")
    notes = sorted(
        {f"- {r['model']}: {note}" for r in rows for note in r.get("notes", [])}
    )
    usual = ("it is model input", "it reaches model output")
    fixed = [
        f"- {r['model']}: {n} group(s): {why}"
        for r in rows
        for why, n in r.get("fixed_reasons", {}).items()
        if not why.startswith(usual)
    ]
    lines += [""]
    if errors:
        lines += ["Failures (first line of each error):", "", *errors, ""]
    if fixed:
        lines += [
            "Groups fixed for another reason than being the model's input or "
            "reaching its output (`ChannelGroup.fixed`):",
            "",
            *fixed,
            "",
        ]
    if notes:
        lines += ["Notes from the reports:", "", *notes, ""]
    return lines


def _rss(row) -> str:
    rss = row.get("peak_rss_mb")
    return f"{rss / 1024:.1f}" if rss else "—"


def _render_latency(part: dict) -> list[str]:
    data = part["data"]
    lines = [
        f"## Latency: pruned {int(data['amount'] * 100)}% by l1 vs unpruned, "
        "`predict_on_batch` on CPU",
        "",
    ]
    lines += _header(part)
    lines += [
        f"`keras.applications` models (`weights=None`, 224x224), each pruned with "
        f'`prune_channels(model, amount={data["amount"]}, criterion="l1")`. Both '
        "models are called on the same batch, twice per shape untimed as a "
        "warm-up, then timed in "
        f"{data['rounds']} interleaved rounds (unpruned, pruned / pruned, "
        "unpruned, ..., after one more untimed call each); a timed sample loops "
        f"`predict_on_batch` for at least {MIN_TIMED_S} s (calls column) and is "
        "divided by its calls. Milliseconds per call as min / **median** / max. "
        "Ratio = pruned / unpruned (below 1: faster): the ratio of the medians, "
        "and the median (min–max) of the per-round ratios. No target: the FLOPs "
        "ratio is what a perfect kernel would give. Load average (1 min) before "
        "→ after each row's timing.",
        "",
        "| model | batch | calls | unpruned ms | pruned ms | ratio of medians | "
        "per-round ratio | speed-up | FLOPs ratio | params ratio | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        rr = r["round_ratio"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['calls_per_sample']} | "
            f"{_spread_ms(r['unpruned_s'])} | {_spread_ms(r['pruned_s'])} | "
            f"**{r['ratio_of_medians']:.3f}** | {rr['median']:.3f} "
            f"({rr['min']:.3f}–{rr['max']:.3f}) | {1 / r['ratio_of_medians']:.2f}x | "
            f"{r['flops_ratio']:.3f} | {r['params_ratio']:.3f} | "
            f"{r['load_before'][0]:.2f} → {r['load_after'][0]:.2f} |"
        )
    return [*lines, ""]


def _render_dead(part: dict) -> list[str]:
    lines = ["## Dead and constant units: removal that keeps the function", ""]
    lines += _header(part)
    lines += [
        "The embedded default model over its 200 shipped images (the folder, "
        "as the CLI passes it), and a small CNN (`dead_cnn`: `pretrained_like` "
        f"biases and BN statistics) with {int(DEAD_FRACTION * 100)}% of the "
        "units of each hidden layer forced dead by a bias (or BN beta) of -1e4, "
        "over 256 standard-normal 16x16x3 inputs. Dead on data: hidden ReLU "
        "units that are 0 at every position of every sample, counted with a "
        "plain Keras model of the activations (the forced ones and those the "
        "random weights leave dead). The difference columns are the report's "
        "(`surgery.verify` over the same data, compiled graph mode; ulps near "
        "0 are tiny, so read max ulp beside max abs and the outputs' largest "
        "|value|); noise is the original's own batch-size spread. The CNN "
        "outputs logits, the default model a softmax.",
        "",
        "| model | criterion | forced dead | dead on data | removed | identical | "
        "max ulp | max abs | max \\|output\\| | noise ulp | params | FLOPs | "
        "accuracy | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for r in part["data"]["rows"]:
        forced = r.get("forced_dead")
        acc = (
            f"{r['accuracy_before']:.3f} → {r['accuracy_after']:.3f}"
            if "accuracy_before" in r
            else "—"
        )
        lines.append(
            f"| {r['model']} | {r['criterion']} | "
            f"{sum(forced.values()) if forced else '—'} | "
            f"{sum(r['dead_on_data'].values())} | {r['removed']} | "
            f"{'yes' if r['identical'] else 'no'} | {r['max_ulp_diff']} | "
            f"{r['max_abs_diff']:.3g} | {r['output_scale']:.3g} | {r['noise_ulp']} | "
            f"{_pct(r['params_after'], r['params_before'])} | "
            f"{_pct(r['flops_after'], r['flops_before'])} | {acc} | "
            f"{r['seconds']:.1f} |"
        )
        removed = {p: b - a for p, b, a in r["groups"]}
        per_layer = ", ".join(
            f"{n} {removed.get(n, 0)}/{d}" for n, d in r["dead_on_data"].items()
        )
        forced_text = (
            "; forced: " + ", ".join(f"{k} {v}" for k, v in forced.items())
            if forced
            else ""
        )
        extra = sorted(set(removed) - set(r["dead_on_data"]))
        extra_text = (
            "; also removed: " + ", ".join(f"{p} {removed[p]}" for p in extra)
            if extra
            else ""
        )
        details.append(
            f"- {r['model']}, {r['criterion']}: removed / dead on data per layer: "
            f"{per_layer}{forced_text}{extra_text}"
        )
    return [*lines, "", *details, ""]


# -------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.prune_zoo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=PARTS,
        metavar="PART",
        help=f"run only this part (repeatable): {', '.join(PARTS)}",
    )
    parser.add_argument("--models", help="zoo: these architectures (comma-separated)")
    parser.add_argument(
        "--latency-models",
        default=",".join(LATENCY_MODELS),
        help="latency: these architectures (comma-separated)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=7,
        help="latency: interleaved timed rounds (default 7)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="zoo: seconds one model may take (default 1800)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE,
        help="directory for prune_zoo.md/json (default: benchmarks/)",
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # a zoo child
    args = parser.parse_args(argv)
    if args.measure:
        row = zoo_one(args.measure)
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(row, default=float))
        return 0
    parts = args.only or list(PARTS)
    command = " ".join(
        [
            "python -m benchmarks.prune_zoo",
            *(argv if argv is not None else sys.argv[1:]),
        ]
    )
    json_path, md_path = args.out / "prune_zoo.json", args.out / "prune_zoo.md"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    def write():
        json_path.write_text(json.dumps(results, indent=1, default=float) + "\n")
        md_path.write_text(render(results))

    for name in parts:
        log(f"[{name}] load average {os.getloadavg()}")
        entry = {"command": command, "machine": machine(), "date": None}
        entry["date"] = entry["machine"]["date"]
        start = time.perf_counter()

        def save(data, entry=entry, start=start, name=name):
            entry.update(data=data, seconds=time.perf_counter() - start,
                         load_after=os.getloadavg())  # fmt: skip
            results[name] = entry
            write()

        if name == "zoo":
            from benchmarks.zoo import architectures  # imports Keras

            models = (
                [m.strip() for m in args.models.split(",")]
                if args.models
                else architectures()
            )
            data = zoo(models, args.timeout, log, save)
        elif name == "latency":
            models = [m.strip() for m in args.latency_models.split(",")]
            data = latency(models, args.rounds, log)
        else:
            data = dead(log)
        save(data)
        log(f"[{name}] {entry['seconds']:.0f} s, load average {entry['load_after']}")
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
