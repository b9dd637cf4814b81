"""`channel_groups`: which layers' channels must be removed together."""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np

from surgery.pruning.flow import ChannelFlow, trace_channels


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels that can only be removed together, from every layer they touch.

    Channel `k` of the group is channel `channels[p][k]` of every producer
    `p`: the output channels of a convolution feeding a residual `Add`, and
    those of the convolution on the other branch, form one group.

    Attributes:
        producers: Paths of the layers that make the group's channels (their
            `units` or `filters`), or of the model input that does.
        layers: Paths of every layer whose weights or config change when a
            channel of the group goes: the producers, the per-channel layers
            (BatchNormalization, depthwise convolutions, PReLU), the layers
            that read the channels (the next Dense or convolution) and the
            Reshapes they pass.
        size: The number of channels in the group.
        channels: For each producer, its output channel of each group channel.
        fixed: Why no channel of the group can be removed (it reaches a
            model output, or a layer that channel pruning cannot follow
            reads it), or `None` when every channel can.
        removable: For each channel, whether it can be removed.
        mixed: A layer that mixes the group's channels (a LayerNormalization,
            a softmax): removing one changes the others' values there, so a
            dead or constant channel is not removed exactly. `None` if none.
        roots: Each channel's identity in the traced channel flow (what
            `prune_channels` and `delete_channels` remove by).
    """

    producers: tuple[str, ...]
    layers: tuple[str, ...]
    size: int
    channels: dict[str, np.ndarray]
    fixed: str | None
    removable: np.ndarray
    mixed: str | None
    roots: np.ndarray = field(repr=False)  # each channel's atom class

    def __str__(self) -> str:
        head = " + ".join(self.producers)
        state = (
            f"fixed: {self.fixed}"
            if self.fixed
            else f"{int(self.removable.sum())} removable"
        )
        return (
            f"{head}: {self.size} channels ({state}); layers: {', '.join(self.layers)}"
        )


def channel_groups(model: keras.Model) -> list[ChannelGroup]:
    """The coupled channel groups of `model`, in the order the graph makes them.

    Channels are coupled when removing one from a layer forces removing it
    elsewhere: the inputs of an `Add`, `Subtract`, `Multiply`, `Maximum`,
    `Minimum` or `Average` (residual connections, squeeze-and-excite
    scales), a `BatchNormalization` or depthwise convolution and the layer
    before it, a shared layer's calls, the offsets inside a `Concatenate`,
    and the positions a `Flatten` or `Reshape` spreads a channel over.
    Nested models are followed inside. Every channel a model input makes,
    that reaches a model output, or that a layer channel pruning does not
    follow reads (a recurrent layer, a grouped convolution, a `Lambda`), is
    fixed, and the group says why.

    Args:
        model: A Functional or Sequential `keras.Model` (a subclassed one
            goes through `surgery.functional` first).

    Returns:
        A list of `ChannelGroup`, one per set of producers, in graph order.

    Raises:
        SurgeryError: the model is subclassed, or a Sequential model without
            an input shape.

    Example:

    ```python
    import keras
    import surgery

    x = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(16, 3, padding="same", name="a")(x)
    b = keras.layers.Conv2D(16, 1, name="b")(x)
    y = keras.layers.Add(name="add")([a, b])
    y = keras.layers.Conv2D(4, 3, name="c")(y)
    model = keras.Model(x, y)
    for group in surgery.channel_groups(model):
        print(group.producers, group.size, group.fixed is None)
    # ('input_layer',) 3 False
    # ('a', 'b') 16 True
    # ('c',) 4 False
    ```
    """
    return groups_of(trace_channels(model))


def groups_of(flow: ChannelFlow) -> list[ChannelGroup]:
    """The channel groups of a traced flow."""
    atoms = flow.atoms
    classes = atoms.classes()
    fixed = atoms.class_reasons(atoms.fixed)
    mixed = atoms.class_reasons(atoms.mixed)
    by_producers: dict[tuple, list[int]] = {}
    for root, members in classes.items():
        producers = tuple(
            sorted({atoms.producer[a] for a in members}, key=flow.order.get)
        )
        by_producers.setdefault(producers, []).append(root)
    touched = _layers_by_root(flow)
    starts = _producer_starts(atoms)
    groups = []
    for producers, roots in sorted(by_producers.items(), key=lambda kv: min(kv[1])):
        roots = np.array(sorted(roots), np.int64)
        members = {r: classes[int(r)] for r in roots}
        channels = {
            p: np.array(
                [
                    min(a for a in members[r] if atoms.producer[a] == p) - starts[p]
                    for r in roots
                ],
                np.int64,
            )
            for p in producers
        }
        removable = np.array([int(r) not in fixed for r in roots])
        layers = list(producers)
        for r in roots.tolist():
            layers.extend(p for p in touched.get(r, ()) if p not in layers)
        reason = None if removable.any() else fixed[int(roots[0])]
        mix = next((mixed[int(r)] for r in roots if int(r) in mixed), None)
        groups.append(
            ChannelGroup(
                producers,
                tuple(layers),
                len(roots),
                channels,
                reason,
                removable,
                mix,
                roots,
            )
        )
    return groups


def _layers_by_root(flow: ChannelFlow) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for use in flow.uses.values():
        for atoms in [*use.inputs, *use.outputs]:
            for root in set(flow.atoms.find(atoms).tolist()):
                paths = out.setdefault(root, [])
                if use.path not in paths:
                    paths.append(use.path)
    return out


def _producer_starts(atoms) -> dict[str, int]:
    starts: dict[str, int] = {}
    for atom, producer in enumerate(atoms.producer):
        starts.setdefault(producer, atom)
    return starts
