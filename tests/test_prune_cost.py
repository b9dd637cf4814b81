"""Parameters and FLOPs (`surgery.pruning.cost`), against counts done by hand.

Every expected FLOP figure is written out as arithmetic: 2 x multiply-adds,
plus one add per output element for a bias, plus 2 per element for a
BatchNormalization. Parameters are compared with Keras' `count_params()`.
"""

import keras
import pytest

from surgery.errors import SurgeryError
from surgery.pruning.cost import model_cost

L = keras.layers


def single(layer, shape):
    """A model of one `layer` on inputs of per-sample `shape`."""
    inputs = keras.Input(shape)
    return keras.Model(inputs, layer(inputs))


def test_conv2d_same_counts_multiply_adds_twice_plus_the_bias():
    model = single(L.Conv2D(8, 3, padding="same", name="conv"), (32, 32, 3))
    cost = model_cost(model)
    assert cost.flops == 2 * 32 * 32 * 8 * 3 * 3 * 3 + 32 * 32 * 8
    assert cost.params == 3 * 3 * 3 * 8 + 8 == model.count_params()
    assert cost.per_layer == {"conv": (3 * 3 * 3 * 8 + 8, cost.flops)}


def test_strided_valid_conv_without_bias_counts_its_output_positions():
    layer = L.Conv2D(4, 3, strides=2, use_bias=False, name="conv")
    cost = model_cost(single(layer, (33, 33, 2)))  # output 16 x 16 x 4
    assert cost.flops == 2 * 16 * 16 * 4 * 3 * 3 * 2
    assert cost.params == 3 * 3 * 2 * 4


def test_dense_on_a_vector_and_on_a_sequence():
    assert model_cost(single(L.Dense(5), (7,))).flops == 2 * 7 * 5 + 5
    cost = model_cost(single(L.Dense(5), (4, 7)))  # applied at each of 4 steps
    assert cost.flops == 2 * 4 * 7 * 5 + 4 * 5
    assert cost.params == 7 * 5 + 5


def test_grouped_conv_multiplies_each_filter_by_its_group_only():
    model = single(L.Conv2D(8, 3, groups=2, padding="same"), (10, 10, 4))
    cost = model_cost(model)
    assert cost.flops == 2 * 10 * 10 * 8 * 3 * 3 * (4 // 2) + 10 * 10 * 8
    assert cost.params == 3 * 3 * 2 * 8 + 8 == model.count_params()


def test_depthwise_with_multiplier_two():
    model = single(L.DepthwiseConv2D(3, depth_multiplier=2), (10, 10, 4))
    cost = model_cost(model)  # output 8 x 8 x (4 * 2)
    assert cost.flops == 2 * 8 * 8 * (4 * 2) * 3 * 3 + 8 * 8 * 8
    assert cost.params == 3 * 3 * 4 * 2 + 8 == model.count_params()


def test_separable_counts_the_depthwise_and_the_pointwise_step():
    layer = L.SeparableConv2D(6, 3, depth_multiplier=2, padding="same")
    model = single(layer, (8, 8, 4))
    depthwise = 8 * 8 * (4 * 2) * 3 * 3
    pointwise = 8 * 8 * (4 * 2) * 6
    assert model_cost(model).flops == 2 * (depthwise + pointwise) + 8 * 8 * 6
    assert model_cost(model).params == 3 * 3 * 4 * 2 + 8 * 6 + 6
    assert model_cost(model).params == model.count_params()


def test_conv_transpose_spreads_each_input_position_over_the_kernel():
    layer = L.Conv2DTranspose(5, 3, strides=2, padding="same")
    model = single(layer, (6, 6, 4))  # output 12 x 12 x 5
    cost = model_cost(model)
    assert cost.flops == 2 * 6 * 6 * 4 * 3 * 3 * 5 + 12 * 12 * 5
    assert cost.params == 3 * 3 * 5 * 4 + 5 == model.count_params()


def test_one_and_three_dimensional_convolutions_and_channels_first():
    inputs = keras.Input((20, 3))
    h = L.Conv1D(4, 5, name="c1")(inputs)  # 16 x 4
    h = L.DepthwiseConv1D(3, depth_multiplier=2, name="d1")(h)  # 14 x 8
    h = L.SeparableConv1D(2, 3, padding="same", name="s1")(h)  # 14 x 2
    cost = model_cost(keras.Model(inputs, h))
    assert cost.per_layer["c1"][1] == 2 * 16 * 4 * 5 * 3 + 16 * 4
    assert cost.per_layer["d1"][1] == 2 * 14 * 8 * 3 + 14 * 8
    assert cost.per_layer["s1"][1] == 2 * (14 * 8 * 3 + 14 * 8 * 2) + 14 * 2
    layer = L.Conv3D(4, 2, data_format="channels_first")
    model = single(layer, (3, 5, 5, 5))  # output 4 x 4 x 4 x 4, channels first
    assert model_cost(model).flops == 2 * 4 * 4 * 4 * 4 * 2 * 2 * 2 * 3 + 4**4


def test_batch_norm_costs_two_per_element_and_other_layers_nothing():
    inputs = keras.Input((6, 6, 3))
    h = L.BatchNormalization(name="bn")(inputs)
    h = L.ReLU(name="relu")(h)
    h = L.MaxPooling2D(name="pool")(h)
    h = L.Flatten(name="flat")(h)
    model = keras.Model(inputs, L.Dropout(0.5, name="drop")(h))
    cost = model_cost(model)
    assert cost.per_layer == {
        "bn": (4 * 3, 2 * 6 * 6 * 3),  # gamma, beta, moving mean and variance
        "relu": (0, 0),
        "pool": (0, 0),
        "flat": (0, 0),
        "drop": (0, 0),
    }
    assert cost.flops == 2 * 6 * 6 * 3
    assert cost.params == model.count_params()


def test_nested_models_are_counted_inside_under_their_paths():
    x = keras.Input((8, 8, 3))
    inner = keras.Model(x, L.Conv2D(4, 3, padding="same", name="conv")(x), name="inner")
    y = keras.Input((8, 8, 3))
    mid = keras.Model(y, L.BatchNormalization(name="bn")(inner(y)), name="mid")
    z = keras.Input((8, 8, 3))
    h = L.GlobalAveragePooling2D(name="gap")(mid(z))
    model = keras.Model(z, L.Dense(2, name="fc")(h))
    cost = model_cost(model)
    conv = 2 * 8 * 8 * 4 * 3 * 3 * 3 + 8 * 8 * 4
    bn = 2 * 8 * 8 * 4
    fc = 2 * 4 * 2 + 2
    assert cost.per_layer == {
        "mid/inner/conv": (3 * 3 * 3 * 4 + 4, conv),
        "mid/bn": (4 * 4, bn),
        "gap": (0, 0),
        "fc": (4 * 2 + 2, fc),
    }
    assert cost.flops == conv + bn + fc
    assert cost.params == model.count_params()


def test_shared_layers_and_models_count_flops_per_call_and_weights_once():
    dense = L.Dense(3, name="shared")
    a, b = keras.Input((5,), name="a"), keras.Input((5,), name="b")
    x = keras.Input((4, 4, 2))
    block = keras.Model(x, L.Conv2D(2, 1, name="conv")(x), name="block")
    c = keras.Input((4, 4, 2), name="c")
    h = L.Flatten(name="flat")(block(block(c)))  # the nested model twice
    model = keras.Model([a, b, c], [L.Add(name="add")([dense(a), dense(b)]), h])
    cost = model_cost(model)
    assert cost.per_layer["shared"] == (5 * 3 + 3, 2 * (2 * 5 * 3 + 3))
    assert cost.per_layer["block/conv"] == (
        2 * 2 + 2,
        2 * (2 * 4 * 4 * 2 * 2 + 4 * 4 * 2),
    )
    assert cost.flops == 2 * (2 * 5 * 3 + 3) + 2 * (2 * 4 * 4 * 2 * 2 + 4 * 4 * 2)
    assert cost.params == 5 * 3 + 3 + 2 * 2 + 2 == model.count_params()


def test_free_image_size_needs_input_shapes_for_flops_not_for_params():
    inputs = keras.Input((None, None, 3))
    h = L.Conv2D(8, 3, padding="same", name="conv")(inputs)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    model = keras.Model(inputs, L.Dense(2, name="fc")(h))
    free = model_cost(model)
    assert free.flops is None
    assert free.per_layer["conv"] == (3 * 3 * 3 * 8 + 8, None)
    assert free.per_layer["fc"] == (8 * 2 + 2, 2 * 8 * 2 + 2)  # needs no size
    assert free.params == model.count_params()
    conv = 2 * 32 * 32 * 8 * 3 * 3 * 3 + 32 * 32 * 8
    for shapes in ([(32, 32, 3)], (32, 32, 3), [(32, 32, None)]):
        sized = model_cost(model, input_shapes=shapes)
        assert sized.flops == conv + 2 * 8 * 2 + 2
        assert sized.params == free.params
    assert model_cost(model, input_shapes=[(32, None, 3)]).flops is None


def test_a_free_size_backbone_is_counted_at_the_size_its_caller_gives():
    x = keras.Input((None, None, 3))
    backbone = keras.Model(x, L.Conv2D(4, 3, name="conv")(x), name="backbone")
    inputs = keras.Input((10, 10, 3))
    model = keras.Model(inputs, backbone(inputs))
    assert model_cost(model).flops == 2 * 8 * 8 * 4 * 3 * 3 * 3 + 8 * 8 * 4


def test_input_shapes_that_do_not_fit_the_model_are_refused():
    model = single(L.Conv2D(2, 3), (None, None, 3))
    with pytest.raises(SurgeryError, match="gives 2 shape"):
        model_cost(model, input_shapes=[(8, 8, 3), (8, 8, 3)])
    with pytest.raises(SurgeryError, match=r"\(8, 8, 4\) does not fit"):
        model_cost(model, input_shapes=[(8, 8, 4)])
    with pytest.raises(SurgeryError, match=r"\(8, 8\) does not fit"):
        model_cost(model, input_shapes=[(8, 8)])


def test_sequential_models_and_no_new_calls_on_the_layers():
    model = keras.Sequential(
        [keras.Input((6,)), L.Dense(4, name="fc1"), L.Dense(2, name="fc2")]
    )
    before = [len(layer._inbound_nodes) for layer in model.layers]
    cost = model_cost(model, input_shapes=[(6,)])
    assert cost.flops == (2 * 6 * 4 + 4) + (2 * 4 * 2 + 2)
    assert cost.params == model.count_params()
    assert [len(layer._inbound_nodes) for layer in model.layers] == before


class ShapeInferenceBreaks(L.Layer):
    """A layer whose shape inference fails once `broken` is set."""

    broken = False

    def call(self, x):
        return x

    def compute_output_spec(self, x):
        if self.broken:
            raise RuntimeError("no shape inference here")
        return super().compute_output_spec(x)


def test_a_layer_whose_shape_inference_fails_keeps_the_graphs_own_shapes():
    inputs = keras.Input((5, 5, 2))
    odd = ShapeInferenceBreaks(name="odd")
    h = odd(L.Conv2D(3, 1, name="conv")(inputs))
    model = keras.Model(inputs, L.Conv2D(2, 1, name="after")(h))
    free = keras.Input((None, None, 2))
    free_model = keras.Model(free, L.Conv2D(2, 1, name="after")(odd(free)))
    odd.broken = True
    assert model_cost(model).per_layer["after"][1] == 2 * 5 * 5 * 2 * 3 + 5 * 5 * 2
    assert model_cost(free_model, input_shapes=[(5, 5, 2)]).flops is None


def test_mobilenet_v2_matches_its_published_300m_multiply_adds():
    """MobileNetV2 1.0 at 224 x 224: the paper's 300M multiply-adds are those of
    its convolutions and classifier. Those we count as 2 x 300.77M. The
    total is 2.5% above 2 x 300M: it adds the 1,000 classifier bias adds
    and 2 FLOPs per element of its 52 BatchNormalizations' outputs (13.36M;
    its convolutions have no bias), checked here against the graph's own
    output shapes."""
    model = keras.applications.MobileNetV2(weights=None)
    cost = model_cost(model)
    assert cost.params == model.count_params()
    kinds = {path: type(model.get_layer(path)) for path in cost.per_layer}
    conv = sum(
        flops
        for path, (_, flops) in cost.per_layer.items()
        if kinds[path] in (L.Conv2D, L.DepthwiseConv2D, L.Dense)
    )
    multiply_adds = (conv - 1000) / 2  # less the classifier's bias adds
    assert abs(multiply_adds / 300e6 - 1) < 0.02
    norms = [layer for layer in model.layers if isinstance(layer, L.BatchNormalization)]
    elements = sum(
        layer.output.shape[1] * layer.output.shape[2] * layer.output.shape[3]
        for layer in norms
    )
    assert cost.flops == conv + 2 * elements
