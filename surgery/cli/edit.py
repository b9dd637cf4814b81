"""`surgery edit`: delete, replace, insert and deepen layers, in one rebuild.

Every `--delete`, `--replace`, `--insert-after`, `--insert-before` and
`--deepen` of a command line goes into one call of `surgery.edit`; the new
layers are `surgery.cli.layer_spec` specs (`fc1=Dense:units=64`). With
`--data` (or for the embedded default model, on its images) the new model's
outputs are compared with the original's.
"""

from __future__ import annotations

import argparse

from surgery.cli.common import (
    add_data_args,
    add_model_args,
    add_output_args,
    compare_on_data,
    echo,
    load_model,
)
from surgery.cli.outputs import check_output, save_model
from surgery.errors import SurgeryError, UsageError

# flag -> (the API's keyword, what the flag's value is)
EDITS = {
    "--delete": ("delete", "NAME"),
    "--replace": ("replace", "NAME=SPEC"),
    "--insert-after": ("insert_after", "NAME=SPEC"),
    "--insert-before": ("insert_before", "NAME=SPEC"),
    "--deepen": ("deepen", "NAME"),
}
HELP = {
    "--delete": "remove layer NAME (one input, one output of the same shape)",
    "--replace": "put a new layer in NAME's place, e.g. fc1=Dense:units=64,"
    "activation=gelu; it takes NAME's weights (their shapes must match; see "
    "--no-copy-weights) and, unless the spec gives name=, its name",
    "--insert-after": "insert a new layer after NAME, e.g. fc1=LayerNormalization; "
    "given twice for one NAME, the layers go in that order",
    "--insert-before": "insert a new layer before NAME, e.g. fc2=Dropout:rate=0.2",
    "--deepen": "insert after Dense or convolution NAME an identity-initialized "
    "copy, NAME_deep (Net2DeeperNet; the outputs stay the same)",
}


class Edit(argparse.Action):
    """Appends `(flag, value)` to `args.edits`, in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        edits = getattr(namespace, "edits", None) or []
        namespace.edits = [*edits, (self.option_strings[0], values)]


def add_commands(sub) -> None:
    edit = sub.add_parser(
        "edit",
        help="delete, replace, insert or deepen layers",
        description="Layer specs: ReLU, Dense:units=64,activation=gelu, "
        "Conv2D:filters=8,kernel_size=(3,3),padding=same, or module:function "
        "returning a new layer. Each flag can be given several times; all "
        "edits are applied in one rebuild.",
    )
    add_model_args(edit)
    for flag, (_, metavar) in EDITS.items():
        edit.add_argument(
            flag, dest="edits", action=Edit, metavar=metavar, help=HELP[flag]
        )
    edit.add_argument(
        "--no-copy-weights",
        action="store_true",
        help="replacements keep their own initial weights instead of taking "
        "the replaced layers'",
    )
    add_data_args(edit)
    add_output_args(edit)
    edit.set_defaults(run=run_edit, edits=None)


def run_edit(args) -> dict:
    import surgery

    plan, done = edit_plan(args.edits)
    check_output(args)
    model = load_model(args)
    try:
        new = surgery.edit(model, **plan, copy_weights=not args.no_copy_weights)
    except SurgeryError as e:  # the API's words for an option are the CLI's flag
        text = str(e).replace("pass copy_weights=False", "pass --no-copy-weights")
        raise type(e)(text) from None
    lines = [line for line, _ in done]
    result = {"out": args.out, "edits": [record for _, record in done]}
    if args.data is not None or args.model is None:  # the default has its images
        fields, line = compare_on_data(args, model, new, "the original")
        result.update(fields)
        lines.append(line)
    save_model(new, args.out, force=args.force)
    echo(args, *lines, f"wrote {args.out}")
    return result


def edit_plan(edits) -> tuple[dict, list[tuple[str, dict]]]:
    """The keyword arguments of `surgery.edit` for the `(flag, value)` pairs,
    and for each edit its text line and JSON record.

    A spec builds a new layer each time it is given; the layers inserted at
    one NAME go in a list, in command-line order.
    """
    from surgery.cli.layer_spec import parse_layer, split_assignment

    if not edits:
        flags = ", ".join(EDITS)
        raise UsageError(f"nothing to edit: give at least one of {flags}")
    plan = {"delete": [], "deepen": [], "replace": {}}
    plan |= {"insert_after": {}, "insert_before": {}}
    done = []
    for flag, value in edits:
        key = EDITS[flag][0]
        if key in ("delete", "deepen"):
            name = value.strip()
            if not name or "=" in name:
                raise UsageError(f"{flag} {value!r}: give a layer name, e.g. fc1")
            _once(plan[key], name, flag)
            plan[key].append(name)
            verb = "deleted" if key == "delete" else "deepened"
            done.append((f"{verb} {name}", {"edit": key, "layer": name}))
            continue
        name, spec = split_assignment(value, flag)
        record = {"edit": key, "layer": name, "spec": spec}
        if key == "replace":
            _once(plan[key], name, flag)
            plan[key][name] = parse_layer(spec, name=layer_name(name))
            done.append((f"replaced {name} with {spec}", record))
            continue
        layers = parse_layer(spec, allow_list=True)
        plan[key].setdefault(name, []).extend(
            layers if isinstance(layers, list) else [layers]
        )
        where = "after" if key == "insert_after" else "before"
        done.append((f"inserted {spec} {where} {name}", record))
    for key in ("insert_after", "insert_before"):
        plan[key] = {n: v[0] if len(v) == 1 else v for n, v in plan[key].items()}
    return {key: value for key, value in plan.items() if value}, done


def layer_name(path: str) -> str:
    """The name a replacement of `path` takes: `outer/fc1:0` -> `fc1`."""
    return path.rpartition("/")[2].partition(":")[0]


def _once(seen, name, flag):
    if name in seen:
        raise UsageError(f"{flag} {name} is given twice; give each layer once")
