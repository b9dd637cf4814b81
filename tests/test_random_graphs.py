"""Property: identity BN at random spots of random graphs changes no output.

Graphs mix Conv2D, DepthwiseConv2D, SeparableConv2D and Dense layers with
every `keras.activations` name (fused into the layer or as a separate
Activation), existing BatchNormalization and LayerNormalization, Add and
Concatenate merges, shared layers and one or two outputs, all with
pretrained-like weights. Asserted for every graph:
- eager inference is bit-identical;
- compiled (graph-mode) inference is bit-identical, or `insert_identity_bn`
  warned, naming a known cause at one of the spots;
- under XLA it is bit-identical when every BN got float64 variables.

CI runs a small budget (6 graphs), `-m slow` 60 other graphs;
`SURGERY_RANDOM_GRAPHS=300` sets the first budget.
"""

import os
import warnings

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import surgery
from surgery.testing.synthetic import pretrained_like

L = keras.layers
ACTIVATIONS = sorted(
    {
        "celu",
        "elu",
        "gelu",
        "hard_shrink",
        "hard_sigmoid",
        "hard_silu",
        "hard_tanh",
        "leaky_relu",
        "linear",
        "log_sigmoid",
        "log_softmax",
        "mish",
        "relu",
        "relu6",
        "selu",
        "sigmoid",
        "silu",
        "soft_shrink",
        "softmax",
        "softplus",
        "softsign",
        "sparse_plus",
        "sparse_sigmoid",
        "squareplus",
        "tanh",
        "tanh_shrink",
    }
)  # fmt: skip; glu halves the width, exponential and threshold need care
CHANNELS = 6
EXAMPLES = int(os.environ.get("SURGERY_RANDOM_GRAPHS", "6"))
SLOW_EXAMPLES = 60


@st.composite
def graphs(draw):
    """A random model, the names of the layers to follow with BN, and data."""
    inp = keras.Input((6, 6, CHANNELS))
    tensors, named, shared = [inp], [], []
    for i in range(draw(st.integers(2, 5))):
        x = draw(st.sampled_from(tensors))
        kind = draw(
            st.sampled_from(["conv", "depthwise", "separable", "merge", "norm"])
        )
        act = draw(st.sampled_from(ACTIVATIONS))
        fused = draw(st.booleans())
        name = f"n{i}"
        if kind == "merge" and len(tensors) > 1:
            y = draw(st.sampled_from(tensors))
            if draw(st.booleans()):
                x = L.Add(name=name)([x, y])
            else:
                x = L.Concatenate(name=name)([x, y])
                x = L.Conv2D(CHANNELS, 1, name=f"{name}_squeeze")(x)
                named.append(f"{name}_squeeze")
        elif kind == "norm":
            norm = draw(st.sampled_from([L.BatchNormalization, L.LayerNormalization]))
            x = norm(name=name)(x)
        elif shared and draw(st.booleans()):
            x = shared[0](x)
            name = shared[0].name
        else:
            layer = _conv_layer(kind, name)
            if fused:
                layer.activation = keras.activations.get(act)
            x = layer(x)
            if not shared:
                shared.append(layer)
            if not fused:
                x = L.Activation(act, name=f"{name}_act")(x)
                named.append(f"{name}_act")
        named.append(name)
        tensors.append(x)
    h = L.GlobalAveragePooling2D(name="pool")(tensors[-1])
    dense_act = draw(st.sampled_from(ACTIVATIONS))
    h = L.Dense(8, activation=dense_act, name="fc")(h)
    outputs = [L.Dense(3, name="out")(h)]
    if draw(st.booleans()):
        outputs.append(L.Dense(2, name="out2")(L.Flatten(name="flat")(tensors[1])))
    named += ["pool", "fc"]
    model = keras.Model(inp, outputs)
    named = sorted(set(named) & {op.name for op in model.operations})  # connected
    spots = sorted(set(draw(st.lists(st.sampled_from(named), min_size=1))))
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).normal(size=(16, 6, 6, CHANNELS))
    return pretrained_like(model, seed), spots, x.astype("float32")


def _conv_layer(kind, name):
    if kind == "depthwise":
        return L.DepthwiseConv2D(3, padding="same", name=name)
    if kind == "separable":
        return L.SeparableConv2D(CHANNELS, 3, padding="same", name=name)
    if kind == "conv":
        return L.Conv2D(CHANNELS, 3, padding="same", name=name)
    return L.Conv2D(CHANNELS, 1, name=name)


def budget(examples):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


@budget(EXAMPLES)
@given(graphs())
def test_identity_bn_at_random_spots_of_random_graphs(case):
    check_identity_bn_at_random_spots(case)


@pytest.mark.slow
@budget(SLOW_EXAMPLES)
@given(graphs())
def test_identity_bn_at_random_spots_of_many_more_random_graphs(case):
    """Other graphs than the test above's (derandomize seeds by test name)."""
    check_identity_bn_at_random_spots(case)


def check_identity_bn_at_random_spots(case):
    model, spots, x = case
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = surgery.insert_identity_bn(model, after=spots, data=x, verbose=0)
    messages = [str(w.message) for w in caught if "not bit-identical" in str(w.message)]
    assert surgery.verify(model, new, x, verbose=0, mode="eager").identical
    graph = surgery.verify(model, new, x, verbose=0, mode="graph")
    if not graph.identical:
        assert messages, (spots, graph)
        assert "no known cause" not in messages[0], (spots, messages[0])
    bns = [
        new.get_layer(layer.name) for layer in new.layers if layer.name.endswith("_bn")
    ]
    if bns and all(bn.dtype_policy.name == "float64" for bn in bns):
        assert surgery.verify(model, new, x, verbose=0, mode="xla").identical, spots
