"""How TensorFlow's graph compilers see the neighbourhood of a BN spot.

An identity BN returns its input bit for bit, but compiled inference runs a
rewritten graph, and the rewrites depend on what sits next to what:

- grappler's arithmetic optimizer re-associates chains of Mul and of Add.
  A float32 BN's `x * inv` joins the Mul chain of an activation built from
  products (silu, gelu, mish, hard_silu) and its `+ offset` joins a
  following Add, so the neighbour is computed in another order;
- the remapper (oneDNN's on CPUs where TensorFlow turns it on) fuses
  MatMul/Conv + BiasAdd + activation, and an activation such as Swish, into
  one kernel that rounds differently from the separate ops;
- XLA fuses and simplifies across the same ops.

A BN whose variables and arithmetic are float64 sits between two Casts,
which none of these rewrites crosses, and float32 -> float64 -> float32 of
`x * 1 + 0` is exact. So on TensorFlow a BN after a float32 layer gets
float64. Where every consumer casts its output back to float32 anyway (an
autocasting float32 Keras layer) that is all; where a model output, a
non-Layer op or a nested model would see float64, a stock float32
`Identity` layer after the BN casts it back, so every output keeps its
dtype. Two neighbourhoods stay sensitive whatever the BN: a BN between
a contraction and its activation prevents their fusion, and a BN after a
layer ending in a broadcast Add (BatchNormalization, a Dense/Conv bias)
that feeds an Add stops that offset from being re-associated with it.
"""

from __future__ import annotations

import os

import keras
from keras import backend

from surgery.graph.spots import Spot, graph_of, is_graph_model, nodes_in, nodes_of

ISOLATING_DTYPE = "float64"

CONTRACTIONS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_ADDS = (keras.layers.Add,)
# layers whose XLA lowering sums over a window or an axis (a reduce)
_SUMS = (
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
)
_PRODUCT_ACTIVATIONS = ("silu", "swish", "gelu", "mish", "hard_silu", "hard_swish")


def isolating_policy(spot: Spot) -> str | None:
    """`ISOLATING_DTYPE` where a float64 BN is safe and helps, else None.

    Only on TensorFlow (JAX without x64 would store float64 as float32, and
    Keras' torch BN computes in float32), and only for a float32 layer.
    Where the BN's consumers would not cast its output back to float32,
    `needs_cast_back` says so and the BN is followed by a float32 `Identity`.
    """
    if backend.backend() != "tensorflow":
        return None
    if spot.layer.dtype_policy.name != "float32":
        return None
    return ISOLATING_DTYPE


def needs_cast_back(model: keras.Model, spot: Spot) -> bool:
    """Whether something that reads `spot` would see a float64 BN's float64.

    True for a model output (or a nested model's), a non-Layer op, a nested
    model or any layer that does not autocast its inputs to float32.
    """
    consumers = spot_consumers(model, spot)
    return not consumers or not all(map(_casts_to_float32, consumers))


def spot_consumers(model, spot: Spot) -> list | None:
    """The operations that read the tensor at `spot`, None if a model output
    (or a nested model's output) reads it."""
    graph = _graph_at(model, spot.scope)
    if spot.side == "before":
        return [spot.layer]
    tensors = {
        id(node.outputs[spot.index or 0]) for node in nodes_of(graph, spot.layer)
    }
    if any(id(t) in tensors for t in graph.outputs):
        return None
    return [
        node.operation
        for node in nodes_in(graph)
        if any(id(t) in tensors for t in node.input_tensors)
    ]


def fusion_causes(
    model: keras.Model, spot: Spot, isolated: bool = True, mode: str = "graph"
) -> list[str]:
    """Why compiled inference may compute a neighbour of `spot` differently.

    Empty when nothing in the neighbourhood is known to be rewritten
    differently once a BN sits there. Each cause names the setting under
    which the original and the new model compile alike. `isolated` says
    whether the BN there got `isolating_policy`'s float64; `mode` is how the
    models run (`"graph"`: grappler's rewrites, `"xla"`: XLA's fusions).
    """
    if backend.backend() != "tensorflow" or mode == "eager":
        return []
    consumers = spot_consumers(model, spot) or []
    if mode == "xla":
        return [
            f"XLA fuses the BN's arithmetic into the sum of {type(c).__name__} "
            f"'{c.name}' after it, which then accumulates in another order; "
            "exact in graph mode (jit_compile=False)"
            for c in consumers
            if isinstance(c, _SUMS)
        ]
    causes = []
    producer = spot.layer if spot.side == "after" else _producer(model, spot)
    if not isolated and _activation_name(producer) in _PRODUCT_ACTIVATIONS:
        causes.append(
            f"the float32 BN's multiply is re-associated into the products of "
            f"{_activation_name(producer)} (grappler's arithmetic optimizer), "
            "which then compile differently; a float64 BN avoids it where its "
            "consumers cast back to float32, or exact with "
            "tf.config.optimizer.set_experimental_options("
            "{'arithmetic_optimization': False})"
        )
    if _is_linear_contraction(producer) and any(map(_is_activation, consumers)):
        causes.append(
            f"{type(producer).__name__} and the activation after it are fused "
            "into one kernel (TensorFlow's remapper) in the original only; "
            + (
                "exact with TF_ENABLE_ONEDNN_OPTS=0"
                if onednn_enabled()
                else "exact with grappler's remapping off"
            )
        )
    if _ends_in_offset_add(producer) and any(isinstance(c, _ADDS) for c in consumers):
        causes.append(
            f"the offset add of {type(producer).__name__} '{producer.name}' is "
            "re-associated with the Add after it (grappler's arithmetic "
            "optimizer) in the original only; exact with "
            "tf.config.optimizer.set_experimental_options("
            "{'arithmetic_optimization': False})"
        )
    return causes


def onednn_enabled() -> bool:
    """Whether TensorFlow runs oneDNN's fused kernels in this process."""
    if backend.backend() != "tensorflow":
        return False
    flag = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if flag is not None:
        return flag.strip().lower() in ("1", "true")
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False


def _graph_at(model, scope):
    graph = graph_of(model)
    for part in scope:
        graph = graph_of(next(op for op in graph.operations if op.name == part))
    return graph


def _producer(model, spot):
    graph = _graph_at(model, spot.scope)
    node = nodes_of(graph, spot.layer)[0]
    return node.input_tensors[0]._keras_history.operation


def _casts_to_float32(op) -> bool:
    return (
        isinstance(op, keras.layers.Layer)
        and not is_graph_model(op)
        and not isinstance(op, keras.layers.BatchNormalization)
        and op.autocast
        and op._convert_input_args
        and op.compute_dtype == "float32"
    )


def _activation_name(op) -> str | None:
    fn = getattr(op, "activation", None)
    if fn is None:
        return None
    return getattr(fn, "__name__", None)


def _is_linear_contraction(op) -> bool:
    return isinstance(op, CONTRACTIONS) and _activation_name(op) in ("linear", None)


def _is_activation(op) -> bool:
    if isinstance(op, keras.layers.Activation):
        return _activation_name(op) not in ("linear", None)
    return isinstance(
        op,
        (
            keras.layers.ReLU,
            keras.layers.ELU,
            keras.layers.LeakyReLU,
            keras.layers.PReLU,
            keras.layers.Softmax,
        ),
    )


def _ends_in_offset_add(op) -> bool:
    if isinstance(op, keras.layers.BatchNormalization):
        return True
    return _is_linear_contraction(op) and getattr(op, "use_bias", False)
