"""Layer specs of the command line (`surgery.cli.layer_spec`)."""

import keras
import pytest

from surgery.cli.layer_spec import parse_layer, split_assignment
from surgery.errors import SurgeryError, UsageError


def test_a_class_name_alone_and_with_its_arguments():
    assert type(parse_layer("ReLU")) is keras.layers.ReLU
    dense = parse_layer("Dense:units=64,activation=gelu")
    assert type(dense) is keras.layers.Dense
    assert dense.units == 64 and dense.get_config()["activation"] == "gelu"


def test_values_are_literals_or_else_plain_strings():
    layer = parse_layer(
        "Dense:units=3,use_bias=False,activation=None,"
        "kernel_initializer='he_normal',bias_initializer=zeros"
    )
    config = layer.get_config()
    assert config["units"] == 3 and config["use_bias"] is False
    assert config["activation"] == "linear"  # None is Keras' linear
    assert config["kernel_initializer"]["class_name"] == "HeNormal"
    assert config["bias_initializer"]["class_name"] == "Zeros"
    assert parse_layer("Dropout:rate=0.25").rate == 0.25


def test_commas_inside_brackets_and_quotes_do_not_split():
    conv = parse_layer("Conv2D:filters=8,kernel_size=(3,3),padding=same")
    assert conv.filters == 8 and conv.kernel_size == (3, 3)
    assert conv.padding == "same"
    drop = parse_layer("Dropout: rate = 0.5 , noise_shape=[None, 1],name='a,b'")
    assert drop.noise_shape == (None, 1) and drop.name == "a,b"


def test_each_call_builds_a_new_layer():
    assert parse_layer("ReLU") is not parse_layer("ReLU")


def test_name_and_spec_split_at_the_first_equals_sign():
    assert split_assignment("fc1=Dense:units=64,activation=gelu", "--replace") == (
        "fc1",
        "Dense:units=64,activation=gelu",
    )
    assert split_assignment(" block/conv = ReLU ", "--x") == ("block/conv", "ReLU")
    for bad in ("fc1", "=ReLU", "fc1=", "fc1 = "):
        with pytest.raises(UsageError, match="write NAME=SPEC"):
            split_assignment(bad, "--replace")


@keras.saving.register_keras_serializable(package="surgery_spec_test")
class Scale(keras.layers.Layer):
    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor


def test_a_registered_custom_class_by_its_name_or_its_registered_name():
    assert parse_layer("Scale:factor=3").factor == 3
    assert parse_layer("surgery_spec_test>Scale").factor == 2.0
    with pytest.raises(UsageError, match="Scale has no argument 'factr'"):
        parse_layer("Scale:factr=3")


def test_one_class_name_registered_twice_asks_which(monkeypatch):
    other = type("Scale", (keras.layers.Layer,), {})
    monkeypatch.setitem(keras.saving.get_custom_objects(), "other>Scale", other)
    with pytest.raises(UsageError, match="registered by several packages"):
        parse_layer("Scale")
    assert type(parse_layer("other>Scale")) is other


@pytest.mark.parametrize(
    "spec, message",
    [
        ("Dense:unit=64", "layer spec 'Dense:unit=64': Dense has no argument 'unit'"),
        ("Dense:units=4,bogus=1", "Dense has no argument 'bogus'"),
        ("Dense", "Dense needs argument 'units'"),
        ("Dense:units=-1", "Dense: Received an invalid value for `units`"),
        ("Relu", "no layer class 'Relu' in keras.layers"),
        ("Dens:units=3", "did you mean Dense?"),
        ("Input", "no layer class 'Input'"),  # a function, not a layer class
        ("Dense:64", "write key=value, got '64'"),
        ("Dense:units=1,units=2", "units given twice"),
        ("Dense:units=", "units= has no value"),
        ("Conv2D:kernel_size=(3,3", "unbalanced brackets or quotes"),
        ("Conv2D:kernel_size=(3,3]", "unbalanced brackets or quotes"),
        ("Dropout:name='a", "unbalanced brackets or quotes"),
        (":units=3", "write Class, Class:key=value or module:function"),
        ("not a:reference", "write Class, Class:key=value or module:function"),
        ("", "write Class"),
    ],
)
def test_a_malformed_spec_is_one_usage_line(spec, message):
    with pytest.raises(UsageError) as caught:
        parse_layer(spec)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_relu_in_lower_case_suggests_the_class():
    with pytest.raises(UsageError, match=r"did you mean ReLU\b"):
        parse_layer("relu")


LAYERS_PY = """
import keras

SHARED = keras.layers.ReLU()
NOT_A_LAYER = 3


def norm():
    return keras.layers.LayerNormalization()


def pair():
    return [keras.layers.ReLU(), keras.layers.Dropout(0.1)]


def same_twice():
    return [SHARED, SHARED]


def number():
    return 3


def broken():
    raise RuntimeError("out of coffee")
"""


@pytest.fixture
def mylayers(tmp_path, monkeypatch):
    (tmp_path / "mylayers_spec.py").write_text(LAYERS_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mylayers_spec"


def test_module_function_is_called_for_each_layer(mylayers):
    first = parse_layer(f"{mylayers}:norm")
    assert type(first) is keras.layers.LayerNormalization
    assert parse_layer(f"{mylayers}:norm") is not first
    # a class is a function returning a new layer too
    assert type(parse_layer("keras.layers:ReLU")) is keras.layers.ReLU


def test_a_list_of_layers_only_where_one_is_allowed(mylayers):
    relu, drop = parse_layer(f"{mylayers}:pair", allow_list=True)
    assert type(relu) is keras.layers.ReLU and type(drop) is keras.layers.Dropout
    with pytest.raises(SurgeryError, match="returned a list, not a keras layer$"):
        parse_layer(f"{mylayers}:pair")


@pytest.mark.parametrize(
    "attribute, message",
    [
        ("SHARED", "is a layer object, and each use needs a new layer"),
        ("NOT_A_LAYER", "is an int, not a function returning a keras layer"),
        ("number", "returned an int, not a keras layer or a list of layers"),
        ("same_twice", "returned one layer twice"),
        ("broken", "calling it failed: RuntimeError: out of coffee"),
        ("missing", "mylayers_spec has no 'missing'"),
    ],
)
def test_a_reference_that_gives_no_new_layer_is_one_line(mylayers, attribute, message):
    with pytest.raises(SurgeryError) as caught:
        parse_layer(f"{mylayers}:{attribute}", allow_list=True)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not isinstance(caught.value, UsageError)


def test_a_module_that_does_not_import_is_a_surgery_error():
    with pytest.raises(SurgeryError, match="cannot import 'no_such_module_x'"):
        parse_layer("no_such_module_x:build")


def test_a_default_name_unless_the_spec_gives_one():
    assert parse_layer("Dense:units=3", name="fc1").name == "fc1"
    assert parse_layer("Dense:units=3,name='x'", name="fc1").name == "x"
    assert parse_layer("keras.layers:ReLU", name="fc1").name != "fc1"
