"""Tap models: what a statistics pass measures, built on any copy of a model.

A `TapPlan` names the tensors a pass measures (layer outputs, layer inputs,
BatchNormalization inputs) in strings that survive pickling, so the driver
and every Ray actor resolve the same plan on their own copy of the model.
`tap_model` turns a plan's spots into one compiled model from the inputs to
a float64 (count, mean, M2) triple per tap (and, for a plan that counts
zeros, one of each tap's zero indicator), cached per model: tracing a tap
model's predict function costs more than streaming a few hundred samples
through it (2/3 of a ResNet50 pass over 256 samples at 32x32), so a second
pass over the same spots (another shard, a repeat) reuses it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import keras
from keras import backend, ops

from surgery.errors import SurgeryError
from surgery.graph.spots import Spot, find_spots, graph_of, walk_layers
from surgery.graph.taps import TapCollector, deep_graphs, tap_tensors
from surgery.numerics.moments import BatchMoments

AFTER, BEFORE, BN_INPUT = "after", "before", "bn_input"

# Tap models by model, then by what they tap. Weak keys: the cache never
# keeps a model alive. A graph changes identity when the model changes
# (a Sequential gets a new one), which invalidates its entries.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
PER_MODEL = 4  # tap models kept per model; the oldest goes first


@dataclass(frozen=True)
class TapPlan:
    """The tensors one statistics pass measures, by name.

    `taps` are `(side, spec)` pairs: `("after", "fc1")` is a layer's output
    and `("before", "fc2")` its input, as `activation_stats` resolves them;
    `("bn_input", "resnet50/conv1_bn")` is a BatchNormalization's input on
    its own axis, as `recalibrate_bn` measures it. With `batch_stats` the
    BNs of the `bn_input` taps normalise by the batch's own statistics (as
    in training) on the way to later taps.

    With `zeros` the pass also measures, in the same pass, the moments of
    each tap's indicator `x == 0` (1.0 where a value is exactly zero, else
    0.0): their `mean` is each unit's fraction of exact zeros over samples
    and positions (APoZ). A session's `moments(plan)` then returns the
    spots' moments followed by their indicators' moments, in the order of
    `results`.
    """

    taps: tuple[tuple[str, str], ...]
    batch_stats: bool = False
    zeros: bool = False

    @classmethod
    def of(cls, spots: list[Spot], zeros: bool = False) -> TapPlan:
        """The plan that measures `spots` (as `find_spots` resolved them),
        and with `zeros` their fractions of zeros too."""
        return cls(tuple((spot.side, spot.spec) for spot in spots), zeros=zeros)

    @classmethod
    def bn_inputs(cls, paths, batch_stats: bool = False) -> TapPlan:
        """The inputs of the BatchNormalization layers at `paths`."""
        return cls(tuple((BN_INPUT, path) for path in paths), batch_stats)

    def spots(self, model) -> list[Spot]:
        """The plan's spots in `model`, in the plan's order."""
        spots = []
        for side, spec in self.taps:
            if side == BN_INPUT:
                spots.append(bn_input_spot(model, spec))
            else:
                spots.extend(find_spots(model, **{side: [spec]}))
        return spots

    def results(self, spots: list[Spot]) -> list[Spot]:
        """The spot of each `Moments` a pass of this plan returns: every spot,
        then, with `zeros`, every spot again for its zero indicator."""
        return [*spots, *spots] if self.zeros else list(spots)

    def collector(self, spots: list[Spot]) -> TapCollector:
        """How the graph runs on the way to the taps."""
        return BatchStatsTaps(spots) if self.batch_stats else TapCollector(spots)


def bn_input_spot(model, path: str) -> Spot:
    """The input of the BatchNormalization at `path`, on the BN's own axis."""
    layer = dict(walk_layers(model)).get(path)
    if not isinstance(layer, keras.layers.BatchNormalization):
        raise SurgeryError(
            f"no BatchNormalization layer '{path}' in model '{model.name}'"
        )
    scope = tuple(path.split("/")[:-1])
    return Spot(path, BEFORE, scope, layer, None, layer.axis)


def spot_ident(spot: Spot) -> tuple:
    """What makes two spots the same tap, whichever call resolved them."""
    return (spot.side, spot.scope, id(spot.layer), spot.index, spot.axis)


def tap_units(tensor, spot: Spot) -> int:
    """The number of units at a tap, which must be fixed."""
    units = tensor.shape[spot.axis]
    if units is None:
        raise SurgeryError(
            f"'{spot.spec}' has no fixed number of units on axis {spot.axis}"
        )
    return int(units)


def moments_model(model, spots: list[Spot], collector=None, zeros: bool = False):
    """A model from `model`'s inputs to a (count, mean, M2) triple per tap.

    Returns it and the spot of each tap (a shared layer is tapped once per
    call site). `collector` (a `TapCollector`) decides how the graph runs
    on the way to the taps. With `zeros`, a triple of each tap's zero
    indicator (`zero_indicator`) follows the taps' own, in the same order.
    """
    inputs, taps = tap_tensors(model, spots, collector)
    for spot, tensor in taps:
        tap_units(tensor, spot)
    outputs = [BatchMoments(axis=spot.axis)(tensor) for spot, tensor in taps]
    if zeros:
        outputs += [
            BatchMoments(axis=spot.axis)(zero_indicator(tensor))
            for spot, tensor in taps
        ]
    with deep_graphs():
        tap_model = keras.Model(inputs, outputs)
    return tap_model, [spot for spot, _ in taps]


def zero_indicator(tensor):
    """1.0 where `tensor` is exactly zero, else 0.0, as float32 (exact)."""
    return ops.cast(ops.equal(tensor, 0), "float32")


def tap_model(model, plan: TapPlan) -> tuple[keras.Model, list[Spot], list[int]]:
    """The (cached) moments model of `plan` on `model`.

    Returns it, the spot of each result of the plan (`plan.results`) and,
    per tap, the index of its result.
    """
    spots = plan.spots(model)

    def build():
        return moments_model(model, spots, plan.collector(spots), plan.zeros)

    kind = ("moments", plan.batch_stats, plan.zeros)
    built, owners = cached(model, spots, kind, build)
    if plan.zeros:  # the indicators' taps follow, owned by the second copies
        owners = [*owners, *(j + len(spots) for j in owners)]
    return built, plan.results(spots), owners


def cached(model, spots: list[Spot], kind, build: Callable) -> tuple:
    """`build()`'s model for these spots of `model`, built once and kept.

    `build` returns a model and the spot of each of its taps; the answer is
    that model and, per tap, the index of its spot in `spots`. `kind` tells
    apart models built differently for the same spots.
    """
    graph = graph_of(model)  # a Sequential gets a new graph when it changes
    index = {spot_ident(spot): j for j, spot in enumerate(spots)}
    key = (kind, tuple(index))
    entries = _CACHE.setdefault(model, {})
    hit = entries.get(key)
    if hit is None or hit[0]() is not graph:
        built, taps = build()
        hit = (weakref.ref(graph), built, [spot_ident(s) for s in taps])
        entries.pop(key, None)
        while len(entries) >= PER_MODEL:
            entries.pop(next(iter(entries)))  # the oldest
        entries[key] = hit
    return hit[1], [index[ident] for ident in hit[2]]


class BatchStatsTaps(TapCollector):
    """Taps BN inputs while the tapped BNs normalise by batch statistics."""

    def __init__(self, spots):
        super().__init__(spots)
        self._norms = {id(s.layer): BatchStatsNorm(s.layer) for s in spots}

    def operation(self, op):
        norm = self._norms.get(id(op))
        if norm is None:
            return op
        return lambda x, *args, **kwargs: norm(x)


class BatchStatsNorm(keras.layers.Layer):
    """`bn` as in training, normalising by the batch's own moments, updating nothing.

    Unlike calling `bn(x, training=True)` this neither moves the moving
    statistics nor depends on `bn.trainable`.
    """

    def __init__(self, bn):
        super().__init__(dtype=bn.dtype_policy, name=f"{bn.name}_batch_stats")
        self._bn = bn

    def call(self, x):
        bn = self._bn
        x = ops.cast(x, backend.result_type(x.dtype, "float32"))
        axis = bn.axis % len(x.shape)
        mean, variance = ops.moments(x, [i for i in range(len(x.shape)) if i != axis])
        y = ops.batch_normalization(
            x,
            mean,
            variance,
            axis=axis,
            offset=ops.cast(bn.beta, x.dtype) if bn.center else None,
            scale=ops.cast(bn.gamma, x.dtype) if bn.scale else None,
            epsilon=bn.epsilon,
        )
        return ops.cast(y, self.compute_dtype)
