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
    """Split `model` after layer `at` into a trunk and a head.

    The trunk maps the model's inputs to the output of `at`; the head maps
    that output to the model's outputs, so `head(trunk(x))` computes what
    `model(x)` does. This is the fast.ai workflow: cache the trunk's features
    once (`cache_features`), work on the small head (insert BN, fine-tune)
    with the cached features as data, then splice it back with `combine`.
    Both halves own copies of the weights; `model` is not modified.

    Args:
        model: The Functional or Sequential `keras.Model` to split. A
            subclassed model has no graph to cut: trace it with
            `surgery.functional` first.
        at: The name of the layer whose output becomes the cut: a layer of
            the outer model (not one inside a nested model), `"name:index"`
            for one output of a multi-output layer.

    Returns:
        A `(trunk, head)` pair of Functional models, named
        `<model>_trunk` and `<model>_head`. The head's input is named
        `<at>_features`.

    Raises:
        SurgeryError: `at` is not a layer of the model (the message suggests
            close names), is an `InputLayer`, a non-Layer operation, a layer
            inside a nested model, or a multi-output layer without `:index`;
            or the model is subclassed or a Sequential model without an
            input shape.

    Example:

    ```python
    import keras
    import numpy as np
    import surgery

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", name="fc1"),
        keras.layers.Dense(4, name="fc2"),
    ], name="net")
    trunk, head = surgery.split(model, "fc1")
    print(trunk.name, trunk.output.shape, head.name)  # net_trunk (None, 16) net_head
    x = np.ones((2, 8), "float32")
    assert np.array_equal(head.predict(trunk.predict(x, verbose=0), verbose=0),
                          model.predict(x, verbose=0))
    ```
    """
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
    """The model `head(trunk(x))`, with the head nested as one layer.

    The inverse of `split`: after working on the head (e.g. inserting BN
    into it, fine-tuning it on cached features), `combine` puts the trunk
    back in front of it so the result takes the original inputs again. The
    trunk's layers stay at the top level and the head becomes one nested
    layer; the result uses the trunk's and head's own layers (and weights),
    not copies.

    Args:
        trunk: A `keras.Model` with one output, usually the first half from
            `split`.
        head: A `keras.Model` with one input whose shape (batch dimension
            aside) is the trunk's output shape.
        name: The combined model's name. Defaults to `None`: the trunk's name
            without its `_trunk` suffix, which is the original model's name
            for halves from `split`.

    Returns:
        A Functional `keras.Model` from the trunk's inputs to the head's
        outputs.

    Raises:
        SurgeryError: the trunk has more than one output, the head more than
            one input, or the trunk's output shape does not fit the head's
            input shape.

    Example:

    ```python
    import keras
    import numpy as np
    import surgery

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", name="fc1"),
        keras.layers.Dense(4, name="fc2"),
    ], name="net")
    trunk, head = surgery.split(model, "fc1")
    features = trunk.predict(np.ones((64, 8), "float32"), verbose=0)
    head = surgery.insert_identity_bn(head, before="fc2", data=features, verbose=0)
    whole = surgery.combine(trunk, head)
    print(whole.name, [layer.name for layer in whole.layers])
    # net ['input_layer', 'fc1', 'net_head']
    ```
    """
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
