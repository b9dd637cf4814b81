"""Walk a Functional/Sequential graph node by node and rebuild or tap it.

One walker serves two jobs: the statistics pass (same layers, nested models
inlined, tensors at the spots collected) and the rebuild (layers copied with
their weights, nested models rebuilt as nested models, BN layers spliced in
at the spots). It works on nodes, so shared layers, multiple inputs and
outputs, non-Layer ops and call kwargs come through as they were.
"""

from __future__ import annotations

import contextlib
import sys

import keras
from keras import tree

from surgery.errors import SurgeryError
from surgery.graph.spots import Spot, graph_of, is_graph_model


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
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if node.is_input or any(id(t) not in tensors for t in node.input_tensors):
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


class _Visitor:
    def __init__(self, spots: list[Spot]):
        self._spots = spots
        # looked up at every node: a scan of all spots there was quadratic
        self._at: dict[tuple, list[Spot]] = {}
        for spot in spots:
            key = (spot.side, spot.scope, id(spot.layer))
            self._at.setdefault(key, []).append(spot)

    def spots_at(self, scope, op, side):
        return self._at.get((side, scope, id(op)), [])


class TapCollector(_Visitor):
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


class Rebuilder(_Visitor):
    """Copies layers (weights included) and splices BN layers in at spots.

    `make_bn(spot, tensor)` returns the BN for a spot, or a list of layers
    applied in order, the BN first (a float64 BN and the float32 layer that
    casts its output back, for instance).
    """

    def __init__(self, spots, make_bn):
        super().__init__(spots)
        self._make_bn = make_bn
        self._copies: dict[int, tuple] = {}
        self._models: dict[int, keras.Model] = {}
        # spot id -> the layers spliced in there: the BN, then any that follow
        self._chains: dict[int, list[keras.layers.Layer]] = {}
        self._called: dict[tuple, list] = {}
        self._scope = ()
        self._given: set[int] = set()  # ids of variables created as copies

    def rebuild(self, model, scope=()):
        if id(model) in self._models:
            return self._models[id(model)]
        graph = graph_of(model)
        inputs = [fresh_input(t) for t in graph.inputs]
        outer, self._scope = self._scope, scope
        self._called[scope] = []
        outputs = run_graph(model, inputs, self, scope)
        self._scope = outer
        with deep_graphs():
            if isinstance(model, keras.Sequential):
                layers = [inputs[0], *self._called[scope]]
                new = keras.Sequential(layers, name=model.name)
            else:
                new = keras.Model(
                    tree.pack_sequence_as(graph._inputs_struct, inputs),
                    tree.pack_sequence_as(graph._outputs_struct, outputs),
                    name=model.name,
                )
        self._models[id(model)] = new
        return new

    def copy_weights(self):
        """Give every copied layer the original's weight values.

        Variable to variable, on the device: a round trip through NumPy
        (`set_weights(get_weights())`) costs more than building the layers.
        Each value is a fresh buffer: JAX variables hold immutable arrays that
        `assign` adopts as they are, and Keras' JAX `predict` donates them, so
        a shared array run through one model is deleted under the other.
        """
        for old, new in self._copies.values():
            if isinstance(new, keras.layers.Layer):
                new.__dict__.pop("add_weight", None)
                for target, source in zip(new.weights, old.weights, strict=True):
                    if id(target) not in self._given:
                        target.assign(fresh_copy(source.value))

    @property
    def bn_layers(self) -> dict[int, keras.layers.Layer]:
        """The BN spliced in at each spot, by spot id."""
        return {key: chain[0] for key, chain in self._chains.items()}

    def operation(self, op):
        if id(op) not in self._copies:
            self._copies[id(op)] = (op, copy_operation(op))
            self._start_from_source(op, self._copies[id(op)][1])
        new = self._copies[id(op)][1]
        self._called[self._scope].append(new)
        return new

    def _start_from_source(self, old, new) -> None:
        """Let `new` create its own variables holding `old`'s values.

        Building a copy initialises its variables (random kernels, for most
        layers) only for `copy_weights` to overwrite them; a variable created
        from the source's value skips both. Each of the layer's own variables
        is matched by name; the rest (a sublayer's, a name used twice) are
        initialised and copied as before. TensorFlow only: there a variable
        made from a tensor owns a copy of it, which other backends do not
        promise (JAX's predict donates buffers a shared array would lose).
        """
        if keras.backend.backend() != "tensorflow":
            return
        if not isinstance(new, keras.layers.Layer) or new.built:
            return
        own = [*old._trainable_variables, *old._non_trainable_variables]
        names = [v.name for v in own]
        sources = {v.name: v for v in own if names.count(v.name) == 1}
        if not sources:
            return
        # read here, outside any autocast scope a nested call might open
        values = {name: v.value for name, v in sources.items()}
        add_weight = new.add_weight

        def add_weight_from_source(*args, **kwargs):
            source = sources.get(kwargs.get("name"))
            if args or source is None or kwargs.get("shape") is None:
                return add_weight(*args, **kwargs)
            if tuple(kwargs["shape"]) != tuple(source.shape):
                return add_weight(*args, **kwargs)
            variable = add_weight(**{**kwargs, "initializer": values[source.name]})
            if variable.dtype == source.dtype:
                self._given.add(id(variable))
            return variable

        new.__dict__["add_weight"] = add_weight_from_source

    def nested(self, model, scope, args, kwargs):
        new = self.rebuild(model, scope)
        self._called[self._scope].append(new)
        return new(*args, **kwargs)

    def at_spot(self, spot, tensor):
        if id(spot) not in self._chains:
            made = self._make_bn(spot, tensor)
            self._chains[id(spot)] = list(made) if isinstance(made, list) else [made]
        for layer in self._chains[id(spot)]:
            self._called[self._scope].append(layer)
            tensor = layer(tensor)
        return tensor


def fresh_copy(value):
    """`value` in a buffer of its own (TF and torch `assign` copy anyway)."""
    if keras.backend.backend() == "jax":
        return keras.ops.copy(value)
    return value


def copy_operation(op):
    """A fresh instance of `op` from its config (weights are copied later)."""
    try:
        with _copying_code(op):
            return op.__class__.from_config(op.get_config())
    except Exception as e:
        if not isinstance(op, keras.layers.Layer):
            return op  # a stateless op that cannot be re-created is safe to reuse
        raise SurgeryError(
            f"cannot copy layer '{op.name}' ({type(op).__name__}): from_config "
            f"failed ({type(e).__name__}); give it a working get_config()"
        ) from None


def _copying_code(op):
    """Safe mode off while a Lambda is copied: its function is already loaded.

    Safe mode guards against running code from a file; re-creating a Lambda
    that is in memory (its model was loaded with `unsafe=True` or built in
    Python) runs nothing new.
    """
    if not isinstance(op, keras.layers.Lambda):
        return contextlib.nullcontext()
    from keras.src.saving.serialization_lib import SafeModeScope

    return SafeModeScope(False)


def fresh_input(tensor):
    layer = tensor._keras_history.operation
    return keras.Input(
        batch_shape=tensor.shape,
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
