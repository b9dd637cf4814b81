"""Models, weights, data and the output comparison shared by the three scripts.

Runs under tf.keras 2.15 (the keras-surgeon venv) and under Keras 3 (the
project venv) alike: every builder takes the `keras` module to use. The same
case built in either gets the same weights, since weights are drawn per
layer name from a seeded generator.

Every layer model the edits touch has one "block": `fc1` (Dense, or Conv2D in
the conv kinds) -> `bn1` (BatchNormalization, an identity up to rounding:
gamma = sqrt(var + eps), beta = moving mean) -> `act1` (Activation('relu'))
-> `drop1` (Dropout) -> `fc2`. `build(keras, kind, edit)` builds a kind with
the block edited by hand: that is the expected result of each edit, built
from scratch with the same weights.
"""

from __future__ import annotations

import platform
import zlib

import numpy as np

SEED = 1234
WIDTH = 16
BN_EPS = 1e-3  # Keras' default
N = 64  # samples in the fixed batch

KINDS = [
    "sequential",
    "functional",
    "conv_sequential",
    "nested",
    "shared",
    "multi_io",
    "residual",
]
CHANNEL_KINDS = [
    "conv_flatten_dense_sequential",
    "conv_flatten_dense_functional",
    "conv_residual_add",
    "depthwise",
    "separable",
]
DEAD = [0, 2]  # channels zeroed (dead), then deleted by delete_channels


def new_identity_dense(keras, conv=False):
    """A fresh Dense that is an exact identity (identity kernel, zero bias)."""
    return keras.layers.Dense(
        WIDTH, kernel_initializer="identity", bias_initializer="zeros", name="ins"
    )


def new_default_bn(keras, conv=False):
    """A fresh BatchNormalization with Keras' default (untrained) state."""
    return keras.layers.BatchNormalization(epsilon=BN_EPS, name="ins_bn")


def new_relu(keras, conv=False):
    return keras.layers.ReLU(name="relu1")


def new_fc1_tanh(keras, conv=False):
    """fc1 again, same type, size and name, with tanh instead of relu."""
    if conv:
        return keras.layers.Conv2D(
            WIDTH, 3, padding="same", activation="tanh", name="fc1"
        )
    return keras.layers.Dense(WIDTH, activation="tanh", name="fc1")


NEW_NAMES = ("ins", "ins_bn", "relu1")  # new layers keep their own init

# The layer edits: each done by each tool on every kind in `kinds` (default
# KINDS), and by hand (`build(keras, kind, edit)`) for the expected result.
LAYER_CASES = [
    {"id": "delete_dropout", "edit": ("delete", "drop1")},
    {"id": "delete_identity_bn", "edit": ("delete", "bn1")},
    {
        "id": "insert_identity_dense",
        "edit": ("insert_after", "fc1", new_identity_dense),
    },
    {"id": "insert_default_bn", "edit": ("insert_after", "fc1", new_default_bn)},
    {"id": "replace_activation_relu", "edit": ("replace", "act1", new_relu)},
    {"id": "replace_fc1_tanh", "edit": ("replace", "fc1", new_fc1_tanh)},
    {
        "id": "several_edits",
        "edit": (
            "many",
            [
                ("delete", "drop1"),
                ("replace", "act1", new_relu),
                ("insert_after", "fc1", new_identity_dense),
            ],
        ),
    },
    {
        "id": "delete_one_call_of_shared_bn",
        "edit": ("delete", "bn1", 0),
        "kinds": ["shared"],
    },
]

BLOCK_ORDER = ["fc1", "bn1", "act1", "drop1"]


def layer_after(name):
    """The block layer right after `name` (kerassurgeon inserts *before* a layer)."""
    return BLOCK_ORDER[BLOCK_ORDER.index(name) + 1]


def structure(model):
    """(name, class) of every non-input layer, nested models opened."""
    return [
        (layer.name, type(layer).__name__)
        for layer in flat_layers(model)
        if type(layer).__name__ != "InputLayer"
    ]


def block(keras, conv=False, fc2_units=8, edit=None, call=None):
    """The block's layers, in order, with `edit` applied.

    `edit` is None or a tuple: ("delete", name), ("insert_after", name,
    factory), ("replace", name, factory), or ("many", [edits]). An edit with
    a call index (`("delete", "bn1", 0)` as `edit[2]` for delete) applies only
    when building that call (`call`) of a shared block.
    """
    L = keras.layers
    if conv:
        fc1 = L.Conv2D(WIDTH, 3, padding="same", activation="relu", name="fc1")
    else:
        fc1 = L.Dense(WIDTH, activation="relu", name="fc1")
    layers = [
        fc1,
        L.BatchNormalization(epsilon=BN_EPS, name="bn1"),
        L.Activation("relu", name="act1"),
        L.Dropout(0.5, name="drop1"),
    ]
    if conv:
        layers.append(L.Flatten(name="flat"))
    layers.append(L.Dense(fc2_units, name="fc2"))
    return apply_edit(keras, conv, layers, edit, call)


def apply_edit(keras, conv, layers, edit, call=None):
    if edit is None:
        return layers
    if edit[0] == "many":
        for e in edit[1]:
            layers = apply_edit(keras, conv, layers, e, call)
        return layers
    names = [layer.name for layer in layers]
    op, name = edit[0], edit[1]
    i = names.index(name)
    if op == "delete":
        if len(edit) > 2 and edit[2] != call:
            return layers
        return layers[:i] + layers[i + 1 :]
    if op == "insert_after":
        return layers[: i + 1] + [edit[2](keras, conv)] + layers[i + 1 :]
    if op == "replace":
        return layers[:i] + [edit[2](keras, conv)] + layers[i + 1 :]
    raise ValueError(edit)


def chain(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def build(keras, kind, edit=None):
    """One of `KINDS`, with the block edited by hand (`edit`, see `block`)."""
    L = keras.layers
    if kind == "sequential":
        blk = block(keras, edit=edit)
        return keras.Sequential([keras.Input((WIDTH,)), *blk], name="seq")
    if kind == "conv_sequential":
        blk = block(keras, conv=True, edit=edit)
        return keras.Sequential([keras.Input((8, 8, 3)), *blk], name="convseq")
    if kind == "functional":
        x = keras.Input((WIDTH,), name="x")
        y = chain(block(keras, edit=edit), x)
        return keras.Model(x, y, name="func")
    if kind == "nested":
        xi = keras.Input((WIDTH,), name="inner_x")
        yi = chain(block(keras, fc2_units=WIDTH, edit=edit), xi)
        inner = keras.Model(xi, yi, name="inner")
        x = keras.Input((WIDTH,), name="x")
        h = L.Dense(WIDTH, name="pre")(x)
        y = L.Dense(4, name="head")(inner(h))
        return keras.Model(x, y, name="outer")
    if kind == "shared":
        # Every block layer is called twice, once per branch (calls 0 and 1).
        x = keras.Input((WIDTH,), name="x")
        a = L.Dense(WIDTH, name="pre_a")(x)
        b = L.Dense(WIDTH, name="pre_b")(x)
        full = block(keras, edit=edit)
        by_name = {layer.name: layer for layer in full}
        outs = []
        for call, h in enumerate([a, b]):
            names = [layer.name for layer in block(keras, edit=edit, call=call)]
            outs.append(chain([by_name[n] for n in names if n in by_name], h))
        y = L.Add(name="merge")(outs)
        return keras.Model(x, y, name="shared")
    if kind == "multi_io":
        xa = keras.Input((WIDTH,), name="in_a")
        xb = keras.Input((12,), name="in_b")
        blk = block(keras, edit=edit)
        h = chain(blk[:-1], xa)
        out1 = blk[-1](h)
        g = L.Dense(8, name="side")(xb)
        out2 = L.Dense(3, name="out2")(L.Concatenate(name="cat")([h, g]))
        return keras.Model([xa, xb], [out1, out2], name="multi_io")
    if kind == "residual":
        x = keras.Input((WIDTH,), name="x")
        h = L.Dense(WIDTH, name="pre")(x)
        r = chain(block(keras, fc2_units=WIDTH, edit=edit), h)
        y = L.Add(name="add")([h, r])
        y = L.Dense(4, name="head")(y)
        return keras.Model(x, y, name="residual")
    raise ValueError(kind)


def build_channels(keras, kind):
    """A conv model for delete_channels; returns (model, name of the layer to prune)."""
    L = keras.layers
    if kind == "conv_flatten_dense_sequential":
        m = keras.Sequential(
            [
                keras.Input((8, 8, 3)),
                L.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
                L.Flatten(name="flat"),
                L.Dense(4, name="head"),
            ],
            name="cfd_seq",
        )
        return m, "conv1"
    x = keras.Input((8, 8, 3), name="x")
    if kind == "conv_flatten_dense_functional":
        h = L.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
        y = L.Dense(4, name="head")(L.Flatten(name="flat")(h))
        return keras.Model(x, y, name="cfd_func"), "conv1"
    stem = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(x)
    if kind == "conv_residual_add":
        c = L.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(stem)
        h = L.Add(name="add")([stem, c])
        y = L.Dense(4, name="head")(L.Flatten(name="flat")(h))
        return keras.Model(x, y, name="conv_res"), "conv1"
    if kind == "depthwise":
        d = L.DepthwiseConv2D(3, padding="same", name="dw")(stem)
        p = L.Conv2D(6, 1, name="pw")(d)
        y = L.Dense(4, name="head")(L.Flatten(name="flat")(p))
        return keras.Model(x, y, name="dw"), "dw"
    if kind == "separable":
        s = L.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep")(stem)
        y = L.Dense(4, name="head")(L.Flatten(name="flat")(s))
        return keras.Model(x, y, name="sep"), "sep"
    raise ValueError(kind)


def flat_layers(model):
    """Every non-model layer of `model`, nested models opened, once each."""
    out, seen = [], set()

    def walk(m):
        for layer in m.layers:
            if hasattr(layer, "layers") and layer.layers:
                walk(layer)
            elif id(layer) not in seen:
                seen.add(id(layer))
                out.append(layer)

    walk(model)
    return out


def layer_rng(name):
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


def pretrained_arrays(layer):
    """Seeded 'pretrained-like' weights for one layer (by its name and type)."""
    rng = layer_rng(layer.name)
    cls = type(layer).__name__
    shapes = [tuple(w.shape) for w in layer.get_weights()]
    if not shapes:
        return []
    if cls == "BatchNormalization":
        (c,) = shapes[0]
        var = rng.uniform(0.3, 3.0, c)
        mean = rng.normal(0.0, 0.5, c)
        if layer.name == "bn1":  # identity up to rounding
            gamma = np.sqrt(var + BN_EPS)
            beta = mean
        else:
            gamma = rng.uniform(0.5, 1.5, c)
            beta = rng.normal(0.0, 0.3, c)
        return [np.asarray(a, "float32") for a in (gamma, beta, mean, var)]
    arrays = []
    for s in shapes:
        if len(s) == 1:  # bias
            arrays.append(rng.normal(0.0, 0.1, s))
        else:
            fan_in = int(np.prod(s[:-1])) if len(s) > 2 else s[0]
            if cls == "DepthwiseConv2D":
                fan_in = s[0] * s[1]
            arrays.append(rng.normal(0.0, 1.0 / np.sqrt(fan_in), s))
    return [a.astype("float32") for a in arrays]


def kill_channels(layer, arrays, channels):
    """Zero the kernel and bias of `channels` so they output exactly 0."""
    cls = type(layer).__name__
    if cls == "DepthwiseConv2D":
        arrays[0][:, :, channels, :] = 0
    elif cls == "SeparableConv2D":
        arrays[1][..., channels] = 0  # pointwise kernel
    else:
        arrays[0][..., channels] = 0
    arrays[-1][channels] = 0
    return arrays


def set_pretrained(model, skip=(), dead=None):
    """Give every layer seeded weights; `dead`: {layer name: channels to zero}."""
    for layer in flat_layers(model):
        if layer.name in skip or not layer.get_weights():
            continue
        arrays = pretrained_arrays(layer)
        if dead and layer.name in dead:
            arrays = kill_channels(layer, arrays, dead[layer.name])
        layer.set_weights(arrays)
    return model


def data(model):
    """The fixed seeded batch for `model`'s inputs (a list if several)."""
    rng = np.random.default_rng(SEED)
    xs = [
        rng.normal(0.0, 1.0, (N, *tuple(t.shape)[1:])).astype("float32")
        for t in model.inputs
    ]
    return xs[0] if len(xs) == 1 else xs


def predict(model, x):
    """Compiled inference outputs (model.predict), as a list of arrays."""
    out = model.predict(x, batch_size=N, verbose=0)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def compare(a, b):
    """{"identical", "max_abs_diff"} between two lists of outputs (or a reason)."""
    if len(a) != len(b) or any(p.shape != q.shape for p, q in zip(a, b, strict=True)):
        return {
            "identical": False,
            "max_abs_diff": None,
            "shapes": [[list(p.shape) for p in a], [list(q.shape) for q in b]],
        }
    same = all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    diff = max(
        float(np.max(np.abs(p.astype("float64") - q)))
        for p, q in zip(a, b, strict=True)
    )
    return {"identical": bool(same), "max_abs_diff": diff}


def one_line(exc):
    """An exception as one short line: its type and message, whitespace collapsed."""
    msg = " ".join(str(exc).split())
    if len(msg) > 240:
        msg = msg[:237] + "..."
    return f"{type(exc).__name__}: {msg}"


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "python": platform.python_version()}


def run_layer_case(keras, kind, case, apply, extra=None):
    """One edit by one tool on one kind: did it run, and what it did to the outputs.

    `apply(model, kind, edit)` returns the edited model. The record compares
    its compiled outputs with the original's (`vs_original`) and with the
    edit built by hand from scratch with the same weights (`vs_expected`);
    `edit_effect` is what the edit itself does (expected vs original).
    """
    keras.backend.clear_session()
    keras.utils.set_random_seed(SEED)  # fresh layers' initial weights, reproducibly
    model = set_pretrained(build(keras, kind))
    x = data(model)
    before = predict(model, x)
    before_structure = structure(model)
    expected = set_pretrained(build(keras, kind, case["edit"]), skip=NEW_NAMES)
    want = predict(expected, x)
    rec = {
        "case": case["id"],
        "kind": kind,
        "edit_effect": compare(before, want),
    }
    try:
        new = apply(model, kind, case["edit"])
    except Exception as exc:  # the error is the measurement
        rec.update(ran=False, error=one_line(exc))
        return rec
    rec.update(ran=True, error=None, result_class=type(new).__name__)
    rec["structure_matches_expected"] = sorted(structure(new)) == sorted(
        structure(expected)
    )
    if not rec["structure_matches_expected"]:
        rec["structure"] = structure(new)
    try:
        got = predict(new, x)
    except Exception as exc:
        rec["predict_error"] = one_line(exc)
        return rec
    rec["vs_original"] = compare(before, got)
    rec["vs_expected"] = compare(want, got)
    if case["edit"][0] == "delete" and len(case["edit"]) > 2:  # one call: which?
        other = ("delete", case["edit"][1], 1 - case["edit"][2])
        expected = set_pretrained(build(keras, kind, other), skip=NEW_NAMES)
        rec["vs_expected_other_call"] = compare(predict(expected, x), got)
    if extra is not None:  # tool-specific measurements of (original, result)
        rec.update(extra(model, new, x))
    rec["input_model_unchanged"] = bool(
        compare(before, predict(model, x))["identical"]
        and structure(model) == before_structure
    )
    return rec


def run_layer_cases(keras, apply, only=None, extra=None):
    out = []
    for case in LAYER_CASES:
        if only and case["id"] not in only:
            continue
        for kind in case.get("kinds", KINDS):
            rec = run_layer_case(keras, kind, case, apply, extra)
            print(summary(rec), flush=True)
            out.append(rec)
    return out


def isolation(keras, apply, case_id="delete_dropout", kind="functional"):
    """Does the result share weight variables with the input model?"""
    keras.backend.clear_session()
    case = next(c for c in LAYER_CASES if c["id"] == case_id)
    model = set_pretrained(build(keras, kind))
    x = data(model)
    before = predict(model, x)
    try:
        new = apply(model, kind, case["edit"])
    except Exception as exc:
        return {"case": case_id, "kind": kind, "ran": False, "error": one_line(exc)}
    ids = {id(v) for v in model.weights}
    shared_vars = sum(id(v) in ids for v in new.weights)
    layer = new.get_layer("fc2")
    w = layer.get_weights()
    layer.set_weights([w[0] + 1.0, *w[1:]])
    after = predict(model, x)
    return {
        "case": case_id,
        "kind": kind,
        "ran": True,
        "variables_shared_with_input": int(shared_vars),
        "variables_in_result": len(new.weights),
        "mutating_result_changes_input": not compare(before, after)["identical"],
    }


def summary(rec):
    """One line per record, for the console."""
    head = f"{rec['case']:30s} {rec['kind']:16s}"
    if not rec.get("ran"):
        return f"{head} ERROR {rec.get('error')}"
    if "predict_error" in rec:
        return f"{head} predict failed: {rec['predict_error']}"
    o, e = rec["vs_original"], rec["vs_expected"]
    return (
        f"{head} orig: {fmt(o)}  expected: {fmt(e)}  "
        f"struct_ok={rec['structure_matches_expected']} "
        f"input_unchanged={rec['input_model_unchanged']}"
    )


def fmt(c):
    if c.get("max_abs_diff") is None:
        return "shape mismatch"
    return "bit-identical" if c["identical"] else f"max abs {c['max_abs_diff']:.2g}"
