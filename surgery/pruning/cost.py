"""Parameters and FLOPs of a model, per layer and in total: the numbers of a pruning report.

FLOPs count per sample (the batch axis excluded), from each call's static
shapes: twice the multiply-adds of Dense and of every convolution (grouped,
transposed, depthwise, separable), plus one add per output element for a
bias, plus a multiply and an add per element for BatchNormalization at
inference. Every other layer counts 0 (activations, pooling, adds,
normalisations other than BatchNormalization, and layers wrapped in another
layer, such as `TimeDistributed(Conv2D)`).

The shapes come from walking the model's graph node by node, nested models
included, and asking each layer for the shape of its output
(`compute_output_spec`), which adds no call to the model's layers. The walk
starts from the model's own input shapes, or from shapes the caller gives
when the model takes images of any size, so a nested backbone built for
free sizes is counted at the size its outer model calls it with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import keras
from keras import tree

from surgery.errors import SurgeryError
from surgery.graph.spots import calls_in_order, graph_of, is_graph_model, walk_layers
from surgery.graph.taps import flatten_inputs
from surgery.pruning.layer_kinds import CONV, DEPTHWISE, SEPARABLE, TRANSPOSE

L = keras.layers
COUNTED = (L.Dense, *CONV, *TRANSPOSE, *DEPTHWISE, *SEPARABLE)


@dataclass(frozen=True)
class Cost:
    """What a model costs: its weights, and the FLOPs of one sample through it.

    Attributes:
        params: The number of weight values, trainable and not, each
            variable counted once however many layers share it (what
            `model.count_params()` says).
        flops: Floating-point operations for one sample (see the module's
            docstring for what counts), or None when a shape they need is
            unknown (an image size the model leaves free and no
            `input_shapes` gave).
        per_layer: `(params, flops)` of every layer by path (`"block1/conv"`
            for a layer of the nested model `block1`), in the order of
            `surgery.graph.spots.walk_layers`. A layer called more than once
            counts its FLOPs once per call; flops is None where unknown. A
            layer found under two paths (inside a nested model and outside
            it) is listed under each, its weights counted once in `params`.
    """

    params: int
    flops: int | None
    per_layer: dict[str, tuple[int, int | None]]


def model_cost(model: keras.Model, input_shapes: Sequence | None = None) -> Cost:
    """The parameters and per-sample FLOPs of `model`, in total and per layer.

    Args:
        model: A Functional or Sequential Keras model; nested models and
            shared layers are counted call by call.
        input_shapes: The shape of one sample of each model input, without
            the batch axis (`[(224, 224, 3)]`), for a model whose inputs leave
            sizes free; a single shape stands for the only input, and None
            in a shape for the input's own size. None: the model's own input
            shapes.

    Returns:
        A `Cost`. Its `flops` is None when some counted layer's shape stays
        unknown.

    Raises:
        SurgeryError: `model` has no graph (a subclassed model), or
            `input_shapes` does not give one shape per input that fits it.

    Example:

    ```python
    import keras
    from surgery.pruning.cost import model_cost

    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    model = keras.Model(inputs, outputs)
    cost = model_cost(model, input_shapes=[(32, 32, 3)])
    print(cost.params, cost.flops)  # 224 450560
    print(model_cost(model).flops)  # None
    ```
    """
    graph = graph_of(model)
    calls: dict[str, list[int | None]] = {}
    trace(model, start_specs(graph, input_shapes), "", calls)
    per_layer, seen = {}, {}
    for path, op in walk_layers(model):
        if is_graph_model(op) or isinstance(op, L.InputLayer):
            continue
        weights = list(getattr(op, "weights", []))
        seen.update((id(w), w) for w in weights)
        flops = calls.get(path, [])
        total = None if None in flops else sum(flops)
        per_layer[path] = (sum(math.prod(w.shape) for w in weights), total)
    flops = [f for _, f in per_layer.values()]
    return Cost(
        params=sum(math.prod(w.shape) for w in seen.values()),
        flops=None if None in flops else sum(flops),
        per_layer=per_layer,
    )


def start_specs(graph: keras.Model, input_shapes: Sequence | None) -> list:
    """The tensors a cost walk starts from: the graph's inputs, or new ones of
    the given per-sample shapes (checked against the inputs)."""
    if input_shapes is None:
        return list(graph.inputs)
    shapes = list(input_shapes)
    if shapes and all(isinstance(d, int) or d is None for d in shapes):
        shapes = [shapes]  # one shape for the only input
    if len(shapes) != len(graph.inputs):
        raise SurgeryError(
            f"input_shapes gives {len(shapes)} shape(s) for the "
            f"{len(graph.inputs)} input(s) of model '{graph.name}'; give one per "
            "input, without the batch axis"
        )
    specs = []
    for i, (tensor, shape) in enumerate(zip(graph.inputs, shapes, strict=True)):
        shape, own = tuple(shape), tuple(tensor.shape[1:])
        fits = len(shape) == len(own) and all(
            d is None or (isinstance(d, int) and d > 0 and w in (None, d))
            for d, w in zip(shape, own, strict=True)
        )
        if not fits:
            raise SurgeryError(
                f"input_shapes {shape} does not fit input {i} of model "
                f"'{graph.name}', of shape {own} without the batch axis; give "
                "positive sizes where it has None and its own sizes elsewhere"
            )
        sizes = tuple(w if d is None else d for d, w in zip(shape, own, strict=True))
        specs.append(keras.KerasTensor((None, *sizes), dtype=tensor.dtype))
    return specs


def trace(model, inputs: list, prefix: str, calls: dict) -> list:
    """Walk `model`'s graph from `inputs`, appending each call's FLOPs to
    `calls[path]`; returns the tensors of the graph's outputs."""
    graph = graph_of(model)
    tensors = {id(t): new for t, new in zip(graph.inputs, inputs, strict=True)}
    for node in calls_in_order(graph):
        op = node.operation
        args, kwargs = node.arguments.fill_in(tensors)
        if is_graph_model(op):
            inner = flatten_inputs(op, args[0])
            outputs = trace(op, inner, f"{prefix}{op.name}/", calls)
        else:
            outputs = output_specs(op, node, args, kwargs)
            flat_in = [tensors[id(t)] for t in node.input_tensors]
            calls.setdefault(prefix + op.name, []).append(
                call_flops(op, flat_in, outputs)
            )
        for old, new in zip(node.outputs, outputs, strict=True):
            tensors[id(old)] = new
    return [tensors[id(t)] for t in graph.outputs]


def output_specs(op, node, args, kwargs) -> list:
    """The outputs of `op` on `args`, shapes only, adding no node to `op`.

    Should a layer not say (its shape inference wants more than the call's
    arguments, such as a mask), the graph's own output tensors stand in:
    the same shapes when the walk starts from the model's inputs, at worst
    unknown sizes, and so flops None, after new ones.
    """
    try:
        return list(tree.flatten(op.compute_output_spec(*args, **kwargs)))
    except Exception:
        return list(node.outputs)


def call_flops(layer, inputs: Sequence, outputs: Sequence) -> int | None:
    """The FLOPs of one call of `layer` for one sample.

    Args:
        layer: The layer (or other operation) called.
        inputs: The call's input tensors (anything with a `.shape` whose
            first axis is the batch).
        outputs: The call's output tensors, likewise.

    Returns:
        Twice the multiply-adds plus the bias adds of a Dense or
        convolution, two per output element for BatchNormalization, 0 for
        any other layer; None when a size they need is unknown.

    Example:

    ```python
    import keras
    from surgery.pruning.cost import call_flops

    dense = keras.layers.Dense(4)
    x = keras.KerasTensor((None, 3))
    print(call_flops(dense, [x], [dense.compute_output_spec(x)]))  # 28
    ```
    """
    if isinstance(layer, L.BatchNormalization):
        return product(2, *outputs[0].shape[1:])
    if not isinstance(layer, COUNTED):
        return 0
    macs = multiply_adds(layer, tuple(inputs[0].shape[1:]), tuple(outputs[0].shape[1:]))
    bias = product(*outputs[0].shape[1:]) if layer.use_bias else 0
    return None if macs is None or bias is None else 2 * macs + bias


def multiply_adds(layer, x: tuple, y: tuple) -> int | None:
    """The multiply-adds of a Dense or convolution `layer` from per-sample
    input shape `x` to output shape `y` (None when a size is unknown)."""
    if isinstance(layer, L.Dense):
        return product(*y[:-1], x[-1], layer.units)
    axis = 0 if layer.data_format == "channels_first" else len(x) - 1
    taps = math.prod(layer.kernel_size)
    channels = x[axis]
    if isinstance(layer, SEPARABLE):
        middle = product(channels, layer.depth_multiplier)
        return product(*positions(y, axis), middle, taps + layer.filters)
    if isinstance(layer, DEPTHWISE):
        return product(*positions(y, axis), channels, layer.depth_multiplier, taps)
    if isinstance(layer, TRANSPOSE):
        return product(*positions(x, axis), channels, taps, layer.filters)
    per_group = None if channels is None else channels // layer.groups
    return product(*positions(y, axis), layer.filters, taps, per_group)


def positions(shape: tuple, axis: int) -> tuple:
    """The sizes of a per-sample shape but its channel axis."""
    return shape[:axis] + shape[axis + 1 :]


def product(*factors) -> int | None:
    """The product of `factors` as an int, or None if one is None."""
    if any(f is None for f in factors):
        return None
    return math.prod(int(f) for f in factors)
