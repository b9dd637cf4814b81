"""How channels flow through a model: which layers make, carry and read them.

`trace_channels(model)` walks the graph node by node, nested models
included, and gives every tensor the atoms on its channel axis (see
`surgery.pruning.atoms`). It records a `Use` for every layer whose weights or
config depend on the channels it reads or makes, so that deleting channels
knows what to slice. A layer it does not know, or one it knows but cannot
follow here (a grouped convolution, a Dense reading a non-channel axis, a
free spatial size before a Flatten), fixes the channels it reads, with the
reason, and makes fixed channels of its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import keras
import numpy as np
from keras import tree

from surgery.graph.spots import calls_in_order, graph_of, is_graph_model, walk_layers
from surgery.pruning.atoms import Atoms
from surgery.pruning.layer_kinds import (
    CONV,
    DEPTHWISE,
    ELEMENTWISE_OPS,
    GLOBAL,
    MERGE,
    NORMS,
    SEPARABLE,
    SPATIAL,
    TRANSPOSE,
    channel_axis,
    is_elementwise,
    is_layer_scale,
    is_scaled_sum,
    mixes,
    norm_axis,
)

L = keras.layers


@dataclass(eq=False)
class Channels:
    """The atoms on one tensor's channel axis (`None`: not known here)."""

    atoms: np.ndarray | None
    axis: int  # counted from 0, the batch axis included


@dataclass(eq=False)
class Use:
    """A layer whose weights or config depend on its channels, at its first call.

    `kind` says how its weights are sliced: "dense", "conv", "transpose",
    "separable", "depthwise", "grouped" (a convolution with one group per
    input channel), "embedding", "norm", "prelu" or "reshape".
    `inputs` and `outputs` are the atoms it reads and writes on their
    channel axes.
    """

    path: str
    layer: keras.layers.Layer
    kind: str
    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    detail: dict = field(default_factory=dict)


@dataclass(eq=False)
class ChannelFlow:
    """The result of one walk: the atoms and the layers that use them."""

    atoms: Atoms
    uses: dict[int, Use]  # by id(layer), in walk order
    readers: dict[int, list[tuple[Use, int]]]  # atom class -> (use, input k)
    outputs: dict[str, np.ndarray | None]  # layer path -> its first output's atoms
    order: dict[str, int]  # layer path -> its place in the model's layer order

    @functools.cached_property
    def by_path(self) -> dict[str, Use]:
        """The uses by layer path."""
        return {use.path: use for use in self.uses.values()}


def trace_channels(model: keras.Model) -> ChannelFlow:
    """Walk `model` and return its channel flow (see the module docstring)."""
    return _Walker().run(model)


class _Walker:
    def __init__(self):
        self.atoms = Atoms()
        self.uses: dict[int, Use] = {}
        self.outputs: dict[str, np.ndarray | None] = {}

    def run(self, model) -> ChannelFlow:
        graph = graph_of(model)
        inputs = []
        for tensor in graph.inputs:
            name = tensor._keras_history.operation.name
            channels = self._fresh(tensor, name)
            self.atoms.fix(channels.atoms, f"it is model input '{name}'")
            self.outputs[name] = channels.atoms
            inputs.append(channels)
        for tensor, channels in zip(
            graph.outputs, self._walk(graph, inputs, ""), strict=True
        ):
            name = tensor._keras_history.operation.name
            self._fix(channels, f"it reaches model output '{name}'")
        order = {path: k for k, (path, _) in enumerate(walk_layers(model))}
        return ChannelFlow(self.atoms, self.uses, self._readers(), self.outputs, order)

    def _readers(self) -> dict:
        readers: dict[int, list] = {}
        for use in self.uses.values():
            for k, atoms in enumerate(use.inputs):
                for root in set(self.atoms.find(atoms).tolist()):
                    readers.setdefault(root, []).append((use, k))
        return readers

    def _walk(self, graph, inputs: list[Channels], prefix: str) -> list[Channels]:
        tensors = {id(t): c for t, c in zip(graph.inputs, inputs, strict=True)}
        for node in calls_in_order(graph):
            op = node.operation
            ins = [tensors[id(t)] for t in node.input_tensors]
            path = prefix + op.name
            if is_graph_model(op):
                outs = self._walk(graph_of(op), ins, path + "/")
            else:
                outs = self._layer(path, op, node, ins)
            for tensor, channels in zip(node.outputs, outs, strict=True):
                tensors[id(tensor)] = channels
            if outs:
                self.outputs.setdefault(path, outs[0].atoms)
        return [tensors[id(t)] for t in graph.outputs]

    # -- helpers ------------------------------------------------------------

    def _fresh(self, tensor, producer: str, axis: int | None = None) -> Channels:
        rank = len(tensor.shape)
        axis = rank - 1 if axis is None else axis
        units = tensor.shape[axis] if rank > 1 else None
        if units is None:
            return Channels(None, axis)
        return Channels(self.atoms.new(int(units), producer), axis)

    def _all_fixed(self, channels: Channels) -> bool:
        fixed = self.atoms.fixed
        return len(channels.atoms) > 0 and all(
            a in fixed for a in channels.atoms.tolist()
        )

    def _fix(self, channels: Channels, reason: str) -> None:
        if channels.atoms is not None:
            self.atoms.fix(channels.atoms, reason)

    def _opaque(self, path, op, node, ins, why: str | None = None) -> list[Channels]:
        """Fix what `op` reads; its outputs are channels of its own, fixed."""
        kind = type(op).__name__
        reason = why or f"{kind} '{path}' is a layer channel pruning cannot follow"
        for channels in ins:
            self._fix(channels, reason)
        outs = [self._fresh(t, path) for t in node.outputs]
        for channels in outs:
            self._fix(channels, f"{kind} '{path}' made it, and cannot be followed")
        return outs

    def _use(self, path, layer, kind, ins: list[Channels], make, **detail):
        """Record (or re-join, for a shared layer) a use; return its outputs."""
        atoms = [c.atoms for c in ins]
        old = self.uses.get(id(layer))
        if old is None:
            outputs = make()
            self.uses[id(layer)] = Use(path, layer, kind, atoms, outputs, detail)
            return outputs
        for a, b in zip(old.inputs, atoms, strict=True):
            self.atoms.join(a, b)
        return old.outputs

    def _layer(self, path, op, node, ins: list[Channels]) -> list[Channels]:
        if not isinstance(op, keras.layers.Layer):
            return self._operation(path, op, node, ins)
        x = ins[0] if ins else None
        unknown = [c for c in ins if c.atoms is None]
        if unknown and not isinstance(op, L.Embedding):
            return self._opaque(
                path,
                op,
                node,
                ins,
                f"the channels '{path}' reads are not fixed in number",
            )
        rank = len(node.input_tensors[0].shape) if ins else 0
        axis = channel_axis(op, rank)
        if (
            x is not None
            and x.atoms is not None
            and x.axis != axis
            and self._all_fixed(x)
        ):
            # fixed channels (a model input) read on another axis: fixed there too
            reason = self.atoms.fixed[int(x.atoms[0])]
            x = self._fresh(node.input_tensors[0], path, axis)
            self._fix(x, reason)
            ins = [x, *ins[1:]]
            if x.atoms is None:
                return self._opaque(path, op, node, ins)
        if (
            isinstance(op, L.Dense)
            and x.axis == rank - 1
            and op.quantization_mode is None
        ):
            out = self._use(
                path, op, "dense", ins, lambda: [self.atoms.new(op.units, path)]
            )
            return [Channels(out[0], rank - 1)]
        if isinstance(op, CONV + TRANSPOSE + SEPARABLE) and x.axis == axis:
            groups = getattr(op, "groups", 1)
            if groups != 1 and groups == len(x.atoms) and op.filters % groups == 0:
                m = op.filters // groups  # one group per channel: a depthwise conv
                self._use(path, op, "grouped", ins, lambda: [np.repeat(x.atoms, m)])
                return [Channels(np.repeat(x.atoms, m), axis)]
            if groups != 1:
                return self._opaque(
                    path, op, node, ins, f"'{path}' is a grouped convolution"
                )
            kind = (
                "conv"
                if isinstance(op, CONV)
                else "transpose"
                if isinstance(op, TRANSPOSE)
                else "separable"
            )
            out = self._use(
                path, op, kind, ins, lambda: [self.atoms.new(op.filters, path)]
            )
            return [Channels(out[0], axis)]
        if isinstance(op, DEPTHWISE) and x.axis == axis:
            m = op.depth_multiplier
            self._use(path, op, "depthwise", ins, lambda: [np.repeat(x.atoms, m)])
            return [Channels(np.repeat(x.atoms, m), axis)]
        if isinstance(op, L.Embedding) and op.quantization_mode is None:
            out = self._use(
                path, op, "embedding", [], lambda: [self.atoms.new(op.output_dim, path)]
            )
            return [Channels(out[0], len(node.outputs[0].shape) - 1)]
        if is_layer_scale(op) and x.axis == rank - 1:
            make = lambda: [x.atoms]  # noqa: E731
            self._use(path, op, "norm", ins, make, size="projection_dim")
            return [Channels(x.atoms, x.axis)]
        if isinstance(op, NORMS) and norm_axis(op, rank) == x.axis:
            if isinstance(op, L.LayerNormalization):
                self.atoms.mix(x.atoms, path)
            self._use(path, op, "norm", ins, lambda: [x.atoms])
            return [Channels(x.atoms, x.axis)]
        if isinstance(op, L.PReLU):
            self._use(path, op, "prelu", ins, lambda: [x.atoms], axis=x.axis)
            return [Channels(x.atoms, x.axis)]
        if is_elementwise(op):
            if mixes(op):
                self.atoms.mix(x.atoms, path)
            return [Channels(x.atoms, x.axis)]
        if isinstance(op, SPATIAL) and x.axis == axis:
            return [Channels(x.atoms, x.axis)]
        if isinstance(op, GLOBAL) and x.axis == axis:
            out_axis = x.axis if op.keepdims else 1
            return [Channels(x.atoms, out_axis)]
        if isinstance(op, MERGE) or is_scaled_sum(op):
            return self._merge(path, op, node, ins)
        if isinstance(op, L.Concatenate):
            if all(c.axis == op.axis % rank for c in ins):
                return [Channels(np.concatenate([c.atoms for c in ins]), ins[0].axis)]
            return self._merge(path, op, node, ins)
        if isinstance(op, (L.Flatten, L.Reshape)):
            return self._reshape(path, op, node, x)
        return self._opaque(path, op, node, ins)

    def _operation(self, path, op, node, ins) -> list[Channels]:
        """A `keras.ops` call in the graph (`x + 3.0`, `ops.relu(x)`)."""
        name = type(op).__name__
        others = [
            a
            for a in tree.flatten((node.arguments.args, node.arguments.kwargs))
            if not isinstance(a, keras.KerasTensor)
        ]
        scalars = all(a is None or isinstance(a, (int, float, bool)) for a in others)
        if name not in ELEMENTWISE_OPS or not scalars or len(node.outputs) != 1:
            return self._opaque(path, op, node, ins)
        if any(c.atoms is None for c in ins):
            return self._opaque(path, op, node, ins)
        if len(ins) == 1:
            return [Channels(ins[0].atoms, ins[0].axis)]
        return self._merge(path, op, node, ins)

    def _merge(self, path, op, node, ins) -> list[Channels]:
        """Channels meeting element by element are one channel from here on."""
        if (
            len({c.axis for c in ins}) != 1
            or len({len(t.shape) for t in node.input_tensors}) != 1
        ):
            return self._opaque(
                path, op, node, ins, f"'{path}' broadcasts across ranks"
            )
        widest = max(ins, key=lambda c: len(c.atoms))
        for channels in ins:
            if len(channels.atoms) == len(widest.atoms):
                self.atoms.join(widest.atoms, channels.atoms)
            else:
                self._fix(channels, f"'{path}' broadcasts it over other channels")
        return [Channels(widest.atoms, widest.axis)]

    def _reshape(self, path, op, node, x: Channels) -> list[Channels]:
        """A Flatten or Reshape: where each channel's values land."""
        shape = tuple(node.input_tensors[0].shape[1:])
        out_shape = tuple(node.outputs[0].shape[1:])
        if None in shape or None in out_shape:
            return self._opaque(path, op, node, [x], f"'{path}' reshapes a free size")
        grid = np.broadcast_to(
            np.expand_dims(
                x.atoms, tuple(i for i in range(len(shape)) if i != x.axis - 1)
            ),
            shape,
        )
        if (
            isinstance(op, L.Flatten)
            and op.data_format == "channels_first"
            and len(shape) > 1
        ):
            grid = np.moveaxis(grid, 0, -1)
        if isinstance(op, L.Flatten) or len(out_shape) == 1:
            flat = np.ascontiguousarray(grid).reshape(-1)
            if isinstance(op, L.Reshape):
                self._use(path, op, "reshape", [x], lambda: [flat], last=False)
            return [Channels(flat, 1)]
        rows = np.ascontiguousarray(grid).reshape(-1, out_shape[-1])
        per_column = rows[0]
        if not (rows == per_column).all():
            return self._opaque(
                path, op, node, [x], f"'{path}' moves channels off the last axis"
            )
        self._use(path, op, "reshape", [x], lambda: [per_column], last=True)
        return [Channels(per_column, len(out_shape))]
