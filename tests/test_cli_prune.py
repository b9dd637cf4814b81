"""`surgery prune` and `surgery inspect --groups`, run as a user runs them."""

import os

import keras
import numpy as np
import pytest
from helpers import run_cli

from surgery.cli import main
from surgery.cli.prune import amount
from surgery.errors import UsageError

DEAD = [2, 5, 11]  # fc1's units whose bias of -100 keeps them at 0


@pytest.fixture
def mlp(tmp_path):
    """fc1 (16, relu; units DEAD never fire) -> fc2 (4), saved as m.keras,
    and 64 inputs as x.npy."""
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="fc1"),
            keras.layers.Dense(4, name="fc2"),
        ],
        name="mlp",
    )
    kernel, bias = model.get_layer("fc1").get_weights()
    bias[DEAD] = -100.0
    model.get_layer("fc1").set_weights([kernel, bias])
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    # the fixture is what it says: DEAD are 0 on x, every other unit fires
    fires = (x.astype(np.float64) @ kernel + bias > 0).any(axis=0)
    assert sorted(np.flatnonzero(~fires)) == DEAD
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x)
    return tmp_path / "m.keras", x


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


def prune(capsys, model, *argv):
    """Run `surgery prune` in text mode: (exit code, stdout lines, stderr)."""
    code = main(["prune", *([str(model)] if model else []), *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip()


def untouched(path):
    return path.read_bytes(), os.stat(path).st_mtime_ns


def test_dead_units_go_and_the_outputs_stay(mlp, capsys):
    path, x = mlp
    before = untouched(path)
    out = path.parent / "out.keras"
    code, lines, err = prune(
        capsys, path, "--criterion", "dead", "--data", path.parent / "x.npy",
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert "  fc1: 16 -> 13" in lines and lines[-1] == f"wrote {out}"
    original, new = keras.models.load_model(path), keras.models.load_model(out)
    assert new.get_layer("fc1").units == 13
    # exactly the units DEAD are gone: the others' weights, in their order
    k1, b1 = original.get_layer("fc1").get_weights()
    k2, b2 = original.get_layer("fc2").get_weights()
    n1, c1 = new.get_layer("fc1").get_weights()
    n2, c2 = new.get_layer("fc2").get_weights()
    assert np.array_equal(n1, np.delete(k1, DEAD, axis=1))
    assert np.array_equal(c1, np.delete(b1, DEAD))
    assert np.array_equal(n2, np.delete(k2, DEAD, axis=0))
    assert np.array_equal(c2, b2)  # a dead unit adds 0: nothing moves into the bias
    expected = original.predict(x, verbose=0)
    got = new.predict(x, verbose=0)
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))
    assert untouched(path) == before


def test_l1_half_keeps_the_largest_kernel_columns(mlp, capsys):
    path, _ = mlp
    out = path.parent / "out.keras"
    code, lines, err = prune(
        capsys, path, "--criterion", "l1", "--amount", "0.5", "--out", out
    )
    assert code == 0, err
    assert "  fc1: 16 -> 8" in lines
    kernel = keras.models.load_model(path).get_layer("fc1").kernel.numpy()
    keep = np.sort(np.argsort(np.abs(kernel).sum(axis=0))[8:])
    new = keras.models.load_model(out)
    assert new.get_layer("fc1").kernel.shape == (8, 8)
    assert new.get_layer("fc2").kernel.shape == (8, 4)
    assert np.array_equal(new.get_layer("fc1").kernel.numpy(), kernel[:, keep])


def test_a_count_prunes_both_sides_of_a_residual_add_alike(residual, capsys):
    path, x = residual
    out = path.parent / "out.keras"
    code, result = run_cli(
        capsys, "prune", path, "--criterion", "l2", "--amount", "3",
        "--data", path.parent / "xi.npy", "--out", out,
    )  # fmt: skip
    assert code == 0, result
    assert result["amount"] == 3 and isinstance(result["amount"], int)
    new = keras.models.load_model(out)
    # s and a feed one Add: 8 - 3 channels each, and the BN between follows
    assert new.get_layer("s").filters == new.get_layer("a").filters == 5
    assert new.get_layer("bn").gamma.shape == (5,)
    assert new.get_layer("c").filters == 3
    assert new.get_layer("c").kernel.shape == (3, 3, 5, 3)
    assert new.predict(x, verbose=0).shape == (len(x), 5)
    assert result["recalibrated"] is True  # a ranking criterion, data and a BN


def test_no_recalibrate_keeps_the_bn_statistics(residual, capsys):
    path, _ = residual
    out = path.parent / "out.keras"
    code, result = run_cli(
        capsys, "prune", path, "--criterion", "l2", "--amount", "3",
        "--data", path.parent / "xi.npy", "--no-recalibrate", "--out", out,
    )  # fmt: skip
    assert code == 0, result
    assert result["recalibrated"] is False
    bn = keras.models.load_model(out).get_layer("bn")
    assert np.all(bn.moving_variance.numpy() == 1)  # Keras' initial value
    assert np.all(bn.moving_mean.numpy() == 0)


def test_json_has_the_report_and_the_output_path(mlp, capsys):
    path, x = mlp
    out = path.parent / "out.keras"
    code, result = run_cli(
        capsys, "prune", path, "--data", path.parent / "x.npy", "--out", out
    )
    assert code == 0, result
    assert result["out"] == str(out)
    assert result["criterion"] == "dead" and result["amount"] is None
    assert result["removed"] == len(DEAD)
    assert result["groups"] == [{"producers": ["fc1"], "before": 16, "after": 13}]
    original, new = keras.models.load_model(path), keras.models.load_model(out)
    assert result["params_before"] == original.count_params() == 8 * 16 + 16 + 68
    assert result["params_after"] == new.count_params() == 8 * 13 + 13 + 13 * 4 + 4
    assert result["difference"]["samples"] == len(x)
    assert result["recalibrated"] is False


def test_nothing_to_prune_writes_the_model_with_a_warning(tmp_path, capsys):
    inputs = keras.Input((8,))
    y = keras.layers.Dense(6, name="fc1")(inputs)  # linear: never constant
    keras.Model(inputs, keras.layers.Dense(3, name="fc2")(y)).save(tmp_path / "m.keras")
    x = np.random.default_rng(2).normal(size=(32, 8)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.keras"
    code, lines, err = prune(
        capsys, tmp_path / "m.keras", "--data", tmp_path / "x.npy", "--out", out
    )
    assert code == 0, err
    assert lines[0].startswith("pruned 0 channels")
    # stderr: one plain line per pass (not a terminal), then the warning
    warning = err.splitlines()[-1]
    assert [line.split(" (pass")[0] for line in err.splitlines()[:-1]] == [
        "statistics",
        "verify",
    ]
    assert warning.startswith("surgery: warning: no channel qualified by --criterion")
    assert keras.models.load_model(out).get_layer("fc1").units == 6


@pytest.mark.parametrize(
    "argv, message, usage",
    [
        (["--amount", "0.3", "--data", "x.npy"], "takes no --amount", True),
        (["--criterion", "l1"], "--criterion l1 needs --amount", True),
        (["--criterion", "l1", "--amount", "1.5"], "--amount 1.5: give", True),
        (["--criterion", "l1", "--amount", "0"], "--amount 0: give", True),
        (["--criterion", "l1", "--amount", "2.0"], "without a point: 2", True),
        (["--criterion", "l2", "--amount", "half"], "--amount half: give", True),
        ([], "measures the channels over data; pass --data", True),
        (["--criterion", "apoz", "--amount", "2"], "pass --data", True),
        (["--data", "x.npy", "--layers", "fc9"], "no layer 'fc9'", False),
        (["--data", "x.npy", "--layers", "fc2"], "cannot be removed", False),
        (["--data", "nothere.npy"], "nothere.npy", False),
    ],
)
def test_refusals_are_one_line_and_write_nothing(mlp, capsys, argv, message, usage):
    path, _ = mlp
    before = untouched(path)
    out = path.parent / "out.keras"
    argv = [str(path.parent / a) if a.endswith(".npy") else a for a in argv]
    code, _, err = prune(capsys, path, *argv, "--out", out)
    assert code == (2 if usage else 1), err
    assert len(err.splitlines()) == 1 and err.startswith("surgery: error:"), err
    assert message in err and "unexpected" not in err, err
    assert not out.exists()
    assert untouched(path) == before


def test_an_unknown_criterion_is_refused_by_the_parser(mlp, capsys):
    path, _ = mlp
    out = path.parent / "out.keras"
    with pytest.raises(SystemExit) as done:
        main(["prune", str(path), "--criterion", "l3", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2
    assert "invalid choice: 'l3'" in err[-1] and "bn_scale" in err[-1]
    assert not out.exists()


def test_a_layer_that_makes_no_channels_names_the_ones_that_do(residual, capsys):
    path, _ = residual
    out = path.parent / "out.keras"
    code, _, err = prune(
        capsys, path, "--criterion", "l1", "--amount", "1", "--layers", "bn",
        "--out", out,
    )  # fmt: skip
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "'bn' makes no channels of its own" in err and "s or a" in err
    assert not out.exists()


def test_an_existing_output_is_kept_without_force(mlp, capsys):
    path, _ = mlp
    before = untouched(path)
    out = path.parent / "out.keras"
    out.write_bytes(b"keep me")
    data = path.parent / "x.npy"
    code, _, err = prune(capsys, path, "--data", data, "--out", out)
    assert code == 1 and "exists; pass --force" in err
    assert len(err.splitlines()) == 1 and err.startswith("surgery: error:")
    assert out.read_bytes() == b"keep me"
    code, _, err = prune(capsys, path, "--data", data, "--out", out, "--force")
    assert code == 0, err
    assert keras.models.load_model(out).get_layer("fc1").units == 13
    assert untouched(path) == before


def test_the_embedded_default_is_measured_on_its_images(tmp_path, capsys):
    out = tmp_path / "pruned.keras"
    code, result = run_cli(
        capsys, "prune", "--criterion", "l1", "--amount", "1", "--out", out
    )
    assert code == 0, result
    assert result["difference"]["samples"] == 200
    new = keras.models.load_model(out)
    assert new.get_layer("fc1").units == 255


@pytest.mark.parametrize(
    "text, value", [("0.3", 0.3), ("4", 4), ("1", 1), ("+2", 2), ("1e-1", 0.1)]
)
def test_amount_reads_fractions_as_floats_and_counts_as_ints(text, value):
    parsed = amount(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["0", "1.0", "-2", "0.0", "nan", "inf", "", "1/2"])
def test_amount_refuses_what_is_neither(text):
    with pytest.raises(UsageError, match="--amount"):
        amount(text)


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
