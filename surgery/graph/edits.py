"""The edits `surgery.graph.rewrite` applies to a model graph, and their targets.

Each edit names a layer by its path: `"conv1"`, or `"resnet50/conv1_bn"`
inside a nested model. A layer called more than once (a shared layer) is
edited at every call, or at one call with `call=k`: its k-th call in that
graph, counted from 0 in the order the calls were made. (`"name:k"` in
`after=`/`before=` picks an output, not a call, hence a separate field.)

`resolve` checks a list of edits against a model before anything is built,
so a wrong name or an impossible edit is one clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras

from surgery.errors import SurgeryError
from surgery.graph.spots import Spot, is_graph_model, locate, nodes_in, walk_layers

# layers to call in order, or a function of the tensor they will get that
# makes them (called once, at the first call site)
Layers = keras.layers.Layer | Sequence[keras.layers.Layer] | Callable[..., Any]


@dataclass(frozen=True, eq=False)
class InsertAfter:
    """Call `layers` in order on output `output` of `layer`.

    Every consumer of that output, and the model output it may be, gets the
    result. At every call of a shared layer the same inserted layers are
    called (they are shared in turn), unless `call` picks one.
    """

    layer: str
    layers: Layers
    call: int | None = None
    output: int = 0


@dataclass(frozen=True, eq=False)
class InsertBefore:
    """Call `layers` in order on input `input` of `layer`, for that layer only.

    Other consumers of the same tensor keep the tensor as it was.
    """

    layer: str
    layers: Layers
    call: int | None = None
    input: int = 0


@dataclass(frozen=True, eq=False)
class Remove:
    """Drop the calls of `layer`; their consumers get the call's input instead.

    Only a call with one input and one output of the same shape can go (a
    dtype it cast to is lost: its consumers get the input's dtype).
    """

    layer: str
    call: int | None = None


@dataclass(frozen=True, eq=False)
class Replace:
    """Call `by` where `layer` was called, with the same arguments.

    `by` keeps its own weights (built at its first call if it is not built
    yet) unless a `SetWeights` on the same path gives it others. It must
    give the outputs the old call gave, shape for shape, unless `reshapes`:
    then every layer after it is rebuilt for the new shape (its weights then
    have to fit, or come from a `SetWeights`), as when channels are pruned.
    """

    layer: str
    by: keras.layers.Layer
    call: int | None = None
    reshapes: bool = False


@dataclass(frozen=True, eq=False)
class SetWeights:
    """The new model's copy of `layer` (or its replacement) holds `weights`.

    `weights` is a list of arrays in `layer.get_weights()` order.
    """

    layer: str
    weights: Sequence[Any]


def insert_at(spot: Spot, layers: Layers) -> InsertAfter | InsertBefore:
    """The edit that inserts `layers` at a spot (`after=`/`before=` a layer)."""
    path = "/".join((*spot.scope, spot.layer.name))
    if spot.side == "after":
        return InsertAfter(path, layers, output=spot.index or 0)
    return InsertBefore(path, layers)


Edit = InsertAfter | InsertBefore | Remove | Replace | SetWeights
KINDS = (InsertAfter, InsertBefore, Remove, Replace, SetWeights)


@dataclass(frozen=True, eq=False)
class Target:
    """An edit and where it applies: the graph's scope and the layer object."""

    edit: Edit
    scope: tuple[str, ...]
    layer: Any
    nodes: tuple  # the calls it applies to, in call order


def call_order(graph, layer) -> list:
    """The calls of `layer` in `graph`, in the order they were made."""
    own = {id(node) for node in nodes_in(graph)}
    return [node for node in layer._inbound_nodes if id(node) in own]


def resolve(model, edits: Sequence[Edit]) -> list[Target]:
    """Each edit's target in `model`, or one `SurgeryError` naming the bad edit."""
    originals = {id(op) for _, op in walk_layers(model)}
    variables = {id(v) for v in model.weights}
    targets = [_target(model, edit, originals, variables) for edit in edits]
    _check_conflicts(targets)
    return targets


def _target(model, edit, originals, variables) -> Target:
    if not isinstance(edit, KINDS):
        raise SurgeryError(
            f"{edit!r} is not an edit; use InsertAfter, InsertBefore, Remove, "
            "Replace or SetWeights from surgery.graph.edits"
        )
    if not isinstance(edit.layer, str) or not edit.layer:
        raise SurgeryError(
            f"{type(edit).__name__}: layer must be a path, got {edit.layer!r}"
        )
    scope, graph, layer = locate(model, edit.layer)
    if isinstance(layer, keras.layers.InputLayer):
        raise SurgeryError(
            f"{type(edit).__name__} '{edit.layer}': an InputLayer cannot be "
            "edited; edit the layer that consumes it"
        )
    calls = call_order(graph, layer)
    call = getattr(edit, "call", None)
    if call is not None and not (isinstance(call, int) and 0 <= call < len(calls)):
        raise SurgeryError(
            f"{type(edit).__name__} '{edit.layer}': call={call!r}, but the layer "
            f"is called {len(calls)} time(s); pick 0 ... {len(calls) - 1} or None"
        )
    nodes = tuple(calls if call is None else [calls[call]])
    _check_kind(edit, layer, nodes, originals, variables)
    return Target(edit, scope, layer, nodes)


def _check_kind(edit, layer, nodes, originals, variables) -> None:
    where = f"{type(edit).__name__} '{edit.layer}'"
    if isinstance(edit, InsertAfter):
        _check_index(where, "output", edit.output, len(nodes[0].outputs))
    elif isinstance(edit, InsertBefore):
        _check_index(where, "input", edit.input, len(nodes[0].input_tensors))
    elif isinstance(edit, Remove):
        for node in nodes:
            _check_removable(where, node)
    elif isinstance(edit, SetWeights) and is_graph_model(layer):
        raise SurgeryError(f"{where}: a nested model has no weights of its own")
    new = [edit.by] if isinstance(edit, Replace) else _given_layers(edit)
    for made in new:
        if not isinstance(made, keras.layers.Layer):
            raise SurgeryError(f"{where}: {made!r} is not a Keras layer")
        shared = any(id(v) in variables for v in made.weights)
        if id(made) in originals or shared:
            raise SurgeryError(
                f"{where}: '{made.name}' belongs to the input model; pass a new "
                "layer (the input model is never modified or shared)"
            )


def _given_layers(edit) -> list:
    """The layers an insert names up front (none for a factory or other edits)."""
    layers = getattr(edit, "layers", None)
    if isinstance(layers, keras.layers.Layer):
        return [layers]
    if isinstance(layers, Sequence):
        return list(layers)
    return []


def _check_index(where, kind, index, count) -> None:
    if not (isinstance(index, int) and 0 <= index < count):
        raise SurgeryError(
            f"{where}: {kind}={index!r}, but the layer has {count} {kind}(s)"
        )


def _check_removable(where, node) -> None:
    ins, outs = node.input_tensors, node.outputs
    if len(ins) != 1 or len(outs) != 1:
        raise SurgeryError(
            f"{where}: only a layer with one input and one output can be removed "
            f"(this call has {len(ins)} and {len(outs)})"
        )
    if tuple(ins[0].shape) != tuple(outs[0].shape):
        raise SurgeryError(
            f"{where}: its output shape {outs[0].shape} differs from its input "
            f"shape {ins[0].shape}; only a layer that keeps the shape can be removed"
        )


def _check_conflicts(targets) -> None:
    """Refuse two edits that would both decide what one call computes."""
    seen: dict[tuple, str] = {}
    for target in targets:
        edit = target.edit
        if not isinstance(edit, (Remove, Replace, SetWeights)):
            continue
        kind = "weights" if isinstance(edit, SetWeights) else "call"
        nodes = [None] if kind == "weights" else target.nodes
        for node in nodes:
            key = (kind, target.scope, id(target.layer), id(node))
            if key in seen:
                raise SurgeryError(
                    f"{type(edit).__name__} '{edit.layer}' clashes with "
                    f"{seen[key]} on the same layer; keep one of them"
                )
            seen[key] = f"{type(edit).__name__} '{edit.layer}'"
