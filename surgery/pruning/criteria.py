"""Which channels to prune: scores per channel, and the constant channels.

Every criterion scores the channels of a group (see
`surgery.pruning.groups`), lowest first to go:
- `"l1"`, `"l2"`: the norm of each channel's slice of every producer's
  kernel, summed over the producers.
- `"bn_scale"`: |gamma| of every BatchNormalization the channel passes,
  summed (a group that passes none cannot be scored).
- `"apoz"`: the average percentage of zeros the layers that read the
  channel see, over the data (higher goes first).
Statistics come from one streaming pass over the data, measured at the
input of every layer that reads a candidate channel (a Dense or
convolution): the float64 moments of `activation_stats` and, for APoZ, the
fraction of exact zeros. A channel whose variance is 0 at every such input
is constant there; `constant_shifts` says what removing it adds to each
reader's bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from surgery.engines.choose import as_engine
from surgery.graph.spots import find_spots
from surgery.graph.tap_models import TapPlan
from surgery.numerics.moments import Moments
from surgery.pruning.flow import ChannelFlow, Use
from surgery.pruning.slicing import weight_name

READERS = ("dense", "conv", "transpose", "separable")  # kinds where a channel ends
RANKED = ("l1", "l2", "bn_scale", "apoz")
CONSTANT = ("dead", "constant")
CRITERIA = (*CONSTANT, *RANKED)


@dataclass(eq=False)
class Measured:
    """What one pass measured at each reader's input, by the reader's path."""

    moments: dict[str, Moments]
    zeros: dict[str, Moments]  # mean = the fraction of exact zeros; APoZ only


def readers_of(flow: ChannelFlow, roots) -> list[Use]:
    """The layers where the channel classes `roots` end (Dense, convolutions)."""
    found: dict[int, Use] = {}
    for root in roots:
        for use, _ in flow.readers.get(int(root), ()):
            if use.kind in READERS:
                found.setdefault(id(use.layer), use)
    return list(found.values())


def measure(
    model, readers: list[Use], data, zeros: bool, engine=None, **stream
) -> Measured:
    """The moments (and zero fractions) at every reader's input, in one pass."""
    paths = [use.path for use in readers]
    spots = find_spots(model, before=paths)
    plan = TapPlan(TapPlan.of(spots).taps, zeros=True) if zeros else TapPlan.of(spots)
    with as_engine(engine).session(model, data, **stream) as session:
        result, _ = session.moments(plan)
    n = len(spots)
    return Measured(
        dict(zip(paths, result[:n], strict=True)),
        dict(zip(paths, result[n:], strict=True)) if zeros else {},
    )


def constant_roots(flow: ChannelFlow, measured: Measured, roots, readers) -> dict:
    """Of `roots`, those constant at every reader: root -> True if always 0."""
    variable: set[int] = set()
    nonzero: set[int] = set()
    seen: set[int] = set()
    for use in readers:
        m = measured.moments[use.path]
        classes = flow.atoms.find(use.inputs[0])
        for cls, var, mean in zip(
            classes.tolist(), m.var.tolist(), m.mean.tolist(), strict=True
        ):
            seen.add(cls)
            if var != 0:
                variable.add(cls)
            elif mean != 0:
                nonzero.add(cls)
    return {
        int(r): int(r) not in nonzero
        for r in roots
        if int(r) in seen and int(r) not in variable
    }


def foldable(use: Use, always_zero: bool) -> bool:
    """Whether a constant input channel of `use` moves exactly into its bias.

    A Dense always can; a convolution when it pads nothing (with padding,
    the border sees zeros instead of the constant); a zero channel always.
    """
    if always_zero or use.kind == "dense":
        return True
    if use.kind in ("conv", "separable"):
        return use.layer.padding == "valid"
    return False


def constant_shifts(flow: ChannelFlow, measured: Measured, removed, readers) -> dict:
    """What each reader's bias gains when the constant classes `removed` go.

    Float64 sums of each removed input's constant value times the weights
    that read it, keyed by the reader's path (readers that gain 0 are left out).
    """
    removed = np.fromiter(removed, np.int64)
    shifts = {}
    for use in readers:
        gone = np.isin(flow.atoms.find(use.inputs[0]), removed)
        values = np.where(gone, measured.moments[use.path].mean, 0.0)
        if not values.any():
            continue
        shifts[use.path] = _contribution(use, values)
    return shifts


def _contribution(use: Use, values: np.ndarray) -> np.ndarray:
    weights = {
        weight_name(v): np.asarray(w, np.float64)
        for v, w in zip(use.layer.weights, use.layer.get_weights(), strict=True)
    }
    if use.kind == "dense":
        return values @ weights["kernel"]
    if use.kind == "conv":
        kernel = weights["kernel"]
        summed = kernel.reshape(-1, *kernel.shape[-2:]).sum(axis=0)
        return values @ summed
    depthwise = weights["depthwise_kernel"]  # separable: (*k, in, m)
    per_depth = depthwise.reshape(-1, *depthwise.shape[-2:]).sum(axis=0)
    depth_values = (values[:, None] * per_depth).reshape(-1)
    pointwise = weights["pointwise_kernel"]
    return depth_values @ pointwise.reshape(-1, pointwise.shape[-1])


def scores(flow: ChannelFlow, group, criterion: str, measured: Measured | None):
    """Each channel's score in `group` (lowest goes first), or None if none."""
    if criterion in ("l1", "l2"):
        order = 1 if criterion == "l1" else 2
        total = np.zeros(group.size)
        for producer in group.producers:
            use = flow.by_path.get(producer)
            if use is None:
                return None
            kernel = _out_major(use)[group.channels[producer]]
            total += np.linalg.norm(kernel.reshape(group.size, -1), ord=order, axis=1)
        return total
    if criterion == "bn_scale":
        return _bn_scale(flow, group)
    return _apoz(flow, group, measured)


def _out_major(use: Use) -> np.ndarray:
    """The producer's kernel with its output channels on the first axis."""
    names = [weight_name(v) for v in use.layer.weights]
    values = use.layer.get_weights()
    if use.kind == "embedding":
        return np.moveaxis(values[names.index("embeddings")], -1, 0)
    if use.kind == "separable":
        return np.moveaxis(values[names.index("pointwise_kernel")], -1, 0)
    kernel = values[names.index("kernel")]
    return np.moveaxis(kernel, -2 if use.kind == "transpose" else -1, 0)


def _bn_scale(flow, group) -> np.ndarray | None:
    total = np.zeros(group.size)
    found = False
    position = {int(r): k for k, r in enumerate(group.roots.tolist())}
    for use in flow.uses.values():
        layer = use.layer
        if not isinstance(layer, keras.layers.BatchNormalization) or not layer.scale:
            continue
        classes = flow.atoms.find(use.inputs[0]).tolist()
        gamma = np.abs(np.asarray(layer.get_weights()[0], np.float64))
        for cls, g in zip(classes, gamma.tolist(), strict=True):
            if cls in position:
                total[position[cls]] += g
                found = True
    return total if found else None


def _apoz(flow, group, measured) -> np.ndarray | None:
    position = {int(r): k for k, r in enumerate(group.roots.tolist())}
    total, count = np.zeros(group.size), np.zeros(group.size)
    for path, zeros in measured.zeros.items():
        use = flow.by_path[path]
        classes = flow.atoms.find(use.inputs[0]).tolist()
        for cls, fraction in zip(classes, zeros.mean.tolist(), strict=True):
            if cls in position:
                total[position[cls]] += fraction
                count[position[cls]] += 1
    if not count.any():
        return None
    # more zeros goes first: negate, and a channel no reader saw stays
    return np.where(count > 0, -total / np.maximum(count, 1), np.inf)
