"""`fold_bn`: BatchNormalization folded into the Dense or convolution before it.

At inference a BN right after a linear layer is a per-channel affine map,
`y = x * s + (beta - mean * s)` with `s = gamma / sqrt(var + eps)`, and so is
the linear layer, so the pair is one layer with kernel `W * s` and bias
`(b - mean) * s + beta`. The folded model computes the same function with one
layer fewer per BN and no BN left to drift when the model is deployed.

A BN that does not sit directly on such a layer's output (an activation in
between, the layer shared or its output used elsewhere, another axis) is
folded forward into the Dense or convolution that consumes it where that is
exact (`surgery.verbs.forward_fold`). Folding repeats until nothing changes, so a
chain such as Conv -> BN -> BN folds completely. The rest cannot be folded;
`foldable` says which and why, and `fold_bn` leaves them in place.
"""

from __future__ import annotations

import difflib
import warnings
from collections import Counter
from dataclasses import dataclass

import keras
import numpy as np
from keras import backend, ops

from surgery.errors import SurgeryError
from surgery.graph.spots import all_paths, graph_of, is_graph_model, nodes_in, nodes_of
from surgery.graph.walk import Rebuilder
from surgery.verbs import forward_fold

L = keras.layers
_PLAIN = (L.Dense, L.Conv1D, L.Conv2D, L.Conv3D)  # kernel (..., in, out)
_TRANSPOSED = (
    L.Conv1DTranspose,
    L.Conv2DTranspose,
    L.Conv3DTranspose,
)  # (..., out, in)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)  # (..., in, mult)
_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)  # pointwise (..., in * mult, out)
PRODUCERS = _PLAIN + _TRANSPOSED + _DEPTHWISE + _SEPARABLE
OK = "ok"


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
    def target(self) -> keras.layers.Layer:
        return self.producer if self.reason == OK else self.consumer


def foldable(model: keras.Model) -> dict[str, str]:
    """Every BatchNormalization layer's path mapped to how it folds, or why not.

    The dry run of `fold_bn`: nothing is changed. Use it to see which BNs
    `fold_bn` will fold and why the others stay (an activation between the
    layer and its BN, a shared layer, an output used elsewhere, another axis,
    a model input, ...).

    Args:
        model: The Functional or Sequential `keras.Model` to inspect, nested
            models included. A subclassed model has no graph to read: trace it
            with `surgery.functional` first.

    Returns:
        A dict from each BN's path, in graph order (`"resnet50/conv1_bn"` for
        a BN in a nested model), to `"ok"` when it folds into the layer
        before it, `"ok: forward into Conv2D 'x'"` when it folds into the
        layer after it, either with `" (pass 2)"` (or a later pass) when it
        folds once the BNs next to it have folded; anything else is the
        reason the BN stays.

    Raises:
        SurgeryError: the model has no BatchNormalization layer, or it is
            subclassed or a Sequential model without an input shape.

    Example:

    ```python
    import keras
    import surgery

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, outputs)
    for path, how in surgery.foldable(model).items():
        print(path, "->", how)
    # bn1 -> ok
    # bn2 -> it follows ReLU 'relu', not a Dense or convolution layer; ...
    ```
    """
    return fold_report(model)[1]


def fold_bn(model: keras.Model, layers: list[str] | str | None = None) -> keras.Model:
    """A new model with BatchNormalization folded into the layer before it.

    At inference a BN right after a Dense or convolution layer is a per-channel
    affine map, so the pair is one layer with kernel `W * s` and bias
    `(b - mean) * s + beta`, where `s = gamma / sqrt(var + eps)`: the folded
    model computes the same function with one layer fewer per BN and no BN
    left to drift when deployed. A BN that does not sit directly on such a
    layer's output is folded forward into the Dense or convolution that
    consumes it where that is exact; folding repeats until nothing changes,
    so a chain such as Conv -> BN -> BN folds completely. BNs that cannot be
    folded are left in place and listed in a warning; `foldable(model)` gives
    the same list with the reasons.

    The scale is taken as the backend's BN computes it (`rsqrt(var + eps) *
    gamma` in the layer's dtype), the rest in float64 on the host and cast to
    the variables' dtype once, so the folded model reproduces the BN model's
    own float32 arithmetic as closely as a single rounding allows, and a BN
    that is an exact identity folds to no change at all. A producer without a
    bias gets one. The input model is not modified and shares no variables
    with the result; a Sequential model stays Sequential.

    Args:
        model: The Functional or Sequential `keras.Model` whose BNs to fold,
            nested models included. A subclassed model has no graph to
            rewrite: trace it with `surgery.functional` first.
        layers: Name(s) of the BN layers to fold, by path for BNs in nested
            models (`"resnet50/conv1_bn"`); a string is one name. Each must be
            foldable. Defaults to `None`: every foldable BN.

    Returns:
        A new, uncompiled `keras.Model` without the folded BNs, the layers
        they were folded into carrying the folded weights.

    Raises:
        SurgeryError: the model has no BatchNormalization layer; `layers` is
            empty, names a layer that is not a BN or does not exist (the
            message suggests close names), or names a BN that cannot be
            folded (the message says why); folding gives non-finite weights
            in the layer's dtype; or the model is subclassed or a Sequential
            model without an input shape.

    Example:

    ```python
    import keras
    import numpy as np
    import surgery
    from surgery.synthetic import pretrained_like

    model = pretrained_like(keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(name="relu"),
    ]))
    folded = surgery.fold_bn(model)
    print([layer.name for layer in folded.layers])  # ['conv', 'relu']
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32")
    print(surgery.verify(model, folded, x, verbose=0).max_abs_diff < 1e-5)  # True
    ```
    """
    new, _, left = fold_report(model, layers)
    if layers is not None and left:
        raise SurgeryError(f"cannot fold '{left[0].path}': {left[0].reason}")
    if left:
        listed = "; ".join(f"'{s.path}' ({s.reason})" for s in left)
        warnings.warn(
            f"fold_bn left {len(left)} BatchNormalization layer(s) in place: {listed}",
            stacklevel=2,
        )
    return new


def fold_report(model, layers=None) -> tuple[keras.Model, dict[str, str], list]:
    """Folds to a fixed point: `(new model, foldable report, sites left)`.

    Each pass folds every foldable BN whose neighbour no other BN of the pass
    folds into, so a layer gets one BN per pass; the next pass sees the
    result. The model is always rebuilt, so the result shares nothing with it.
    """
    order = [site.path for site in bn_sites(model)]
    chosen = {site.path for site in select(model, bn_sites(model), layers)}
    report, current, passes = {}, model, 0
    while True:
        sites = [site for site in bn_sites(current) if site.path in chosen]
        batch = _one_pass(sites)
        if not batch and current is not model:
            break
        passes += 1
        for site in batch:
            report[site.path] = site.reason + (
                f" (pass {passes})" if passes > 1 else ""
            )
        folder = _Folder(batch)
        current = folder.rebuild(current)
        folder.copy_weights()
        if not batch:
            break
    left = [site for site in sites if site.path not in report]
    report.update({site.path: site.reason for site in left})
    return current, {path: report[path] for path in order if path in report}, left


def _one_pass(sites) -> list[BnSite]:
    """The foldable sites of one pass: each neighbour layer used by one BN."""
    touched, batch = set(), []
    for site in sites:
        if not site.folds:
            continue
        ids = {id(site.layer), id(site.target)}
        if ids & touched:
            continue
        touched |= ids
        batch.append(site)
    return batch


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
                producer, reason = _check(graph, op, calls)
                consumer = None
                if reason != OK and producer is not _SELF:
                    consumer, why = _check_forward(graph, op, calls)
                    reason = (
                        f"ok: forward into {_named(consumer)}"
                        if consumer
                        else (f"{reason}; {why}")
                    )
                path = "/".join((*scope, op.name))
                producer = None if producer is _SELF else producer
                sites.append(BnSite(path, scope, op, producer, reason, consumer))
    return sites


_SELF = object()  # the BN itself is why it cannot fold either way


def _named(layer) -> str:
    return f"{type(layer).__name__} '{layer.name}'"


def _check_forward(graph, bn, calls):
    def consumers_of(tensor):
        nodes = [
            node
            for node in nodes_in(graph)
            if not node.is_input and any(t is tensor for t in node.input_tensors)
        ]
        return nodes, any(t is tensor for t in graph.outputs)

    _, shift = _affine(bn)
    return forward_fold.check(graph, bn, calls, consumers_of, shift)


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


def _check(graph, bn, calls) -> tuple[keras.layers.Layer | None, str]:
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
    name = f"{type(producer).__name__} '{producer.name}'"
    if type(producer) not in PRODUCERS:  # a subclass may compute something else
        return producer, f"it follows {name}, not a Dense or convolution layer"
    activation = getattr(producer.activation, "__name__", repr(producer.activation))
    if producer.activation is not keras.activations.linear:
        return producer, f"{name} has activation '{activation}' before the BN"
    if getattr(producer, "lora_enabled", False) or producer.quantization_mode:
        return producer, f"{name} is quantized or has LoRA enabled"
    if calls[id(producer)] > 1:
        return producer, f"{name} is shared (called {calls[id(producer)]} times)"
    if _consumers(graph, tensor) > 1:
        return producer, f"the output of {name} is also used elsewhere"
    rank = len(tensor.shape)
    channel = 1 if getattr(producer, "data_format", None) == "channels_first" else -1
    if bn.axis % rank != channel % rank:
        return producer, (
            f"the BN normalises axis {bn.axis % rank}, but the channels of {name} "
            f"are on axis {channel % rank}"
        )
    if channel == 1 and _misplaced_bias(tensor):
        return producer, (
            f"{name} is channels_first with as many columns as channels; Keras on "
            "TensorFlow adds such a bias along the last axis (ops.add's bias_add "
            "shortcut), so a folded bias would land on the wrong axis"
        )
    return producer, OK


def _misplaced_bias(tensor) -> bool:
    """Would TF's `ops.add(x, bias.reshape(1, C, 1, ...))` add along the last axis?

    Keras' TF `add` turns a bias-shaped add into `tf.nn.bias_add` and picks
    NHWC whenever the last dimension equals the bias length (Keras 3.15).
    """
    shape = tensor.shape
    return backend.backend() == "tensorflow" and shape[1] == shape[-1] != 1


def _consumers(graph, tensor) -> int:
    uses = sum(
        1
        for node in nodes_in(graph)
        for t in node.input_tensors
        if t is tensor and not node.is_input
    )
    return uses + sum(1 for t in graph.outputs if t is tensor)


class _Folder(Rebuilder):
    """Copies the model, dropping folded BNs and folding them into producers."""

    def __init__(self, sites: list[BnSite]):
        super().__init__([], None)
        self._bn_of = {id(s.producer): s.layer for s in sites if s.reason == OK}
        self._bn_before = {id(s.consumer): s.layer for s in sites if s.reason != OK}
        self._dropped = {id(site.layer) for site in sites}

    def operation(self, op):
        if id(op) in self._dropped:
            return _passthrough
        changed = id(op) in self._bn_of or id(op) in self._bn_before
        if changed and id(op) not in self._copies:
            config = {**op.get_config(), "use_bias": True}
            self._copies[id(op)] = (op, op.__class__.from_config(config))
        return super().operation(op)

    def copy_weights(self):
        for old, new in self._copies.values():
            if id(old) in self._bn_of:
                _fold_into(old, new, self._bn_of[id(old)])
            elif id(old) in self._bn_before:
                _fold_forward_into(old, new, self._bn_before[id(old)])
            elif isinstance(new, keras.layers.Layer):
                new.set_weights(old.get_weights())


def _passthrough(*args, **kwargs):
    return args[0]


def _fold_into(old, new, bn) -> None:
    """Set `new`'s weights to `old`'s with `bn` folded in."""
    scale, shift = _affine(bn)
    weights = [_host(w) for w in old.get_weights()]
    k = 1 if type(old) in _SEPARABLE else 0  # the kernel that mixes channels
    kernel = weights[k]
    bias = weights[k + 1] if old.use_bias else np.zeros_like(scale)
    if type(old) in _TRANSPOSED:
        per_channel = scale[:, None]
    elif type(old) in _DEPTHWISE:
        per_channel = scale.reshape(kernel.shape[-2:])
    else:
        per_channel = scale
    folded = [*weights[:k], kernel * per_channel, bias * scale + shift]
    new.set_weights(
        [
            _cast(w, v.dtype, f"{new.name}/{v.name}")
            for w, v in zip(folded, new.weights, strict=True)
        ]
    )


def _fold_forward_into(old, new, bn) -> None:
    """Set `new`'s weights to `old`'s with `bn` (which feeds it) folded in."""
    scale, shift = _affine(bn)
    weights = [_host(w) for w in old.get_weights()]
    folded = forward_fold.folded_weights(old, scale, shift, weights)
    new.set_weights(
        [
            _cast(w, v.dtype, f"{new.name}/{v.name}")
            for w, v in zip(folded, new.weights, strict=True)
        ]
    )


def _affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """`(s, beta - mean * s)` of `bn` at inference, s as the backend computes it.

    `ops.batch_normalization` of x = 1 with mean = offset = 0 is exactly the
    `rsqrt(var + eps) * gamma` the layer multiplies by, rounded as the layer
    rounds it; it runs on the whole vector, as in the layer (vectorised
    `rsqrt` kernels round their SIMD body and tail differently).
    """
    var = _host(bn.moving_variance)
    gamma = _host(bn.gamma) if bn.scale else np.ones_like(var)
    beta = _host(bn.beta) if bn.center else np.zeros_like(var)
    compute = backend.result_type(bn.compute_dtype, "float32")
    units = var.shape[0]
    zeros = ops.zeros((units,), dtype=compute)
    inv = ops.batch_normalization(
        ops.ones((1, units), dtype=compute),
        zeros,
        ops.convert_to_tensor(var.astype(compute)),
        axis=-1,
        offset=zeros,
        scale=ops.convert_to_tensor(gamma.astype(compute)),
        epsilon=bn.epsilon,
    )
    scale = _host(inv).reshape(-1)
    return scale, beta - _host(bn.moving_mean) * scale


def _host(x) -> np.ndarray:
    if isinstance(x, keras.Variable):
        return np.asarray(x.numpy(), dtype=np.float64)
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def _cast(values: np.ndarray, dtype, name: str) -> np.ndarray:
    converted = values.astype(backend.standardize_dtype(dtype))
    if not np.all(np.isfinite(converted)):
        raise SurgeryError(
            f"folding gives non-finite values for '{name}' in {dtype}; check the "
            "BN's moving variance and gamma, or fold a float32 copy of the model"
        )
    return converted
