"""recalibrate_bn reports: the mode used, how far each BN moved, dead units."""

import keras
import numpy as np
import pytest

import surgery
from surgery import cli

L = keras.layers


def _model():
    inputs = keras.Input((6,))
    x = L.Dense(8, activation="relu", name="fc")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, L.Dense(2, name="out")(x))


def _data():
    x = np.random.default_rng(0).normal(1, 2, (64, 6)).astype("float32")
    return x


def test_report_gives_mode_shift_and_warns_about_dead_units():
    model = _model()
    fc = model.get_layer("fc")
    kernel, bias = fc.get_weights()
    kernel[:, :3], bias[:3] = 0.0, -1.0  # three units never fire: dead
    fc.set_weights([kernel, bias])
    x = _data()
    with pytest.warns(UserWarning, match="'bn' 3 of 8"):
        new, report = surgery.recalibrate_bn(model, x, return_report=True, verbose=0)
    assert report.mode == "exact" and report.samples == 64
    (change,) = report.changes
    assert change.path == "bn" and change.units == 8 and change.dead == 3
    activations = np.maximum(x @ kernel + bias, 0)
    expected = np.abs(activations.mean(axis=0)).max() / np.sqrt(1 + 1e-3)
    assert change.mean_shift == pytest.approx(expected, rel=1e-5)
    var = activations.var(axis=0)
    assert change.var_ratio_max == pytest.approx(var.max(), rel=1e-4)
    assert change.var_ratio_min == 0.0
    assert np.array_equal(new.get_layer("bn").moving_variance.numpy() == 0, var == 0)


def test_cli_prints_a_table_and_the_mode_used(tmp_path, capsys):
    _model().save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", _data())
    argv = ["recalibrate", tmp_path / "m.keras", "--data", tmp_path / "x.npy"]
    code = cli.main([*map(str, argv), "--out", str(tmp_path / "r.keras")])
    out = capsys.readouterr().out
    assert code == 0 and "auto: exact BN statistics over 64 samples" in out
    header, row = out.splitlines()[-3:-1]
    assert header.split()[:3] == ["BN", "units", "dead"]
    assert row.split()[:3] == ["bn", "8", "0"]


def test_cli_reports_dead_units_as_one_warning_line(tmp_path, capsys):
    model = _model()
    fc = model.get_layer("fc")
    kernel, bias = fc.get_weights()
    fc.set_weights([kernel * 0, bias * 0 - 1])  # every unit dead
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", _data())
    argv = ["recalibrate", tmp_path / "m.keras", "--data", tmp_path / "x.npy"]
    code = cli.main([*map(str, argv), "--out", str(tmp_path / "r.keras")])
    err = capsys.readouterr().err.strip().splitlines()
    # stderr also has the plain progress line of each pass ("statistics ...")
    err = [line for line in err if line.startswith("surgery:")]
    assert code == 0 and err == [
        "surgery: warning: recalibrate_bn: units dead on the data (variance 0, so "
        "their scale becomes gamma/sqrt(eps)): 'bn' 8 of 8; check that the data "
        "covers what the model sees"
    ]
