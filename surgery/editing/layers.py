"""Layer surgery: delete, insert, replace and deepen layers of a Keras model.

Each verb returns a new model, built in one rewrite of the input's graph
(`surgery.graph.rewrite`): the input is never modified and shares no
variables with the result; a Sequential model stays Sequential; nested
models, shared layers and several inputs and outputs come through. `edit`
does several edits in one rebuild; the other four are one edit each.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import backend, tree

from surgery.data.batches import first_batch
from surgery.editing.plan import plan
from surgery.errors import SurgeryError
from surgery.graph.rewrite import rewrite
from surgery.graph.spots import graph_of
from surgery.runtime.machine import cpu_kind
from surgery.verbs.insert_check import check_mode
from surgery.verbs.verify import batch_difference


def edit(
    model: keras.Model,
    *,
    delete: Sequence[str] | str | None = None,
    insert_after: Mapping[str, Any] | None = None,
    insert_before: Mapping[str, Any] | None = None,
    replace: Mapping[str, keras.layers.Layer] | None = None,
    deepen: Sequence[str] | str | None = None,
    copy_weights: bool = True,
) -> keras.Model:
    """A new model with layers deleted, inserted, replaced and deepened at once.

    All edits are applied in one rebuild of the graph, so several cost what
    one does. Layers are named by path (`"fc1"`, `"outer/inner/fc"` inside
    nested models). A shared layer is edited at every call, or at its k-th
    call (from 0, in call order) as `"name:k"` in `delete`, `replace` and
    `deepen`; in `insert_after`/`insert_before`, `"name:k"` is output k of a
    multi-output layer, as in `insert_identity_bn`. A layer given whose name
    is already taken in its model is renamed with a `_1`, `_2`, ... suffix.
    On one layer, the deepening layer comes first, then the inserted ones.

    Args:
        model: The Functional or Sequential `keras.Model` to edit. A
            subclassed model has no graph: trace it with `surgery.functional`
            first.
        delete: Layer name(s) to remove; see `delete_layer`. Defaults to
            `None` (none).
        insert_after: A dict from a layer name to what to call on its output
            (every consumer of that output is rewired): a new layer, a list
            of them (called in order), or a function of the output's shape
            (a tuple, batch first) returning either. Defaults to `None`.
        insert_before: As `insert_after`, on a layer's input, for that layer
            only; it must take one input. Defaults to `None`.
        replace: A dict from a layer name to the new layer to call in its
            place; see `replace_layer`. Defaults to `None`.
        deepen: Name(s) of layers to follow with an identity-initialised
            copy; see `deepen`. Defaults to `None`.
        copy_weights: Give each replacement the old layer's weights; see
            `replace_layer`. Defaults to `True`.

    Returns:
        A new, uncompiled `keras.Model` of the same kind and name. Unedited
        layers are copies holding the original's weight values; the layers
        given are used as they are (renamed on a name clash).

    Raises:
        SurgeryError: no edit is given; a name is no layer of the model (the
            message suggests close ones) or is called fewer times than its
            `:k`; two of delete, replace and deepen name one layer, or an
            insert follows a deleted one; a layer to delete has several
            inputs or outputs or changes the shape; a replacement outputs
            another shape, or its weights' shapes differ with
            `copy_weights=True`; a layer to deepen is not a Dense or
            convolution; a layer given is no Keras layer, belongs to `model`
            or is given twice; or a layer cannot be copied from its config
            (a custom layer without a working `get_config`).

    Example:

    ```python
    import keras
    import surgery

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", name="fc1"),
        keras.layers.Dropout(0.5, name="drop"),
        keras.layers.Dense(4, name="fc2"),
    ])
    new = surgery.edit(
        model,
        delete=["drop"],
        insert_after={"fc1": keras.layers.LayerNormalization(name="norm")},
        deepen=["fc2"],
    )
    print([layer.name for layer in new.layers])  # ['fc1', 'norm', 'fc2', 'fc2_deep']
    ```
    """
    new, notes = _edit(
        model,
        delete=delete,
        insert_after=insert_after,
        insert_before=insert_before,
        replace=replace,
        deepen=deepen,
        copy_weights=copy_weights,
    )
    _warn(notes)
    return new


def delete_layer(model: keras.Model, name: str | Sequence[str]) -> keras.Model:
    """A new model without a layer: its consumers read its input instead.

    Only a layer with one input and one output of the same shape can go.
    Deleting a layer that is the identity at inference (Dropout and the
    other noise layers, `Identity`, `Activation("linear")`, a BN that
    `insert_identity_bn` made, with the float32 cast it may have added after
    it) leaves the outputs bit-identical; `surgery.verify` measures what
    deleting any other layer does. A layer that casts (say, a float32 output
    layer of a mixed-precision model) leaves its consumers the input's dtype.

    Args:
        model: The Functional or Sequential `keras.Model`.
        name: The layer's path (`"drop"`, `"outer/inner/drop"`), with
            `":k"` for one call of a shared layer; or a list of them.

    Returns:
        A new, uncompiled `keras.Model` without the layer.

    Raises:
        SurgeryError: as `edit`; in particular when the layer has several
            inputs or outputs, or an output shape other than its input's.

    Example:

    ```python
    import keras
    import numpy as np
    import surgery

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", name="fc1"),
        keras.layers.Dropout(0.5, name="drop"),
        keras.layers.Dense(4, name="fc2"),
    ])
    new = surgery.delete_layer(model, "drop")
    x = np.ones((2, 8), "float32")
    print(np.array_equal(model.predict(x, verbose=0), new.predict(x, verbose=0)))
    ```
    """
    return edit(model, delete=name)


def insert_layer(
    model: keras.Model,
    layer: Any,
    after: str | None = None,
    before: str | None = None,
) -> keras.Model:
    """A new model with `layer` called after (or before) a layer.

    Args:
        model: The Functional or Sequential `keras.Model`.
        layer: A new Keras layer, a list of them (called in order), or a
            function of the spot's shape (a tuple, batch first) returning
            either, to size the layer to the spot. A layer whose name is
            taken is renamed with a `_1`, `_2`, ... suffix.
        after: The layer on whose output to call it; every consumer of that
            output (and a model output it is) gets the result instead. A
            path, with `":k"` for output k of a multi-output layer.
        before: The layer on whose input to call it, for that layer only;
            it must take one input. Give `after` or `before`, not both.

    Returns:
        A new, uncompiled `keras.Model` with the layer in place.

    Raises:
        SurgeryError: neither or both of `after` and `before` are given, or
            as `edit`.

    Example:

    ```python
    import keras
    import surgery

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, name="fc1"),
        keras.layers.Dense(4, name="fc2"),
    ])
    new = surgery.insert_layer(
        model, lambda shape: keras.layers.Dense(shape[-1], name="extra"), after="fc1"
    )
    print([layer.name for layer in new.layers])  # ['fc1', 'extra', 'fc2']
    ```
    """
    if (after is None) == (before is None):
        raise SurgeryError(
            "insert_layer needs after='<layer>' or before='<layer>', not both"
        )
    if after is not None:
        return edit(model, insert_after={after: layer})
    return edit(model, insert_before={before: layer})


def replace_layer(
    model: keras.Model,
    name: str,
    layer: keras.layers.Layer,
    copy_weights: bool = True,
) -> keras.Model:
    """A new model with `layer` called where the named layer was.

    `layer` gets the old layer's arguments and must give outputs of the
    same shapes, which its consumers expect. Swapping `Activation("relu")`
    for `ReLU()`, a Dense for a Dense with another activation or dtype
    policy, or a Conv2D for one with another padding (where the shapes
    allow) keeps everything else as it was.

    Args:
        model: The Functional or Sequential `keras.Model`.
        name: The layer's path, with `":k"` for one call of a shared layer
            (the other calls keep the old layer).
        layer: The new Keras layer. A name already taken by another layer
            gets a `_1`, `_2`, ... suffix; the old layer's own name is free
            when every call of it is replaced.
        copy_weights: Give `layer` the old layer's weights, in
            `get_weights()` order (cast to its variables' dtype). Their
            number and shapes must match. `False` keeps `layer`'s own
            weights, initialised when it is first called unless it was
            built already. Defaults to `True`.

    Returns:
        A new, uncompiled `keras.Model` with the layer replaced.

    Raises:
        SurgeryError: `layer` outputs other shapes than the old layer; with
            `copy_weights=True`, their weights differ in number or shape; or
            as `edit`.

    Example:

    ```python
    import keras
    import surgery

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", name="fc1"),
        keras.layers.Dense(4, name="fc2"),
    ])
    gelu = keras.layers.Dense(16, activation="gelu", name="fc1")
    new = surgery.replace_layer(model, "fc1", gelu)
    print(new.get_layer("fc1").activation.__name__)  # gelu
    ```
    """
    return edit(model, replace={name: layer}, copy_weights=copy_weights)


def deepen(
    model: keras.Model,
    after: str | Sequence[str],
    *,
    data: Any = None,
    check: bool | str = True,
    batch_size: int | None = None,
) -> keras.Model:
    """A new model with an identity-initialised layer after each named one.

    Net2DeeperNet (Chen et al., "Net2Net", 2016): after a Dense goes a Dense
    whose kernel is the identity; after a convolution (1D to 3D, transposed,
    separable), one of its kind with `same` padding, stride 1 and a centred
    one-hot kernel (even kernel sizes one less, so that there is a centre);
    after a DepthwiseConv, a DepthwiseConv with a centred one per channel.
    Biases are zero, and the dtype policy, data format, regularizers and
    constraints are the layer's own. The new layer keeps the layer's
    activation if it is idempotent on its own output (linear, relu, relu6,
    hard_tanh, hard_shrink) and is linear otherwise, with a warning naming
    the activation. It is named `<layer>_deep`.

    Each output of the new layer is its input times 1 plus exact zeros, so
    the model's outputs are bit-identical wherever the hardware adds those
    in float arithmetic (CPUs, and GPUs without TF32; an input holding inf
    becomes NaN) and the compiler leaves the other layers' kernels as they
    were (XLA on JAX was seen to recompile a neighbouring Dense at some
    batch sizes: a few ulp, see the layer-surgery docs). `check` compares
    the models in the mode `predict` runs in, and a warning gives the
    measured difference, beside the original's own batch-size noise, where
    that does not hold.

    Args:
        model: The Functional or Sequential `keras.Model`.
        after: The name(s) of Dense or convolution layers to deepen, as
            paths, with `":k"` for one call of a shared layer (a shared
            layer deepened at every call shares its new layer too).
        data: Inputs for `check`, as `insert_identity_bn` takes them; only
            the first batch is read. Defaults to `None`: a batch of 8
            standard-normal samples where every input is a float tensor of
            known shape, else no check.
        check: `True` (the default) or `"auto"`: compare in the mode
            `model.predict` uses; `"eager"`, `"graph"` or `"xla"`: in that
            mode; `False`: no comparison.
        batch_size: Samples in the batch read from arrays and paths in
            `data`. Defaults to `None`: 32.

    Returns:
        A new, uncompiled `keras.Model` with the identity layers in place.

    Raises:
        SurgeryError: a layer is not a Dense or convolution (subclasses
            included: their `call` may differ) or is quantized; `check` is
            not a value above; or as `edit`.

    Example:

    ```python
    import keras
    import numpy as np
    import surgery

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", name="fc1"),
        keras.layers.Dense(4, name="fc2"),
    ])
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    new = surgery.deepen(model, after=["fc1"], data=x)
    print([layer.name for layer in new.layers])  # ['fc1', 'fc1_deep', 'fc2']
    assert surgery.verify(model, new, x, verbose=0).identical
    ```
    """
    mode = check_mode(model, check)
    new, notes = _edit(model, deepen=after)
    if mode:
        x = _probe(model) if data is None else first_batch(model, data, batch_size)
        if x is not None:
            notes.extend(_compared(model, new, x, mode))
    _warn(notes)
    return new


def _edit(model, **edits) -> tuple[keras.Model, list[str]]:
    steps = plan(model, **edits)
    new = rewrite(model, steps.edits)
    steps.finish()
    return new, steps.notes


def _compared(model, new, x, mode: str) -> list[str]:
    """A note if `new` differs from `model` on `x` in `mode`, else none."""
    same, diff, ulp, noise = batch_difference(model, new, x, mode)
    if same:
        return []
    return [
        f"the deepened model is not bit-identical to the original in {mode} mode "
        f"on this machine ({cpu_kind()}, {backend.backend()}): max {ulp} ulp, "
        f"{diff:.3g} abs on one batch (the original's own batch-size noise: "
        f"{noise} ulp). The identity layers add exact zeros, which a TF32 "
        "matmul or a reduced-precision kernel does not"
    ]


def _probe(model):
    """Eight standard-normal samples for `model`, if its inputs allow them."""
    inputs = graph_of(model).inputs
    rng = np.random.default_rng(0)
    arrays = []
    for tensor in inputs:
        shape = tuple(tensor.shape)[1:]
        if "float" not in str(tensor.dtype) or None in shape:
            return None
        arrays.append(rng.standard_normal((8, *shape)).astype(tensor.dtype))
    return tree.pack_sequence_as(graph_of(model)._inputs_struct, arrays)


def _warn(notes: list[str]) -> None:
    for note in notes:
        warnings.warn(note, stacklevel=3)
