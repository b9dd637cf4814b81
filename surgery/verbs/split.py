"""`split` a model at a layer into trunk and head; `combine` them again.

The fast.ai workflow: cache the trunk's features once, work on the small
head (insert BN, fine-tune) using the cached features as data, then splice
the head back on. Both halves own copies of the weights.
"""

from __future__ import annotations

import keras
from keras import tree

from surgery.errors import SurgeryError
from surgery.graph.rewrite import copy_model
from surgery.graph.spots import find_spots, graph_of, nodes_of
from surgery.graph.taps import TapCollector, deep_graphs, run_graph


def split(model: keras.Model, at: str) -> tuple[keras.Model, keras.Model]:
    """`trunk` (inputs -> output of `at`) and `head` (that output -> outputs)."""
    spot = find_spots(model, after=[at])[0]
    if spot.scope:
        raise SurgeryError(
            f"split at '{at}': pick a layer of the outer model, not a nested one"
        )
    copy = copy_model(model)
    layer = copy.get_layer(spot.layer.name)
    cut = nodes_of(graph_of(copy), layer)[0].outputs[spot.index or 0]
    head_input = keras.Input(
        batch_shape=cut.shape, dtype=cut.dtype, name=f"{at}_features"
    )
    outputs = run_graph(copy, None, TapCollector([]), start={id(cut): head_input})
    struct = graph_of(copy)._outputs_struct
    with deep_graphs():
        trunk = keras.Model(copy.inputs, cut, name=f"{model.name}_trunk")
        head = keras.Model(
            head_input,
            tree.pack_sequence_as(struct, outputs),
            name=f"{model.name}_head",
        )
    return trunk, head


def combine(
    trunk: keras.Model, head: keras.Model, name: str | None = None
) -> keras.Model:
    """The model `head(trunk(x))`, with the head nested as one layer."""
    if len(trunk.outputs) != 1 or len(head.inputs) != 1:
        raise SurgeryError(
            "combine needs a trunk with one output and a head with one input"
        )
    if tuple(trunk.outputs[0].shape[1:]) != tuple(head.inputs[0].shape[1:]):
        raise SurgeryError(
            f"trunk output {trunk.outputs[0].shape} does not fit head input "
            f"{head.inputs[0].shape}"
        )
    inputs = graph_of(trunk)._inputs_struct
    name = name or trunk.name.removesuffix("_trunk")
    with deep_graphs():
        return keras.Model(inputs, head(trunk.outputs[0]), name=name)
