"""The comparison table, in Markdown, from the three JSON files here.

    python benchmarks/surgeon_compare/render.py > /tmp/table.md

Each cell groups the seven model kinds by outcome. "bit-identical" is
`np.array_equal` of the compiled (`predict`) outputs with the original
model's; "max abs" is the largest absolute difference there. Where an edit
changes the outputs by design (deleting a BN that is an identity only up to
rounding, inserting a default BN, a new activation), the cell also says
whether the result equals the same edit built by hand with the same weights
("= expected").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent

KIND_NAMES = {
    "sequential": "Seq",
    "functional": "Func",
    "conv_sequential": "Conv-Seq",
    "nested": "Nested",
    "shared": "Shared",
    "multi_io": "Multi-IO",
    "residual": "Residual",
}
N_KINDS = len(KIND_NAMES)

ERRORS = {  # long messages, shortened for the table (the JSON has them whole)
    "Keras symbolic inputs/outputs do not implement `__len__`": "TypeError: KerasTensor has no `len()`",
    "`call_function` argument is not supported with Sequential": "ValueError: `call_function` not supported with Sequential models",
}


def load(name):
    return json.loads((HERE / name).read_text())


def short_error(msg):
    for key, short in ERRORS.items():
        if key in msg:
            return short
    msg = msg.split(" Existing layers are")[0]  # get_layer's list of names
    dims = re.search(r"Dimensions must be equal, but are \d+ and \d+", msg)
    if "Exception encountered when calling layer" in msg and dims:
        layer = re.search(r'calling layer "(\w+)"', msg)
        return f"ValueError in layer `{layer.group(1)}`: {dims.group(0)}"
    return msg if len(msg) <= 90 else msg[:87] + "..."


def num(x):
    return f"{x:.2g}".replace("e-0", "e-")


def span(values):
    lo, hi = min(values), max(values)
    return num(lo) if num(lo) == num(hi) else f"{num(lo)}–{num(hi)}"


def outcome(rec):
    """(category, max abs diff or None) of one record."""
    if not rec.get("ran"):
        return f"refused: {short_error(rec['error'])}", None
    if "predict_error" in rec:
        return f"result fails in predict: {short_error(rec['predict_error'])}", None
    if rec.get("structure_matches_expected") is False:
        return "edit not applied (layers as before)", None
    o, e = rec["vs_original"], rec.get("vs_expected", {"identical": True})
    if not e["identical"]:
        if rec.get("vs_expected_other_call", {}).get("identical"):
            return "deleted the other call (1, not 0)", None
        if rec["case"].startswith("replace_"):
            return "new layer keeps its fresh weights: max abs {} from expected", e[
                "max_abs_diff"
            ]
        return "max abs {} from expected", e["max_abs_diff"]
    if o["identical"]:
        return "bit-identical", None
    return "max abs {} (= expected)", o["max_abs_diff"]


def cell(records):
    """The records of one case (one per kind) as one table cell."""
    groups: dict[str, list] = {}
    for rec in records:
        cat, value = outcome(rec)
        groups.setdefault(cat, []).append((rec["kind"], value))
    parts = []
    for cat, items in groups.items():
        values = [v for _, v in items if v is not None]
        text = cat.format(span(values)) if values else cat
        kinds = [KIND_NAMES[k] for k, _ in items]
        if len(records) > 1:
            who = "all" if len(kinds) == len(records) else ", ".join(kinds)
            text = f"{who}: {text}"
        parts.append(text)
    return "; ".join(parts)


def by_case(records, case, kind=None):
    return [r for r in records if r["case"] == case and kind in (None, r["kind"])]


ROWS = [
    ("delete_dropout", "Delete a Dropout"),
    ("delete_identity_bn", "Delete a BN that is an identity up to rounding"),
    ("insert_identity_dense", "Insert an identity Dense after `fc1`"),
    ("insert_default_bn", "Insert a fresh default BN after `fc1`"),
    ("replace_activation_relu", "Replace `Activation('relu')` with `ReLU()`"),
    ("replace_fc1_tanh", "Replace Dense `fc1` (relu) with a Dense (tanh)"),
    ("several_edits", "Three edits at once (delete, replace, insert)"),
    ("delete_one_call_of_shared_bn", "Delete one call (0) of a shared BN"),
]


def isolation_cell(recs):
    rec = recs[0]
    if not rec.get("ran"):
        return f"refused: {short_error(rec['error'])}"
    shared = rec["variables_shared_with_input"]
    total = rec["variables_in_result"]
    if shared:
        return (
            f"shares {shared}/{total} variables: changing the result's weights "
            "changes the input's outputs"
        )
    return "shares no variables (changing the result's weights leaves the input alone)"


def unchanged_cell(records):
    ran = [r for r in records if r.get("ran") and "input_model_unchanged" in r]
    if not ran:
        return "—"
    bad = [r for r in ran if not r["input_model_unchanged"]]
    return f"unchanged in all {len(ran)} runs" if not bad else f"changed in {len(bad)}"


def channel_cell(records, kind, layer=None):
    for rec in records:
        if rec["kind"] == kind and (layer is None or rec["layer"] == layer):
            if not rec.get("ran"):
                return f"refused: {short_error(rec['error'])}"
            if "predict_error" in rec:
                return f"fails in predict: {short_error(rec['predict_error'])}"
            o = rec["vs_original"]
            p = rec["params"]
            effect = (
                "bit-identical"
                if o["identical"]
                else f"max abs {num(o['max_abs_diff'])}"
            )
            return f"{effect} ({p[0]} → {p[1]} params)"
    return "—"


def result_class_cell(records):
    seq = [r for r in records if r["kind"] == "sequential" and r.get("ran")]
    return ", ".join(sorted({r["result_class"] for r in seq})) or "—"


def main():
    ks, cm, su = (
        load("kerassurgeon.json"),
        load("clone_model.json"),
        load("surgery.json"),
    )
    ksp, ksi = ks["patched"], ks["as_installed"]
    cmc, cmr = cm["clone_then_copy"], cm["reuse_layers"]
    head = [
        f"keras-surgeon {ks['versions']['kerassurgeon']} (tf.keras {ks['versions']['keras']}), patched¹",
        f"Keras {cm['versions']['keras']} `clone_model`²",
        "surgery",
    ]
    rows = [
        ("Capability / case", *head),
        ("---", "---", "---", "---"),
    ]
    n_ks = len(ksi["layer_cases"]) + len(ksi["channel_cases"])
    n_ks_fail = sum(not r.get("ran") for r in ksi["layer_cases"] + ksi["channel_cases"])
    rows.append(
        (
            f"Runs as installed (TF {ks['versions']['tensorflow']})",
            f"no: {n_ks_fail}/{n_ks} runs refused, all but nested with "
            "`TypeError: Keras symbolic inputs/outputs do not implement __len__`",
            "yes",
            "yes",
        )
    )
    for case, label in ROWS:
        rows.append(
            (
                label,
                cell(by_case(ksp["layer_cases"], case)),
                cell(by_case(cmc["layer_cases"], case)),
                cell(by_case(su["layer_cases"], case)),
            )
        )
    rows.append(
        (
            "Deepen (Net2DeeperNet identity layer after `fc1`)",
            "— (no such operation; insert an identity layer: row above)",
            "— (no such operation)",
            cell(su["deepen"]),
        )
    )
    rows.append(
        (
            "A Sequential model comes back as",
            result_class_cell(ksp["layer_cases"]),
            result_class_cell(cmc["layer_cases"]) + " (replace only)",
            result_class_cell(su["layer_cases"]),
        )
    )
    rows.append(
        (
            "Input model after the edit",
            unchanged_cell(ksp["layer_cases"]),
            unchanged_cell(cmc["layer_cases"] + cmr["layer_cases"]),
            unchanged_cell(su["layer_cases"]),
        )
    )
    rows.append(
        (
            "Result's weights vs the input's (Func, delete Dropout)",
            isolation_cell(ksp["isolation"]),
            "with the docstring's `clone_function=lambda l: l`: "
            + isolation_cell(cmr["isolation"])
            + "; cloned: "
            + isolation_cell(cmc["isolation"]),
            isolation_cell(su["isolation"]),
        )
    )
    plain = cm["plain_clone"]
    rows.append(
        (
            "Weights of the copy",
            "copied (`get_weights`/`set_weights`)",
            "`clone_model(model)`: fresh initial weights: max abs "
            + span([r["vs_original"]["max_abs_diff"] for r in plain])
            + " from the original",
            "copied (every unedited layer holds the original's values)",
        )
    )
    nr = cm["nested_not_recursive"]
    rows.append(
        (
            "Layer inside a nested model, named the tool's way",
            cell(by_case(ksp["layer_cases"], "delete_dropout", "nested")),
            "without `recursive=True`: " + cell(nr[:1]),
            "`'inner/drop1'`: "
            + cell(by_case(su["layer_cases"], "delete_dropout", "nested")),
        )
    )
    ch = ksp["channel_cases"]
    planned = "not yet: planned (issue 23)"
    for label, kind, layer in [
        (
            "Delete 2 dead channels: Conv2D → Flatten → Dense (Seq)",
            "conv_flatten_dense_sequential",
            None,
        ),
        ("… same, Functional", "conv_flatten_dense_functional", None),
        ("… of a Conv2D feeding a residual Add", "conv_residual_add", None),
        ("… of a DepthwiseConv2D", "depthwise", "dw"),
        ("… of the Conv2D feeding a DepthwiseConv2D", "depthwise", "stem"),
        ("… of a SeparableConv2D", "separable", "sep"),
        ("… of the Conv2D feeding a SeparableConv2D", "separable", "stem"),
    ]:
        rows.append(
            (label, channel_cell(ch, kind, layer), "— (no such operation)", planned)
        )
    for row in rows:
        print("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")


if __name__ == "__main__":
    main()
