"""BN sites: every BatchNormalization of a model, what feeds it and how it folds.

`bn_sites` lists the BNs of a model and its nested models in graph order,
each with the Dense or convolution it can fold into: backward into the
layer that produces its input, or, where that is impossible (an activation
in between, a shared producer, another axis), forward into the layer that
consumes its output where that is exact, looking through the layers that
are the identity at inference (Dropout and its kinds, GaussianNoise,
ActivityRegularization, Identity, a linear Activation), which stay in the
folded model. `select` picks the sites a user named. Folding (`surgery.verbs.fold`), recalibration and the Ray actors
share them.
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass

import keras
import numpy as np

from surgery.errors import SurgeryError
from surgery.graph.spots import all_paths, graph_of, is_graph_model, nodes_in, nodes_of
from surgery.numerics.folding import CONSUMERS, PRODUCERS, affine, misplaced_bias

L = keras.layers
OK = "ok"
# Layers whose output is their input at inference (training=None or False):
# forward folding looks through them. Exact types, as for PRODUCERS: a
# subclass may compute something else.
INFERENCE_IDENTITY = (
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Identity,
)


@dataclass(frozen=True, eq=False)
class BnSite:
    """One BatchNormalization layer: where it is and what feeds it."""

    path: str
    scope: tuple[str, ...]
    layer: keras.layers.BatchNormalization
    producer: keras.layers.Layer | None
    reason: str  # OK, "ok: forward into ...", or why it cannot be folded
    consumer: keras.layers.Layer | None = None  # set when it folds forward

    @property
    def folds(self) -> bool:
        return self.reason == OK or self.consumer is not None

    @property
    def backward(self) -> bool:
        """Folds into the producer (else, if it folds, into the consumer)."""
        return self.reason == OK

    @property
    def target(self) -> keras.layers.Layer:
        return self.producer if self.backward else self.consumer


def bn_sites(model) -> list[BnSite]:
    """Every BatchNormalization in `model` and its nested models, in graph order."""
    graphs = _graphs(model)
    calls = Counter(
        id(node.operation)
        for _, graph in graphs
        for node in nodes_in(graph)
        if not node.is_input
    )
    sites = []
    for scope, graph in graphs:
        for op in graph.operations:
            if isinstance(op, L.BatchNormalization):
                sites.append(_site(scope, graph, op, calls))
    return sites


def _site(scope, graph, bn, calls) -> BnSite:
    producer, reason = _backward(graph, bn, calls)
    consumer = None
    if reason != OK and producer is not _SELF:
        consumer, why = _forward(graph, bn, calls)
        reason = (
            f"ok: forward into {_named(consumer)}{why}"
            if consumer
            else f"{reason}; {why}"
        )
    path = "/".join((*scope, bn.name))
    producer = None if producer is _SELF else producer
    return BnSite(path, scope, bn, producer, reason, consumer)


def select(model, sites: list[BnSite], layers) -> list[BnSite]:
    """The sites named in `layers` (all of them for None), or one clear error."""
    if not sites:
        raise SurgeryError(
            f"model '{model.name}' has no BatchNormalization layer; nothing to do"
        )
    if layers is None:
        return sites
    by_path = {site.path: site for site in sites}
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise SurgeryError("layers=[] names no layer; pass None for all BN layers")
    for name in names:
        if name in by_path:
            continue
        if name in all_paths(model):
            raise SurgeryError(
                f"'{name}' is not a BatchNormalization layer; pick one of the "
                f"model's BN layers (see surgery.verbs.fold.foldable)"
            )
        close = difflib.get_close_matches(str(name), list(by_path), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise SurgeryError(
            f"no BatchNormalization layer '{name}' in model '{model.name}'{hint}"
        )
    return [by_path[name] for name in dict.fromkeys(names)]


_SELF = object()  # the BN itself is why it cannot fold either way


def _named(layer) -> str:
    return f"{type(layer).__name__} '{layer.name}'"


def _graphs(model, scope=(), seen=None) -> list:
    """(scope, graph) of the model and each nested model, each graph once."""
    seen = set() if seen is None else seen
    graph = graph_of(model)
    if id(graph) in seen:
        return []
    seen.add(id(graph))
    found = [(scope, graph)]
    for op in graph.operations:
        if is_graph_model(op):
            found += _graphs(op, scope + (op.name,), seen)
    return found


def _backward(graph, bn, calls) -> tuple[keras.layers.Layer | None, str]:
    """The layer feeding `bn` and whether the pair can be folded."""
    if calls[id(bn)] > 1:
        return _SELF, f"the BN layer is shared (called {calls[id(bn)]} times)"
    node = nodes_of(graph, bn)[0]
    if node.arguments.kwargs.get("training") is True:
        return _SELF, "it is called with training=True"
    tensor = node.input_tensors[0]
    producer = tensor._keras_history.operation
    if producer is None or isinstance(producer, L.InputLayer):
        return None, "it normalises a model input"
    name = _named(producer)
    if type(producer) not in PRODUCERS:  # a subclass may compute something else
        return producer, f"it follows {name}, not a Dense or convolution layer"
    activation = getattr(producer.activation, "__name__", repr(producer.activation))
    if producer.activation is not keras.activations.linear:
        return producer, f"{name} has activation '{activation}' before the BN"
    if getattr(producer, "lora_enabled", False) or producer.quantization_mode:
        return producer, f"{name} is quantized or has LoRA enabled"
    if calls[id(producer)] > 1:
        return producer, f"{name} is shared (called {calls[id(producer)]} times)"
    if _uses(graph, tensor) > 1:
        return producer, f"the output of {name} is also used elsewhere"
    rank = len(tensor.shape)
    channel = 1 if getattr(producer, "data_format", None) == "channels_first" else -1
    if bn.axis % rank != channel % rank:
        return producer, (
            f"the BN normalises axis {bn.axis % rank}, but the channels of {name} "
            f"are on axis {channel % rank}"
        )
    if channel == 1 and misplaced_bias(tensor):
        return producer, (
            f"{name} is channels_first with as many columns as channels; Keras on "
            "TensorFlow adds such a bias along the last axis (ops.add's bias_add "
            "shortcut), so a folded bias would land on the wrong axis"
        )
    return producer, OK


def _forward(graph, bn, calls) -> tuple[keras.layers.Layer | None, str]:
    """The layer `bn` can fold forward into and what it looks through to get
    there (`" (through Dropout 'd')"`, or ""); or None and why not.

    Layers that are the identity at inference (`identity_at_inference`) sit
    between them unchanged: at inference `W (x * s + t)` is still what the
    consumer computes, and they stay in the folded model.

    `W (x * s + t) + b = (W * s) x + (b + W t)` is exact algebra for a Dense
    layer. For a convolution it holds only where every window sees real
    inputs: with `padding="valid"`. With `"same"` padding the zeros added at
    the border would have been `t` after the BN, so it folds only when
    `t == 0` (AIMET's rule as well).
    """
    tensor = nodes_of(graph, bn)[0].outputs[0]
    node, through = _next_node(graph, tensor)
    if node is None:
        return None, (
            f"its output{_through(through)} goes to a model output or several layers"
        )
    layer = node.operation
    name = _named(layer) + _through(through)
    if type(layer) not in CONSUMERS:
        return None, f"it feeds {name}, not a Dense or convolution layer"
    if calls[id(layer)] > 1:
        return None, f"the {name} it feeds is shared (called {calls[id(layer)]} times)"
    if getattr(layer, "lora_enabled", False) or layer.quantization_mode:
        return None, f"the {name} it feeds is quantized or has LoRA enabled"
    rank = len(tensor.shape)
    channel = 1 if getattr(layer, "data_format", None) == "channels_first" else -1
    if bn.axis % rank != channel % rank:
        return None, f"it normalises another axis than the input channels of {name}"
    if getattr(layer, "groups", 1) != 1:
        return None, f"the {name} it feeds is a grouped convolution"
    _, shift = affine(bn)
    if getattr(layer, "padding", "valid") != "valid" and np.any(shift != 0):
        return None, (
            f"the {name} it feeds pads with zeros (padding='{layer.padding}'), "
            "which the BN's shift would have moved; only valid padding folds"
        )
    if channel == 1 and misplaced_bias(node.outputs[0]):
        return None, f"{name} is channels_first with as many columns as channels"
    return layer, _through(through)


def _next_node(graph, tensor) -> tuple:
    """The node that reads `tensor`, past layers that are identities at inference.

    Returns `(node, layers looked through)`; the node is None when a tensor
    on the way is a model output or read by more than one layer.
    """
    through = []
    while True:
        nodes = _consumers(graph, tensor)
        if any(t is tensor for t in graph.outputs) or len(nodes) != 1:
            return None, through
        node = nodes[0]
        if not identity_at_inference(node):
            return node, through
        through.append(node.operation)
        tensor = node.outputs[0]


def identity_at_inference(node) -> bool:
    """Whether `node` passes its one input through unchanged at inference.

    True for a call of a layer in `INFERENCE_IDENTITY` (Dropout and its
    kinds, GaussianNoise, ActivityRegularization, Identity) or of a linear
    `Activation`, with one input and one output, unless the call forces
    `training=True` (Monte Carlo dropout drops at inference too).

    Args:
        node: a Keras graph node (a layer's call) of a Functional model.

    Returns:
        Whether forward folding may look through the call.
    """
    layer = node.operation
    if len(node.input_tensors) != 1 or len(node.outputs) != 1:
        return False
    if node.arguments.kwargs.get("training") is True:
        return False
    if type(layer) is L.Activation:
        return layer.activation is keras.activations.linear
    return type(layer) in INFERENCE_IDENTITY


def _through(layers) -> str:
    if not layers:
        return ""
    return f" (through {', '.join(_named(layer) for layer in layers)})"


def _consumers(graph, tensor) -> list:
    return [
        node
        for node in nodes_in(graph)
        if not node.is_input and any(t is tensor for t in node.input_tensors)
    ]


def _uses(graph, tensor) -> int:
    """How often `tensor` is read: as a call argument, or as a model output."""
    uses = sum(
        1
        for node in nodes_in(graph)
        for t in node.input_tensors
        if t is tensor and not node.is_input
    )
    return uses + sum(1 for t in graph.outputs if t is tensor)
