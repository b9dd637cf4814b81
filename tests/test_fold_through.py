"""Forward folding through layers that are the identity at inference, and
`surgery fold` when nothing folds."""

import keras
import numpy as np
import pytest
from helpers import run_cli
from test_fold import bn_count, checked_fold, data, randomise_bn

from surgery import cli, default
from surgery.verbs.fold import fold_bn, foldable

L = keras.layers
EXACT = ["--zero-mean"] if keras.backend.backend() == "torch" else []


def _model(*layers, shape=(4, 3)):
    inputs = keras.Input(shape)
    x = inputs
    for layer in layers:
        x = layer(x) if not isinstance(layer, tuple) else layer[0](x, **layer[1])
    return randomise_bn(keras.Model(inputs, x))


@pytest.mark.parametrize(
    "skip",
    [
        L.Dropout(0.5, name="skip"),
        L.SpatialDropout1D(0.5, name="skip"),
        L.GaussianNoise(0.3, name="skip"),
        L.GaussianDropout(0.3, name="skip"),
        L.AlphaDropout(0.3, name="skip"),
        L.ActivityRegularization(l1=0.1, name="skip"),
        L.Identity(name="skip"),
        L.Activation("linear", name="skip"),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_bn_folds_forward_through_an_inference_identity(skip):
    model = _model(
        L.Dense(3),
        L.ReLU(),
        L.BatchNormalization(name="bn"),
        skip,
        L.Dense(5, name="next"),
    )
    kind = type(skip).__name__
    assert foldable(model) == {
        "bn": f"ok: forward into Dense 'next' (through {kind} 'skip')"
    }
    new = checked_fold(model, data(4, 3))
    assert bn_count(new) == 0 and new.get_layer("next").use_bias
    assert type(new.get_layer("skip")) is type(skip)  # kept: identity anyway


def test_bn_folds_forward_through_a_chain_into_a_valid_conv():
    model = _model(
        L.Conv2D(3, 1),
        L.ReLU(),
        L.BatchNormalization(name="bn"),
        L.SpatialDropout2D(0.2, name="drop"),
        L.Dropout(0.1, name="drop2"),
        L.Conv2D(4, 3, name="next"),
        shape=(8, 8, 3),
    )
    assert foldable(model)["bn"] == (
        "ok: forward into Conv2D 'next' (through SpatialDropout2D 'drop', "
        "Dropout 'drop2')"
    )
    assert bn_count(checked_fold(model, data(8, 8, 3))) == 0


@pytest.mark.parametrize(
    "between,why",
    [
        ((L.Dropout(0.5, name="d"), {"training": True}), "feeds Dropout 'd'"),
        (L.Activation("relu", name="d"), "feeds Activation 'd'"),
        (L.Flatten(name="d"), "feeds Flatten 'd'"),
    ],
    ids=["training=True", "relu", "flatten"],
)
def test_only_inference_identities_are_looked_through(between, why):
    model = _model(
        L.Dense(3), L.ReLU(), L.BatchNormalization(name="bn"), between, L.Dense(2)
    )
    reason = foldable(model)["bn"]
    assert why in reason and "not a Dense or convolution layer" in reason
    with pytest.warns(UserWarning, match="left 1 BatchNormalization"):
        assert bn_count(fold_bn(model)) == 1


def test_an_output_read_twice_past_a_dropout_stays():
    inputs = keras.Input((4,))
    x = L.ReLU()(L.Dense(3)(inputs))
    x = L.Dropout(0.5, name="d")(L.BatchNormalization(name="bn")(x))
    model = randomise_bn(keras.Model(inputs, [L.Dense(2)(x), L.Dense(2)(x)]))
    assert foldable(model)["bn"].endswith(
        "its output (through Dropout 'd') goes to a model output or several layers"
    )


@pytest.fixture(scope="module")
def flagship(tmp_path_factory):
    """The embedded default converted as the README says: BN after fc1, fc2."""
    out = tmp_path_factory.mktemp("flagship") / "x.keras"
    assert cli.main(["--format", "json", "convert", "--out", str(out), *EXACT]) == 0
    return out


def test_fold_of_the_flagship_conversion_folds_both_bns(flagship, tmp_path, capsys):
    out = tmp_path / "f.keras"
    images = default.images_dir()
    code, result = run_cli(
        capsys, "fold", flagship, "--out", out, "--data", images, "--max-samples", 64
    )
    assert code == 0, result
    assert result["folded"] == ["fc1_bn", "fc2_bn"] and result["kept"] == {}
    assert result["how"] == {
        "fc1_bn": "ok: forward into Dense 'fc2' (through Dropout 'dropout')",
        "fc2_bn": "ok: forward into Dense 'predictions' (through Dropout 'dropout_1')",
    }
    folded = keras.models.load_model(out)
    names = [layer.name for layer in folded.layers]
    assert bn_count(folded) == 0 and {"dropout", "dropout_1"} <= set(names)
    x = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    expected = keras.models.load_model(flagship).predict_on_batch(x)
    np.testing.assert_allclose(
        folded.predict_on_batch(x), expected, rtol=1e-5, atol=1e-5
    )


def _unfoldable(path):
    """Dense(relu) -> BN as the output: folds neither way."""
    model = _model(L.Dense(3, activation="relu"), L.BatchNormalization(name="bn"))
    model.save(path)
    return model


def test_fold_with_nothing_folded_says_why_and_writes_nothing(tmp_path, capsys):
    _unfoldable(tmp_path / "m.keras")
    out = tmp_path / "f.keras"
    assert cli.main(["fold", str(tmp_path / "m.keras"), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("surgery: error: ")
    assert "no BatchNormalization layer folds" in err
    assert "'bn': Dense 'dense" in err and "activation 'relu'" in err
    assert f"nothing was written to {out}" in err and "--write-unchanged" in err
    assert "Traceback" not in captured.out + captured.err
    assert not out.exists()
    help_text = _help(capsys, "fold")
    assert "--write-unchanged" in help_text


def test_fold_write_unchanged_writes_the_copy_with_a_warning(tmp_path, capsys):
    model = _unfoldable(tmp_path / "m.keras")
    out = tmp_path / "f.keras"
    argv = ["fold", str(tmp_path / "m.keras"), "--out", str(out), "--write-unchanged"]
    assert cli.main(["--format", "json", *argv]) == 0
    captured = capsys.readouterr()
    warning = captured.err.strip()
    assert len(warning.splitlines()) == 1
    assert warning.startswith("surgery: warning: no BatchNormalization layer folds")
    assert out.exists() and bn_count(keras.models.load_model(out)) == 1
    x = data(4, 3)
    np.testing.assert_array_equal(
        keras.models.load_model(out).predict_on_batch(x), model.predict_on_batch(x)
    )


def _help(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return capsys.readouterr().out
