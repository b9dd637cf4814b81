"""Models as packages ship them: built without a shape, free dimensions,
custom layers (`--import`), weights-only files, and every flag an error names."""

import ast
import pathlib
import re
import sys
import uuid

import keras
import numpy as np
import pytest
from helpers import run_cli

import surgery
from surgery import cli

L = keras.layers


class ONetLike(keras.Model):
    """mtcnn's pattern: `build()` has a default shape and builds each layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = L.Conv2D(4, 3, name="conv1")
        self.prelu1 = L.PReLU(shared_axes=[1, 2], name="prelu1")
        self.pool = L.MaxPooling2D(2, name="pool")
        self.flatten = L.Flatten(name="flatten")
        self.fc = L.Dense(3, name="fc")

    def build(self, input_shape=(None, 12, 12, 3)):
        shape = input_shape
        for layer in (self.conv1, self.prelu1, self.pool, self.flatten, self.fc):
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        super().build(input_shape)

    def call(self, x):
        return self.fc(self.flatten(self.pool(self.prelu1(self.conv1(x)))))


class FullyConvolutional(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.c1 = L.Conv2D(4, 3, padding="same", activation="relu", name="c1")
        self.c2 = L.Conv2D(2, 1, name="c2")

    def call(self, x):
        return self.c2(self.c1(x))


def _pretrained_onet():
    """As mtcnn builds its nets: `ONet(); build(); set_weights(...)`."""
    net = ONetLike(name="o_net")
    net.build()
    rng = np.random.default_rng(0)
    net.set_weights([rng.normal(size=w.shape) * 0.3 for w in net.get_weights()])
    return net


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes `source` as a fresh module in tmp_path; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)

    def write(source):
        name = f"wild_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(source)
        return name

    return write


# 1. Subclassed models built as their packages build them


def test_a_model_built_with_builds_default_shape_is_traced():
    net = _pretrained_onet()
    x = np.random.default_rng(1).normal(size=(4, 12, 12, 3)).astype("float32")
    net(x)  # called on a batch as well: still no recorded shape in Keras
    traced = surgery.functional(net)
    assert traced.input_shape == (None, 12, 12, 3)
    assert np.array_equal(traced.predict_on_batch(x), net.predict_on_batch(x))


_MTCNN_LIKE = """
import numpy as np
from test_wild_models import ONetLike, FullyConvolutional


def onet():
    net = ONetLike(name="o_net")
    net.build()
    net.set_weights([np.full(w.shape, 0.1, "float32") for w in net.get_weights()])
    return net


def fcn():
    return FullyConvolutional(name="fcn")
"""


def test_cli_traces_an_mtcnn_style_model(user_module, capsys):
    module = user_module(_MTCNN_LIKE)
    code, out = run_cli(capsys, "inspect", f"{module}:onet")
    assert code == 0, out
    assert "traced subclassed model 'o_net' (ONetLike)" in out["notes"][0]
    assert [row["path"] for row in out["layers"]][1:3] == ["conv1", "prelu1"]


def test_an_unbuilt_model_asks_for_input_shape_that_exists(user_module, capsys):
    module = user_module(_MTCNN_LIKE)
    code, err = run_cli(capsys, "inspect", f"{module}:fcn")
    assert code == 1 and err.count("\n") == 0
    assert "--input-shape 224,224,3" in err and "call it once" not in err
    code, out = run_cli(capsys, "inspect", f"{module}:fcn", "--input-shape", "8,8,3")
    assert code == 0, out
    assert out["layers"][0]["shapes"] == [[None, 8, 8, 3]]


def test_an_unbuilt_builder_takes_its_weights_with_input_shape(
    user_module, tmp_path, capsys
):
    module = user_module(_MTCNN_LIKE)
    trained = FullyConvolutional(name="fcn")
    x = np.random.default_rng(2).normal(size=(2, 6, 6, 3)).astype("float32")
    trained(x)
    trained.save_weights(tmp_path / "fcn.weights.h5")
    argv = ["inspect", f"{module}:fcn", "--weights", tmp_path / "fcn.weights.h5"]
    code, err = run_cli(capsys, *argv)
    assert code == 1 and "--input-shape" in err
    code, out = run_cli(capsys, *argv, "--input-shape", "None,None,3")
    assert code == 0, out
    assert out["layers"][0]["shapes"] == [[None, None, None, 3]]


# 2. Free dimensions: --input-shape and functional(input_shape=)

_DENSE_AFTER_FLATTEN = """
from test_wild_models import ONetLike


def net():
    model = ONetLike(name="o_net")
    model.build()  # the Dense is built for 12x12 inputs: traces, runs at no size
    return model
"""


def test_functional_traces_free_dimensions_of_a_fully_convolutional_model():
    net = FullyConvolutional()
    traced = surgery.functional(net, input_shape=(None, None, 3))
    assert traced.input_shape == (None, None, None, 3)
    for size in (5, 17):
        x = np.random.default_rng(size).normal(size=(2, size, size, 3))
        x = x.astype("float32")
        assert np.array_equal(traced.predict_on_batch(x), net.predict_on_batch(x))


def test_functional_refuses_free_dimensions_a_dense_head_cannot_take():
    with pytest.raises(surgery.SurgeryError) as caught:
        surgery.functional(ONetLike(), input_shape=(None, None, 3))
    message = str(caught.value)
    assert "\n" not in message and "free dimensions" in message
    assert "input_shape=(12,12,3) (--input-shape 12,12,3)" in message  # build's


def test_a_trace_that_runs_at_no_size_names_the_size_to_give(user_module, capsys):
    module = user_module(_DENSE_AFTER_FLATTEN)
    code, err = run_cli(capsys, "inspect", f"{module}:net", "--input-shape=None,None,3")
    assert code == 1 and err.count("\n") == 0
    assert "runs on no size tried" in err and "Exception encountered" not in err
    assert err.endswith("e.g. input_shape=(12,12,3) (--input-shape 12,12,3)")


@pytest.mark.parametrize("shape", [(0, 3), ("a", 3), (2.5,), ()])
def test_functional_refuses_a_malformed_input_shape(shape):
    with pytest.raises(surgery.SurgeryError, match="positive int or None"):
        surgery.functional(FullyConvolutional(), input_shape=shape)


def test_cli_converts_a_fully_convolutional_model_with_free_dimensions(
    user_module, tmp_path, capsys
):
    module = user_module(_MTCNN_LIKE)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).normal(size=(8, 10, 10, 3)).astype("f4"))
    out = tmp_path / "fcn_bn.keras"
    argv = ["convert", f"{module}:fcn", "--input-shape", "None,None,3"]
    code, result = run_cli(capsys, *argv, "--data", data, "--after", "c1", "--out", out)
    assert code == 0, result
    assert keras.models.load_model(out).input_shape == (None, None, None, 3)


@pytest.mark.parametrize("text", ["8,x", "0,3", ",", "-1,3"])
def test_a_malformed_input_shape_is_a_usage_error(capsys, text):
    code, err = run_cli(capsys, "inspect", f"--input-shape={text}")
    assert code == 2 and err.startswith("surgery: error: --input-shape")
    assert err.count("\n") == 0


def test_input_shape_on_a_functional_model_must_be_its_own(capsys):
    code, err = run_cli(capsys, "inspect", "--input-shape", "9,9,3")
    assert code == 1 and "is a Functional model with input shape" in err
    assert "drop --input-shape" in err


# 3. --import: custom layers through every command

_CUSTOM = """
import keras


@keras.saving.register_keras_serializable(package="{name}")
class Scale(keras.layers.Layer):
    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {{**super().get_config(), "factor": self.factor}}


def build():
    inputs = keras.Input((8,), name="x")
    x = keras.layers.Dense(16, activation="relu", name="fc1")(inputs)
    x = Scale(name="scale")(x)
    x = keras.layers.Dense(16, name="fc2")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x), name="custom")
"""


def _forget(module):
    """As in a new process: the module not imported, its class unknown."""
    sys.modules.pop(module, None)
    keras.saving.get_custom_objects().pop(f"{module}>Scale", None)


def test_import_loads_custom_layers_in_every_command(user_module, tmp_path, capsys):
    name = f"wild_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(_CUSTOM.format(name=name))
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).normal(size=(16, 8)).astype("float32"))
    conv = tmp_path / "conv.keras"
    code, out = run_cli(
        capsys, "convert", f"{name}:build", "--data", data, "--after", "fc2",
        "--out", conv,
    )  # fmt: skip
    assert code == 0, out
    try:
        _forget(name)
        code, err = run_cli(capsys, "inspect", conv)
        assert code == 1 and err.count("\n") == 0
        assert "custom class 'Scale'" in err and f"--import {name}" in err
        commands = [
            ["inspect", conv],
            ["stats", conv, "--data", data, "--layers", "fc1", "--out", "s.npz"],
            ["insert", conv, "--stats", "s.npz", "--out", "i.keras"],
            ["verify", conv, "i.keras", "--data", data],
            ["fold", conv, "--out", "f.keras"],
            ["recalibrate", conv, "--data", data, "--out", "r.keras"],
            ["edit", conv, "--delete", "scale", "--out", "e.keras"],
            ["prune", conv, "--criterion", "l1", "--amount", "1", "--out", "p.keras"],
            ["convert", conv, "--data", data, "--after", "fc1", "--out", "c.keras"],
        ]
        for argv in commands:
            _forget(name)
            code, out = run_cli(capsys, *argv, "--import", name)
            assert code == 0, (argv, out)
    finally:
        _forget(name)


def test_import_errors_are_one_line(user_module, capsys):
    broken = user_module("raise RuntimeError('half-written module')\n")
    cases = {
        "no_such_module_here": "cannot import 'no_such_module_here'",
        "layers.py": "give a Python module name",
        broken: "raised RuntimeError: half-written module; fix the module",
    }
    for module, expected in cases.items():
        code, err = run_cli(capsys, "inspect", "--import", module)
        assert code == 1 and expected in err and err.count("\n") == 0, err


# 4. Weights-only files name routes that exist


def test_weights_only_file_names_the_routes_that_work(tmp_path, capsys):
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="fc")], name="tiny")
    weights = tmp_path / "tiny.weights.h5"
    model.save_weights(weights)
    (tmp_path / "arch.json").write_text(model.to_json())
    code, err = run_cli(capsys, "inspect", weights)
    assert code == 1 and err.count("\n") == 0
    assert "--family" not in err
    assert "vgg16 --weights tiny.weights.h5" in err
    assert "net.json --weights tiny.weights.h5" in err
    assert ":build --weights tiny.weights.h5" in err
    code, out = run_cli(capsys, "inspect", tmp_path / "arch.json", "--weights", weights)
    assert code == 0, out
    code, err = run_cli(capsys, "inspect", "--weights", weights)
    assert code == 1 and "family name (vgg16)" in err and "module:function" in err


# 5. Every flag an error, hint or help text names exists

_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_SOURCE = pathlib.Path(surgery.__file__).parent
# Flags of other programs that messages name: `ray start --head`, and the
# embedded model's training script (`python -m surgery.default.train`).
_OTHER_PROGRAMS = {"--head"}
_OWN_PARSERS = ("default/train.py",)
# The commands each CLI module defines: its messages must name their flags.
_COMMANDS = {
    "convert": ("convert", "insert", "verify"),
    "deploy": ("fold", "recalibrate"),
    "stats": ("stats", "merge"),
    "inspect": ("inspect",),
    "edit": ("edit",),
    "prune": ("prune", "inspect"),  # its errors point at `inspect MODEL --groups`
}


def _parsers():
    import argparse

    parser = cli._parser()
    top = {s for a in parser._actions for s in a.option_strings}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return top, sub.choices


def _flags_in_strings(path):
    """`--flags` in a module's string literals (f-strings' text included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(_FLAG.findall(node.value))
    return found


def test_every_flag_a_message_names_exists():
    top, commands = _parsers()
    everywhere = set(top)
    for command in commands.values():
        everywhere |= {s for a in command._actions for s in a.option_strings}
    missing = {}
    for path in sorted(_SOURCE.rglob("*.py")):
        name = str(path.relative_to(_SOURCE))
        if "testing" in path.parts or name in _OWN_PARSERS:
            continue
        unknown = _flags_in_strings(path) - everywhere - _OTHER_PROGRAMS
        if unknown:
            missing[name] = sorted(unknown)
    assert not missing, missing


def test_every_flag_a_command_module_names_is_one_of_its_commands():
    top, commands = _parsers()
    missing = {}
    for module, names in _COMMANDS.items():
        own = set(top)
        for name in names:
            own |= {s for a in commands[name]._actions for s in a.option_strings}
        unknown = _flags_in_strings(_SOURCE / "cli" / f"{module}.py") - own
        if unknown:
            missing[module] = sorted(unknown)
    assert not missing, missing


def test_every_flag_a_help_text_names_is_an_option_of_that_command():
    _, commands = _parsers()
    missing = {}
    for name, command in commands.items():
        own = {s for a in command._actions for s in a.option_strings}
        texts = [a.help or "" for a in command._actions] + [command.description or ""]
        unknown = {flag for text in texts for flag in _FLAG.findall(text)} - own
        if unknown:
            missing[name] = sorted(unknown)
    assert not missing, missing
