"""Where a BatchNormalization goes: user names resolved to graph positions.

A spot is `after` a layer (on its output, every consumer rewired) or
`before` it (on its input, for that layer only). Layers in nested models are
addressed by path (`"vgg16/fc1"`), one output of a multi-output layer as
`"name:index"`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import keras

from surgery.errors import SurgeryError


@dataclass(frozen=True, eq=False)
class Spot:
    spec: str
    side: str
    scope: tuple[str, ...]
    layer: keras.layers.Layer
    index: int | None
    axis: int

    @property
    def key(self) -> str:
        """The name of this spot's statistics in `activation_stats` results."""
        return self.spec if self.side == "after" else f"{self.spec}:input"

    @property
    def bn_name(self) -> str:
        base = (
            self.layer.name if self.index is None else f"{self.layer.name}_{self.index}"
        )
        return f"{base}_bn" if self.side == "after" else f"{base}_pre_bn"


def graph_of(model) -> keras.Model:
    """The Functional graph behind a Functional or Sequential model."""
    if isinstance(model, keras.Sequential):
        if not model.built or getattr(model, "_functional", None) is None:
            raise SurgeryError(
                f"Sequential model '{model.name}' has no input shape; start it with "
                "keras.Input(shape=...) or call model.build(input_shape) first"
            )
        return model._functional
    if is_functional(model):
        return model
    raise SurgeryError(
        f"model '{model.name}' is a subclassed {type(model).__name__}: it has no "
        "graph to rewrite; trace it with surgery.functional(model) first (the "
        "command line does), or rebuild it as keras.Model(inputs, outputs)"
    )


def is_functional(model) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def is_graph_model(op) -> bool:
    return isinstance(op, keras.Sequential) or is_functional(op)


def nodes_in(graph) -> list:
    return [n for nodes in graph._nodes_by_depth.values() for n in nodes]


def calls_in_order(graph) -> list:
    """The graph's calls (its input nodes left out), each after those it reads."""
    return [
        node
        for depth in sorted(graph._nodes_by_depth, reverse=True)
        for node in graph._nodes_by_depth[depth]
        if not node.is_input
    ]


def nodes_of(graph, layer) -> list:
    """The calls of `layer` in this graph (not in other models it is part of)."""
    return [n for n in nodes_in(graph) if n.operation is layer]


def find_spots(model, after=None, before=None) -> list[Spot]:
    """Resolve the user's names to spots, or fail with one clear line."""
    after, before = _as_list(after), _as_list(before)
    if not after and not before:
        raise SurgeryError("no insertion points: pass after=[...] and/or before=[...]")
    spots, seen = [], set()
    for side, specs in (("after", after), ("before", before)):
        for spec in specs:
            spot = _resolve(model, spec, side)
            ident = (side, spot.scope, id(spot.layer), spot.index)
            if ident not in seen:
                seen.add(ident)
                spots.append(spot)
    _check_same_spot(model, spots)
    return spots


def _as_list(names):
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def locate(model, path: str, spec: str | None = None) -> tuple[tuple, object, object]:
    """`(scope, graph, layer)` of the layer at `path` ("vgg16/fc1"), or one error.

    `scope` names the nested models on the way, `graph` is the Functional
    graph that calls the layer. `spec` is what the user wrote, for messages.
    """
    spec = path if spec is None else spec
    *scope, leaf = path.split("/")
    graph = graph_of(model)
    for part in scope:
        inner = _lookup(model, graph, part, spec)
        if not is_graph_model(inner):
            kind = "subclassed model" if isinstance(inner, keras.Model) else "layer"
            raise SurgeryError(
                f"'{spec}': '{part}' is a {kind} ({type(inner).__name__}), not a "
                "nested Functional model; trace the outer model with "
                "surgery.functional(model) to reach inside it"
            )
        graph = graph_of(inner)
    return tuple(scope), graph, _lookup(model, graph, leaf, spec)


def _resolve(model, spec: str, side: str) -> Spot:
    name, index = split_index(spec)
    scope, graph, layer = locate(model, name, spec)
    if isinstance(layer, keras.layers.InputLayer):
        raise SurgeryError(
            f"'{spec}' is an InputLayer; to normalise a model input use "
            "before=['<the layer that consumes it>']"
        )
    nodes = nodes_of(graph, layer)
    if side == "after":
        outputs = len(nodes[0].outputs)
        if outputs > 1 and index is None:
            raise SurgeryError(
                f"layer '{spec}' has {outputs} outputs; pick one as "
                f"'{spec}:0' ... '{spec}:{outputs - 1}'"
            )
        if index is not None and not 0 <= index < outputs:
            raise SurgeryError(
                f"'{spec}': layer has {outputs} output(s), no index {index}"
            )
        axis = _after_axis(layer)
    else:
        if index is not None:
            raise SurgeryError(f"'{spec}': an output index makes no sense with before=")
        inputs = len(nodes[0].input_tensors)
        if inputs != 1:
            raise SurgeryError(
                f"before='{spec}': layer takes {inputs} inputs; use after= on the "
                "layers that feed it"
            )
        axis = _before_axis(layer, nodes[0].input_tensors[0])
    return Spot(spec, side, scope, layer, index, axis)


def split_index(spec: str) -> tuple[str, int | None]:
    """`"name:k"` as `("name", k)`, `"name"` as `("name", None)`."""
    if not isinstance(spec, str) or not spec:
        raise SurgeryError(f"layer names must be non-empty strings, got {spec!r}")
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit():
        return head, int(tail)
    return spec, None


def _lookup(model, graph, name, spec):
    for op in graph.operations:
        if op.name == name:
            if not isinstance(op, keras.layers.Layer):
                raise SurgeryError(
                    f"'{spec}' is a non-Layer operation ({type(op).__name__}); insert "
                    "before= the layer that consumes it, or make it a layer"
                )
            return op
    close = difflib.get_close_matches(spec, all_paths(model), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise SurgeryError(f"no layer '{spec}' in model '{model.name}'{hint}")


def all_paths(model) -> list[str]:
    """Every layer's path, nested models included (for hints and inspection)."""
    return [path for path, _ in walk_layers(model)]


CONV_LAYERS = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
)


def layer_paths(model, types) -> list[str]:
    """Paths of every layer of the given types, nested models included."""
    return [path for path, op in walk_layers(model) if isinstance(op, types)]


def walk_layers(model, prefix: str = ""):
    """`(path, operation)` for every operation, nested models' ones included."""
    for op in graph_of(model).operations:
        yield prefix + op.name, op
        if is_graph_model(op):
            yield from walk_layers(op, prefix + op.name + "/")


_LAST_AXIS_LAYERS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Embedding,
    keras.layers.RNN,
)


def _after_axis(layer) -> int:
    if getattr(layer, "data_format", None) == "channels_first":
        return 1
    if hasattr(layer, "data_format") or isinstance(layer, _LAST_AXIS_LAYERS):
        return -1
    node = layer._inbound_nodes[0] if layer._inbound_nodes else None
    for tensor in node.input_tensors if node else []:
        producer = tensor._keras_history.operation
        if producer is not None and not isinstance(producer, keras.layers.InputLayer):
            return _after_axis(producer)
    return -1


def _before_axis(layer, tensor) -> int:
    if getattr(layer, "data_format", None) == "channels_first":
        return 1
    if hasattr(layer, "data_format") or isinstance(layer, _LAST_AXIS_LAYERS):
        return -1
    producer = tensor._keras_history.operation
    if producer is None or isinstance(producer, keras.layers.InputLayer):
        return -1
    return _after_axis(producer)


def _check_same_spot(model, spots):
    afters = {
        (s.scope, id(s.layer), s.index or 0): s for s in spots if s.side == "after"
    }
    for spot in spots:
        if spot.side != "before":
            continue
        graph = graph_of(model)
        for part in spot.scope:
            graph = graph_of(next(op for op in graph.operations if op.name == part))
        node = nodes_of(graph, spot.layer)[0]
        history = node.input_tensors[0]._keras_history
        clash = afters.get((spot.scope, id(history.operation), history.tensor_index))
        if clash is not None:
            raise SurgeryError(
                f"after='{clash.spec}' and before='{spot.spec}' name the same spot; "
                "keep one of them"
            )
