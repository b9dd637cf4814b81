"""The rewrite engine: a new model from an old one and a list of edits.

`rewrite(model, edits)` walks the model's graph node by node and builds a new
graph from copies of its layers, applying every edit (see
`surgery.graph.edits`) on the way: layers inserted after or before a call,
calls removed, layers replaced, weights replaced. Working on nodes keeps what
`keras.models.clone_model` loses: Sequential models stay Sequential, nested
models are rebuilt as nested models (with their edits inside), shared layers
stay shared, and multiple inputs and outputs, non-Layer ops and call kwargs
come through as they were. The input model is never modified and the new
model shares no variables with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import keras
from keras import tree

from surgery.errors import SurgeryError
from surgery.graph.edits import (
    Edit,
    InsertAfter,
    InsertBefore,
    Remove,
    Replace,
    SetWeights,
    resolve,
)
from surgery.graph.spots import calls_in_order, graph_of, is_graph_model
from surgery.graph.taps import deep_graphs, fresh_input


def rewrite(model: keras.Model, edits: Sequence[Edit] = ()) -> keras.Model:
    """A new model: `model` with every edit in `edits` applied, in one rebuild.

    Args:
        model: a Functional or Sequential Keras model (nested ones included).
        edits: `InsertAfter`, `InsertBefore`, `Remove`, `Replace` and
            `SetWeights` from `surgery.graph.edits`; none gives a copy.

    Returns:
        The new model, of the same kind and name. Unedited layers are copies
        holding the original's weight values; inserted and replacing layers
        are the ones given.

    Raises:
        SurgeryError: an edit names no layer of the model, asks for something
            the layer cannot take (removing a layer that changes shape, a
            call or output it does not have), clashes with another edit, or
            gives a layer of `model` itself.

    Example:
        ```python
        new = rewrite(model, [
            Remove("dropout"),
            InsertAfter("conv1", [keras.layers.BatchNormalization()]),
        ])
        ```
    """
    return Rewriter(model, edits).run()


def copy_model(model: keras.Model) -> keras.Model:
    """A copy of `model` that owns its variables (`rewrite` with no edits)."""
    return rewrite(model, [])


class Rewriter:
    """One rebuild of `model` with `edits`; `run()` returns the new model.

    `inserted` maps each insert edit (by id) to the layers it inserted, for
    callers that made them with a factory and want them back.
    """

    def __init__(self, model, edits: Sequence[Edit]):
        self._model = model
        self._at: dict[tuple, list] = {}  # (scope, id(node)) -> targets there
        self._weights: dict[int, list] = {}  # id(old layer) -> its new weights
        for target in resolve(model, edits):
            if isinstance(target.edit, SetWeights):
                self._weights[id(target.layer)] = list(target.edit.weights)
            for node in target.nodes:
                self._at.setdefault((target.scope, id(node)), []).append(target)
        self._copies: dict[int, tuple] = {}  # id(old op) -> (old, new)
        self._replacing: list[tuple] = []  # (old layer, the layer replacing it)
        self._models: dict[int, keras.Model] = {}
        self._called: dict[tuple, list] = {}  # scope -> new ops, in call order
        self.inserted: dict[int, list[keras.layers.Layer]] = {}
        self._given: set[int] = set()  # ids of variables created as copies

    def run(self) -> keras.Model:
        new = self._rebuild(self._model, ())
        self._copy_weights()
        return new

    def _rebuild(self, model, scope, given=None):
        """The new `model`; `given`: the tensors a nested model is called on.

        A nested model's inputs take the static sizes of what it is given,
        which an edit before it may have changed (pruned channels).
        """
        if id(model) in self._models:
            return self._models[id(model)]
        graph = graph_of(model)
        if given is None or len(given) != len(graph.inputs):
            given = graph.inputs
        inputs = [
            fresh_input(old, _static_sizes(old, new))
            for old, new in zip(graph.inputs, given, strict=True)
        ]
        self._called[scope] = []
        outputs = self._walk(graph, inputs, scope)
        with deep_graphs():
            if isinstance(model, keras.Sequential):
                if not self._called[scope]:
                    raise SurgeryError(
                        f"Sequential model '{model.name}' would have no layers "
                        "left; keep at least one"
                    )
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

    def _walk(self, graph, inputs, scope) -> list:
        tensors = {id(old): new for old, new in zip(graph.inputs, inputs, strict=True)}
        for node in calls_in_order(graph):
            targets = [t.edit for t in self._at.get((scope, id(node)), [])]
            local = self._inputs_of(node, targets, tensors, scope)
            flat = list(tree.flatten(self._call(node, targets, local, scope)))
            for edit in targets:
                if isinstance(edit, InsertAfter):
                    flat[edit.output] = self._chain(edit, flat[edit.output], scope)
            for old, new in zip(node.outputs, flat, strict=True):
                tensors[id(old)] = new
        return [tensors[id(t)] for t in graph.outputs]

    def _inputs_of(self, node, edits, tensors, scope) -> dict:
        """The tensors this call reads: `tensors`, with its inserts before."""
        local = tensors
        for edit in edits:
            if isinstance(edit, InsertBefore):
                local = dict(local) if local is tensors else local
                source = id(node.input_tensors[edit.input])
                local[source] = self._chain(edit, local[source], scope)
        return local

    def _call(self, node, edits, tensors, scope):
        """The new op called as `node` called the old one (or the input, removed)."""
        if any(isinstance(edit, Remove) for edit in edits):
            return tensors[id(node.input_tensors[0])]
        args, kwargs = node.arguments.fill_in(tensors)
        op = node.operation
        replace = next((edit for edit in edits if isinstance(edit, Replace)), None)
        by = replace.by if replace is not None else None
        if by is not None:
            if not any(new is by for _, new in self._replacing):
                self._replacing.append((op, by))
            new = by
        elif is_graph_model(op):
            given = [tensors[id(t)] for t in node.input_tensors]
            new = self._rebuild(op, scope + (op.name,), given)
        else:
            new = self._copy(op)
        self._called[scope].append(new)
        outputs = new(*args, **kwargs)
        if by is not None and not replace.reshapes:
            _check_replacement(node, outputs)
        return outputs

    def _copy(self, op):
        if id(op) not in self._copies:
            new = copy_operation(op)
            self._copies[id(op)] = (op, new)
            if id(op) not in self._weights:
                self._start_from_source(op, new)
        return self._copies[id(op)][1]

    def _chain(self, edit, tensor, scope):
        """`tensor` through the layers `edit` inserts (made at its first site)."""
        if id(edit) not in self.inserted:
            made = edit.layers
            if not isinstance(made, (keras.layers.Layer, Sequence)):
                made = made(tensor)
            self.inserted[id(edit)] = (
                [made] if isinstance(made, keras.layers.Layer) else list(made)
            )
        for layer in self.inserted[id(edit)]:
            self._called[scope].append(layer)
            tensor = layer(tensor)
        return tensor

    def _copy_weights(self) -> None:
        """Give every copied layer the original's weight values (or the given).

        Variable to variable, on the device: a round trip through NumPy
        (`set_weights(get_weights())`) costs more than building the layers.
        Each value is a fresh buffer: JAX variables hold immutable arrays that
        `assign` adopts as they are, and Keras' JAX `predict` donates them, so
        a shared array run through one model is deleted under the other.
        """
        for old, new in self._copies.values():
            if not isinstance(new, keras.layers.Layer):
                continue
            new.__dict__.pop("add_weight", None)
            if id(old) in self._weights:
                _set_weights(new, self._weights[id(old)], old.name)
                continue
            for target, source in zip(new.weights, old.weights, strict=True):
                if tuple(target.shape) != tuple(source.shape):
                    raise SurgeryError(
                        f"layer '{old.name}' cannot keep its weights: an edit "
                        "before it changed the shape of what it reads (its "
                        f"weight '{source.name}' has shape {tuple(source.shape)}, "
                        f"the rebuilt layer needs {tuple(target.shape)})"
                    )
                if id(target) not in self._given:
                    target.assign(fresh_copy(source.value))
        for old, by in self._replacing:
            if id(old) in self._weights:
                _set_weights(by, self._weights[id(old)], old.name)

    def _start_from_source(self, old, new) -> None:
        """Let `new` create its own variables holding `old`'s values.

        Building a copy initialises its variables (random kernels, for most
        layers) only for `_copy_weights` to overwrite them; a variable created
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


def _static_sizes(old, new) -> tuple:
    """`old`'s shape with the static sizes of `new` (of the same rank)."""
    if len(old.shape) != len(new.shape):
        return tuple(old.shape)
    return tuple(
        o if o is None or n is None else n
        for o, n in zip(old.shape, new.shape, strict=True)
    )


def _check_replacement(node, outputs) -> None:
    """Refuse a replacement whose outputs its old consumers cannot take."""
    new = [tuple(t.shape) for t in tree.flatten(outputs)]
    old = [tuple(t.shape) for t in node.outputs]
    if new != old:
        raise SurgeryError(
            f"Replace '{node.operation.name}': the new layer outputs shape "
            f"{_shown(new)} where the old one gave {_shown(old)}; its consumers "
            "need the old shape"
        )


def _shown(shapes: list) -> object:
    return shapes[0] if len(shapes) == 1 else shapes


def _set_weights(layer, weights, name) -> None:
    """`layer.set_weights`, from host copies (a variable given is not shared)."""
    try:
        layer.set_weights([keras.ops.convert_to_numpy(w) for w in weights])
    except ValueError as e:
        raise SurgeryError(
            f"SetWeights '{name}': the weights do not fit the layer ({e}); give "
            "them in get_weights() order and shapes"
        ) from None


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
