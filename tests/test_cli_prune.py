"""`surgery prune` and `surgery inspect --groups`, run as a user runs them."""

import keras
import numpy as np
import pytest
from helpers import run_cli

from surgery.cli import main


@pytest.fixture
def residual(tmp_path):
    """stem s -> a -> bn, added back to s (one group s + a), then c, out."""
    inputs = keras.Input((8, 8, 3), name="x")
    s = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="s")(inputs)
    a = keras.layers.Conv2D(8, 3, padding="same", name="a")(s)
    a = keras.layers.BatchNormalization(name="bn")(a)
    y = keras.layers.Add(name="add")([s, a])
    y = keras.layers.ReLU(name="relu")(y)
    y = keras.layers.Conv2D(6, 3, name="c")(y)
    y = keras.layers.GlobalAveragePooling2D(name="gap")(y)
    model = keras.Model(inputs, keras.layers.Dense(5, name="out")(y), name="res")
    model.save(tmp_path / "res.keras")
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "xi.npy", x)
    return tmp_path / "res.keras", x


def test_inspect_groups_lists_coupled_producers_together(residual, capsys):
    path, _ = residual
    code = main(["inspect", str(path), "--groups"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    coupled = [line for line in lines if line.startswith("s + a: ")]
    assert len(coupled) == 1, lines
    assert "8 channels (8 removable)" in coupled[0]
    assert coupled[0].endswith("layers: s, a, bn, c")
    assert sum(line.startswith(("s:", "a:")) for line in lines) == 0
    assert "x: 3 channels (fixed: it is model input 'x'); layers: x, s" in lines
    assert lines[-1] == "4 channel groups, 14 channels removable"

    code, result = run_cli(capsys, "inspect", path, "--groups")
    assert code == 0 and result["model"] == "res"
    rows = {tuple(row["producers"]): row for row in result["groups"]}
    assert set(rows) == {("x",), ("s", "a"), ("c",), ("out",)}
    assert rows["s", "a"] == {
        "producers": ["s", "a"],
        "layers": ["s", "a", "bn", "c"],
        "size": 8,
        "removable": 8,
        "fixed": None,
        "mixed": None,
    }
    out = rows[("out",)]
    assert out["removable"] == 0 and out["fixed"] == "it reaches model output 'out'"


def test_inspect_groups_names_a_layer_that_mixes_channels(tmp_path, capsys):
    inputs = keras.Input((8,))
    y = keras.layers.Dense(6, name="fc1")(inputs)
    y = keras.layers.LayerNormalization(name="ln")(y)
    keras.Model(inputs, keras.layers.Dense(3, name="fc2")(y)).save(tmp_path / "m.keras")
    code, result = run_cli(capsys, "inspect", tmp_path / "m.keras", "--groups")
    assert code == 0, result
    fc1 = next(row for row in result["groups"] if row["producers"] == ["fc1"])
    assert fc1["mixed"] == "ln"
    main(["inspect", str(tmp_path / "m.keras"), "--groups"])
    out = capsys.readouterr().out
    assert "fc1: 6 channels (6 removable; mixed by ln); layers: fc1, ln, fc2" in out
