"""`surgery edit`: layer edits from the command line, in one rebuild."""

import os

import keras
import numpy as np
import pytest
from helpers import run_cli

from surgery.cli import main


@pytest.fixture
def mlp(tmp_path):
    """fc1 (relu) -> drop -> fc2, saved as m.keras, and 32 inputs as x.npy."""
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="fc1"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(4, name="fc2"),
        ]
    )
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    return tmp_path / "m.keras", x, model.predict(x, verbose=0)


def edit(capsys, model, *argv):
    """Run `surgery edit` in text mode: (exit code, stdout lines, stderr)."""
    code = main(["edit", str(model), *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip()


def names(model):
    return [layer.name for layer in model.layers]


def test_delete_keeps_the_outputs(mlp, capsys):
    path, x, expected = mlp
    out = path.parent / "out.keras"
    code, lines, err = edit(capsys, path, "--delete", "drop", "--out", out)
    assert code == 0, err
    assert lines == ["deleted drop", f"wrote {out}"]
    new = keras.models.load_model(out)
    assert names(new) == ["fc1", "fc2"]
    assert np.array_equal(new.predict(x, verbose=0), expected)


def test_replace_changes_the_activation_and_keeps_the_weights(mlp, capsys):
    path, x, _ = mlp
    out = path.parent / "out.keras"
    spec = "fc1=Dense:units=16,activation=gelu"
    code, lines, err = edit(capsys, path, "--replace", spec, "--out", out)
    assert code == 0, err
    assert lines[0] == "replaced fc1 with Dense:units=16,activation=gelu"
    original, new = keras.models.load_model(path), keras.models.load_model(out)
    fc1 = new.get_layer("fc1")
    assert fc1.get_config()["activation"] == "gelu"
    assert np.array_equal(fc1.kernel.numpy(), original.get_layer("fc1").kernel.numpy())
    assert np.array_equal(fc1.bias.numpy(), original.get_layer("fc1").bias.numpy())


def test_no_copy_weights_starts_the_replacement_afresh(mlp, capsys):
    path, _, _ = mlp
    out = path.parent / "out.keras"
    code, _, err = edit(
        capsys, path, "--replace", "fc1=Dense:units=16,activation=gelu",
        "--no-copy-weights", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    kernel = keras.models.load_model(out).get_layer("fc1").kernel.numpy()
    original = keras.models.load_model(path).get_layer("fc1").kernel.numpy()
    assert not np.array_equal(kernel, original)


def test_deepen_adds_a_dense_layer_and_keeps_the_outputs(mlp, capsys):
    path, x, expected = mlp
    out = path.parent / "out.keras"
    code, lines, err = edit(capsys, path, "--deepen", "fc1", "--out", out)
    assert code == 0, err
    assert lines == ["deepened fc1", f"wrote {out}"]
    new = keras.models.load_model(out)
    dense = [layer for layer in new.layers if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == 3
    assert np.array_equal(new.predict(x, verbose=0), expected)


def test_insert_after_puts_the_layer_there(mlp, capsys):
    path, _, _ = mlp
    out = path.parent / "out.keras"
    code, lines, err = edit(
        capsys, path, "--insert-after", "fc1=LayerNormalization", "--out", out
    )
    assert code == 0, err
    assert lines[0] == "inserted LayerNormalization after fc1"
    layers = keras.models.load_model(out).layers
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds == ["Dense", "LayerNormalization", "Dropout", "Dense"]


def test_two_edits_in_one_call_with_json_and_verify(mlp, capsys):
    path, x, expected = mlp
    out = path.parent / "out.keras"
    code, result = run_cli(
        capsys, "edit", path, "--delete", "drop", "--insert-before", "fc2=ReLU",
        "--data", path.parent / "x.npy", "--out", out,
    )  # fmt: skip
    assert code == 0, result
    assert result["out"] == str(out)
    assert result["edits"] == [
        {"edit": "delete", "layer": "drop"},
        {"edit": "insert_before", "layer": "fc2", "spec": "ReLU"},
    ]
    assert result["identical"] is True  # fc1 ends in relu: relu(relu(x)) == relu(x)
    assert result["samples"] == len(x)
    new = keras.models.load_model(out)
    kinds = [type(layer).__name__ for layer in new.layers]
    assert kinds == ["Dense", "ReLU", "Dense"]
    assert np.array_equal(new.predict(x, verbose=0), expected)


def test_data_prints_the_verify_line(mlp, capsys):
    path, _, _ = mlp
    out = path.parent / "out.keras"
    code, lines, err = edit(
        capsys, path, "--replace", "fc1=Dense:units=16,activation=gelu",
        "--data", path.parent / "x.npy", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert lines[-2].startswith("outputs vs the original: identical: False")
    assert lines[-1] == f"wrote {out}"


def test_insertions_at_one_name_go_in_command_line_order(mlp, capsys):
    path, _, _ = mlp
    out = path.parent / "out.keras"
    code, _, err = edit(
        capsys, path, "--insert-after", "fc1=LayerNormalization",
        "--insert-after", "fc1=ReLU", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    kinds = [type(layer).__name__ for layer in keras.models.load_model(out).layers]
    assert kinds == ["Dense", "LayerNormalization", "ReLU", "Dropout", "Dense"]


@pytest.mark.parametrize(
    "argv, message, usage",
    [
        (["--delete", "fc9"], "fc9", False),
        (["--replace", "fc1=Dens:units=16"], "did you mean Dense?", True),
        (["--replace", "fc1=Dense:unit=16"], "Dense has no argument 'unit'", True),
        (["--replace", "fc1"], "--replace 'fc1': write NAME=SPEC", True),
        (["--insert-after", "fc1"], "write NAME=SPEC", True),
        (["--replace", "fc1=Dense:units=3"], "fc1", False),
        ([], "nothing to edit", True),
        (["--delete", "drop", "--delete", "drop"], "given twice", True),
        (["--replace", "fc1=nomodule_x:build"], "cannot import", False),
        (
            ["--replace", "fc1=Dense:units=16,use_bias=False"],
            "pass --no-copy-weights",
            False,
        ),
        (["--delete", "fc1", "--replace", "fc1=ReLU"], "name the same layer", False),
        (["--deepen", "drop"], "cannot deepen 'drop'", False),
    ],
)
def test_bad_edits_are_one_line_and_write_nothing(mlp, capsys, argv, message, usage):
    path, _, _ = mlp
    before = path.read_bytes(), os.stat(path).st_mtime_ns
    out = path.parent / "out.keras"
    code, lines, err = edit(capsys, path, *argv, "--out", out)
    assert code == (2 if usage else 1), err
    assert len(err.splitlines()) == 1 and err.startswith("surgery: error:"), err
    assert message in err and "Traceback" not in err, err
    assert "unexpected" not in err, err
    assert not out.exists()
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before


def test_an_existing_output_is_kept_without_force(mlp, capsys):
    path, _, _ = mlp
    before = path.read_bytes(), os.stat(path).st_mtime_ns
    out = path.parent / "out.keras"
    out.write_bytes(b"keep me")
    code, _, err = edit(capsys, path, "--delete", "drop", "--out", out)
    assert code == 1 and "exists; pass --force" in err
    assert len(err.splitlines()) == 1 and err.startswith("surgery: error:")
    assert out.read_bytes() == b"keep me"
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
    code, _, err = edit(capsys, path, "--delete", "drop", "--out", out, "--force")
    assert code == 0, err
    assert names(keras.models.load_model(out)) == ["fc1", "fc2"]
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before


def test_out_may_not_be_the_model(mlp, capsys):
    path, _, _ = mlp
    before = path.read_bytes()
    code, _, err = edit(capsys, path, "--delete", "drop", "--out", path, "--force")
    assert code == 2 and "is an input of this command" in err
    assert path.read_bytes() == before


def test_a_module_function_spec_inserts_its_list_of_layers(mlp, capsys, monkeypatch):
    path, _, _ = mlp
    (path.parent / "mylayers_edit.py").write_text(
        "import keras\n\n\ndef pair():\n"
        "    return [keras.layers.LayerNormalization(), keras.layers.ReLU()]\n"
    )
    monkeypatch.syspath_prepend(str(path.parent))
    out = path.parent / "out.keras"
    code, lines, err = edit(
        capsys, path, "--insert-after", "fc1=mylayers_edit:pair", "--out", out
    )
    assert code == 0, err
    assert lines[0] == "inserted mylayers_edit:pair after fc1"
    kinds = [type(layer).__name__ for layer in keras.models.load_model(out).layers]
    assert kinds == ["Dense", "LayerNormalization", "ReLU", "Dropout", "Dense"]


def test_deepening_a_gelu_layer_warns_in_one_line(tmp_path, capsys):
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, activation="gelu", name="fc")]
    )
    model.save(tmp_path / "g.keras")
    out = tmp_path / "out.keras"
    code, lines, err = edit(
        capsys, tmp_path / "g.keras", "--deepen", "fc", "--out", out
    )
    assert code == 0 and lines == ["deepened fc", f"wrote {out}"]
    assert err.startswith("surgery: warning:") and "gelu" in err, err
    assert len(err.splitlines()) == 1
    assert [layer.name for layer in keras.models.load_model(out).layers] == [
        "fc",
        "fc_deep",
    ]


def test_a_replacement_named_in_its_spec_keeps_that_name(mlp, capsys):
    path, _, _ = mlp
    out = path.parent / "out.keras"
    code, _, err = edit(
        capsys, path, "--replace", "fc1=Dense:units=16,name=wide", "--out", out
    )
    assert code == 0, err
    assert names(keras.models.load_model(out)) == ["wide", "drop", "fc2"]


SUBCLASSED_PY = """
import keras
import numpy as np


class Net(keras.Model):
    def __init__(self):
        super().__init__(name="net")
        self.fc1 = keras.layers.Dense(16, activation="relu", name="fc1")
        self.drop = keras.layers.Dropout(0.5, name="drop")
        self.fc2 = keras.layers.Dense(4, name="fc2")

    def call(self, x):
        return self.fc2(self.drop(self.fc1(x)))


def build():
    model = Net()
    model(np.ones((1, 8), "float32"))
    return model
"""


def test_a_subclassed_model_is_traced_then_edited(tmp_path, capsys, monkeypatch):
    (tmp_path / "mynet_edit.py").write_text(SUBCLASSED_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out.keras"
    code, result = run_cli(
        capsys, "edit", "mynet_edit:build", "--delete", "drop", "--out", out
    )
    assert code == 0, result
    assert "traced subclassed model 'net'" in result["notes"][0]
    assert names(keras.models.load_model(out))[-2:] == ["fc1", "fc2"]


def test_the_embedded_default_is_verified_on_its_images(tmp_path, capsys):
    out = tmp_path / "edited.keras"
    code, result = run_cli(
        capsys, "edit", "--delete", "dropout", "--deepen", "fc1", "--out", out
    )
    assert code == 0, result
    assert result["identical"] is True and result["samples"] == 200
    assert "fc1_deep" in names(keras.models.load_model(out))
