"""Run a Functional/Sequential graph node by node and tap tensors at spots.

The statistics pass re-runs the model's own layers on new inputs, nested
models inlined, and collects the tensors at the spots (`TapCollector`). It
works on nodes, so shared layers, multiple inputs and outputs, non-Layer ops
and call kwargs come through as they were. Rebuilding a model with changes
is `surgery.graph.rewrite`'s job.
"""

from __future__ import annotations

import contextlib
import sys

import keras
from keras import tree

from surgery.errors import SurgeryError
from surgery.graph.spots import Spot, calls_in_order, graph_of, is_graph_model


@contextlib.contextmanager
def deep_graphs(limit: int = 20_000):
    """Room on the stack for Keras' recursive walks over very deep graphs.

    Keras builds (and loads) a Functional model with one Python frame per
    node on the longest path. A BN after every layer of a deep net, such as
    EfficientNetV2L's 1,031 layers, takes that path past Python's default
    limit of 1,000 frames. Every model `surgery` builds or loads is built
    inside this.
    """
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def run_graph(model, inputs: list, visitor, scope: tuple[str, ...] = (), start=None):
    """Re-run `model`'s graph on `inputs`, letting `visitor` act at each node.

    `start` maps ids of the graph's own tensors to new tensors to begin from
    instead of the inputs (used to cut a graph in two).
    """
    graph = graph_of(model)
    if start is None:
        start = {id(old): new for old, new in zip(graph.inputs, inputs, strict=True)}
    tensors = dict(start)
    for node in calls_in_order(graph):
        if any(id(t) not in tensors for t in node.input_tensors):
            continue
        op = node.operation
        local = tensors
        for spot in visitor.spots_at(scope, op, "before"):
            local = dict(tensors)
            source = node.input_tensors[0]
            local[id(source)] = visitor.at_spot(spot, tensors[id(source)])
        args, kwargs = node.arguments.fill_in(local)
        if is_graph_model(op):
            outputs = visitor.nested(op, scope + (op.name,), args, kwargs)
        else:
            outputs = visitor.operation(op)(*args, **kwargs)
        flat = list(tree.flatten(outputs))
        for spot in visitor.spots_at(scope, op, "after"):
            i = spot.index or 0
            flat[i] = visitor.at_spot(spot, flat[i])
        for old, new in zip(node.outputs, flat, strict=True):
            tensors[id(old)] = new
    missing = [t for t in graph.outputs if id(t) not in tensors]
    if missing:
        raise SurgeryError(
            f"model output '{missing[0].name}' cannot be computed from the given "
            "starting point; split at a layer every output depends on"
        )
    return [tensors[id(t)] for t in graph.outputs]


class SpotVisitor:
    """Looks up the spots at each node; subclasses say what happens there."""

    def __init__(self, spots: list[Spot]):
        self._spots = spots
        # looked up at every node: a scan of all spots there was quadratic
        self._at: dict[tuple, list[Spot]] = {}
        for spot in spots:
            key = (spot.side, spot.scope, id(spot.layer))
            self._at.setdefault(key, []).append(spot)

    def spots_at(self, scope, op, side):
        return self._at.get((side, scope, id(op)), [])


class TapCollector(SpotVisitor):
    """Runs the original layers and collects the tensors at every spot."""

    def __init__(self, spots):
        super().__init__(spots)
        self.taps: list[tuple[Spot, object]] = []

    def operation(self, op):
        return op

    def nested(self, model, scope, args, kwargs):
        flat = flatten_inputs(model, args[0])
        return run_graph(model, flat, self, scope)

    def at_spot(self, spot, tensor):
        self.taps.append((spot, tensor))
        return tensor


def fresh_input(tensor, batch_shape: tuple | None = None):
    """A new `keras.Input` like the graph input `tensor` (shape, dtype, name).

    `batch_shape` gives it another shape (a nested model's input resized).
    """
    layer = tensor._keras_history.operation
    return keras.Input(
        batch_shape=tensor.shape if batch_shape is None else batch_shape,
        dtype=tensor.dtype,
        sparse=tensor.sparse,
        name=layer.name if layer is not None else None,
    )


def flatten_inputs(model, inputs) -> list:
    """The tensors a nested model was called with, in its own input order."""
    graph = graph_of(model)
    struct = graph._inputs_struct
    if isinstance(inputs, dict) and not isinstance(struct, dict):
        return [inputs[t.name] for t in tree.flatten(struct)]
    return list(tree.flatten(inputs))


def tap_tensors(model, spots, collector=None) -> tuple[object, list]:
    """New inputs for `model` and the (spot, tensor) pairs they reach.

    `collector` (a `TapCollector`, by default a plain one) runs the graph.
    """
    graph = graph_of(model)
    inputs = [fresh_input(t) for t in graph.inputs]
    collector = collector or TapCollector(spots)
    run_graph(model, inputs, collector)
    return tree.pack_sequence_as(graph._inputs_struct, inputs), collector.taps
