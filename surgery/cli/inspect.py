"""`surgery inspect`: every layer, its shape, and whether BN can follow it;
with `--groups`, the channel groups that channel pruning removes together."""

from __future__ import annotations

from surgery.cli.common import add_model_args, echo, load_model
from surgery.errors import SurgeryError


def add_commands(sub) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="list layers with paths, output shapes, units and insertion points",
    )
    add_model_args(inspect)
    inspect.add_argument(
        "--groups",
        action="store_true",
        help="list the channel groups instead: the channels that channel "
        "pruning removes together (residual branches, BN, concatenations), "
        "how many can go or why none can, and every layer they touch",
    )
    inspect.set_defaults(run=run_inspect)


def run_inspect(args) -> dict:
    model = load_model(args)
    if args.groups:
        return _run_groups(args, model)
    rows = layer_rows(model)
    lines = [_format(rows), f"{sum(r['insertable'] for r in rows)} insertion points"]
    sensitive = [r for r in rows if r["fusion"]]
    if sensitive:
        lines.append(
            f"* {len(sensitive)} fusion-sensitive on this backend and machine: "
            "compiled inference may differ from the original there, since a BN "
            "changes how the compiler treats a neighbour. First: "
            f"{sensitive[0]['path']}: {sensitive[0]['fusion'][0]}"
        )
    echo(args, *lines)
    return {"model": model.name, "layers": rows}


def _run_groups(args, model) -> dict:
    from surgery.pruning.groups import channel_groups

    rows = [group_row(g) for g in channel_groups(model)]
    removable = sum(r["removable"] for r in rows)
    echo(
        args,
        *(_group_line(r) for r in rows),
        f"{len(rows)} channel groups, {removable} channels removable",
    )
    return {"model": model.name, "groups": rows}


def group_row(group) -> dict:
    """A `ChannelGroup` as plain values: producers, layers, size, how many
    channels can be removed, why none can (`fixed`) and a layer that mixes
    them (`mixed`), or None."""
    return {
        "producers": list(group.producers),
        "layers": list(group.layers),
        "size": group.size,
        "removable": int(group.removable.sum()),
        "fixed": group.fixed,
        "mixed": group.mixed,
    }


def _group_line(row) -> str:
    state = (
        f"fixed: {row['fixed']}" if row["fixed"] else f"{row['removable']} removable"
    )
    if row["mixed"]:
        state += f"; mixed by {row['mixed']}"
    return (
        f"{' + '.join(row['producers'])}: {row['size']} channels ({state}); "
        f"layers: {', '.join(row['layers'])}"
    )


def layer_rows(model) -> list[dict]:
    """One row per layer (nested ones by path) with its insertion verdict."""
    from surgery.graph.fusion import fusion_causes
    from surgery.graph.spots import find_spots, graph_of, is_graph_model, nodes_of

    rows = []

    def visit(graph, prefix):
        for op in graph.operations:
            path = prefix + op.name
            nodes = nodes_of(graph, op)
            shapes = [list(t.shape) for t in nodes[0].outputs] if nodes else []
            row = {"path": path, "type": type(op).__name__, "shapes": shapes}
            row["calls"] = len(nodes)
            try:
                spot = find_spots(model, after=[path])[0]
                units = nodes[0].outputs[spot.index or 0].shape[spot.axis]
                row.update(insertable=True, units=units, reason="")
                row["fusion"] = fusion_causes(model, spot)
            except SurgeryError as e:
                row.update(insertable=False, units=None, reason=str(e), fusion=[])
            rows.append(row)
            if is_graph_model(op):
                visit(graph_of(op), path + "/")

    visit(graph_of(model), "")
    return rows


def _format(rows) -> str:
    table = [("path", "type", "output shape", "units", "BN after?")]
    for r in rows:
        shape = ", ".join(_shape(s) for s in r["shapes"])
        verdict = "yes" if r["insertable"] else "no: " + _short(r["reason"])
        if r["fusion"]:
            verdict += " (fusion-sensitive*)"
        units = "" if r["units"] is None else str(r["units"])
        table.append((r["path"], r["type"], shape, units, verdict))
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    )


def _shape(shape) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def _short(reason: str) -> str:
    reason = reason.split("; ")[0]
    return reason if len(reason) <= 60 else reason[:57] + "..."
