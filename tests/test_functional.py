"""`surgery.functional`: subclassed models traced into Functional ones."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers, ops

import surgery


class Head(keras.Model):
    def __init__(self, prefix="", **kwargs):
        super().__init__(**kwargs)
        self.fc = layers.Dense(6, activation="relu", name=f"{prefix}fc")
        self.out = layers.Dense(3, name=f"{prefix}logits")

    def call(self, x):
        return self.out(self.fc(x))


class Net(keras.Model):
    """A subclassed model with a nested subclassed model and a keras.ops call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(4, 3, name="conv")
        self.pool = layers.GlobalAveragePooling2D(name="pool")
        self.head = Head(name="head")

    def call(self, x):
        return self.head(self.pool(ops.relu(self.conv(x))) * 2.0)


class RawTf(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc = layers.Dense(4)

    def call(self, x):
        return tf.nn.relu(self.fc(x))


class Branchy(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc = layers.Dense(4)

    def call(self, x):
        if ops.sum(x) > 0:
            return self.fc(x)
        return x


def _built(model, shape):
    model(np.ones((1, *shape), "float32"))
    return model


def _x(shape, n=5):
    return np.random.default_rng(1).standard_normal((n, *shape)).astype("float32")


def test_traced_model_reuses_layers_keeps_nesting_and_is_bit_identical():
    net = _built(Net(name="net"), (8, 8, 3))
    traced = surgery.functional(net)
    assert not isinstance(traced, Net) and traced.name == "net"
    assert traced.get_layer("conv") is net.conv
    head = traced.get_layer("head")
    assert isinstance(head, keras.Model) and not isinstance(head, Head)
    assert head.get_layer("fc") is net.head.fc
    x = _x((8, 8, 3))
    assert np.array_equal(traced.predict_on_batch(x), net.predict_on_batch(x))
    assert net.head is not head  # the original is left as it was


def test_bn_goes_into_a_traced_subclassed_model_and_its_nested_model():
    net = _built(Net(name="net"), (8, 8, 3))
    x = _x((8, 8, 3), 16)
    traced = surgery.functional(net)
    new = surgery.insert_identity_bn(traced, after=["conv", "head/fc"], data=x)
    names = {layer.name for layer in new.layers}
    assert "conv_bn" in names
    assert "fc_bn" in {layer.name for layer in new.get_layer("head").layers}
    assert np.array_equal(new.predict_on_batch(x), net.predict_on_batch(x))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="raw tf ops")
def test_untraceable_ops_are_named_in_one_line():
    with pytest.raises(surgery.SurgeryError) as raw:
        surgery.functional(_built(RawTf(), (5,)))
    message = str(raw.value)
    assert "tf.nn.relu(self.fc(x))" in message and "RawTf" in message
    assert len(message.splitlines()) == 1
    with pytest.raises(surgery.SurgeryError, match="Python control flow") as branch:
        surgery.functional(_built(Branchy(), (4,)), input_shape=(4,))
    assert "if ops.sum(x) > 0" in str(branch.value)


def test_unbuilt_model_needs_an_input_shape():
    with pytest.raises(surgery.SurgeryError, match="input_shape"):
        surgery.functional(Head())
    traced = surgery.functional(Head(), input_shape=(7,), check=False)
    assert traced.input_shape == (None, 7)


def test_insert_on_a_subclassed_model_points_to_functional():
    with pytest.raises(surgery.SurgeryError, match="surgery.functional"):
        surgery.insert_identity_bn(_built(Head(), (7,)), after=["fc"], data=_x((7,)))


def test_a_path_into_a_nested_subclassed_model_names_it_as_subclassed():
    inputs = keras.Input((7,))
    outer = keras.Model(inputs, _built(Head(name="p_net"), (7,))(inputs))
    with pytest.raises(surgery.SurgeryError, match="subclassed model \\(Head\\)"):
        surgery.insert_identity_bn(outer, after=["p_net/fc"], data=_x((7,)))


class Stack(keras.Model):
    """Subclassed blocks kept in a list."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Distinct inner names: the statistics pass inlines nested models.
        self.blocks = [Head("b0_", name="b0"), Head("b1_", name="b1")]
        self.mix = layers.Dense(6, name="mix")

    def call(self, x):
        x = self.blocks[0](x)
        return self.blocks[1](self.mix(ops.concatenate([x, x], axis=-1)))


def test_subclassed_models_in_a_list_are_traced_too():
    stack = _built(Stack(name="stack"), (6,))
    traced = surgery.functional(stack)
    inner = [layer for layer in traced.layers if isinstance(layer, keras.Model)]
    assert [m.name for m in inner] == ["b0", "b1"]
    assert not any(isinstance(m, Head) for m in inner)
    assert all(isinstance(b, Head) for b in stack.blocks)  # restored afterwards
    x = _x((6,))
    new = surgery.insert_identity_bn(traced, after=["b1/b1_fc"], data=x)
    assert np.array_equal(new.predict_on_batch(x), stack.predict_on_batch(x))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="raw tf ops")
def test_untraceable_line_is_found_in_an_installed_package(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "facepkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        "import keras\nimport tensorflow as tf\n\n\n"
        "class PNet(keras.Model):\n"
        "    def __init__(self, **kwargs):\n"
        "        super().__init__(**kwargs)\n"
        "        self.fc = keras.layers.Dense(4)\n\n"
        "    def call(self, x):\n"
        "        return tf.math.softplus(self.fc(x))\n"
    )
    monkeypatch.syspath_prepend(str(package.parent))
    from facepkg.nets import PNet

    with pytest.raises(surgery.SurgeryError, match="nets.py:11 `return tf.math"):
        surgery.functional(_built(PNet(name="p_net"), (3,)))
