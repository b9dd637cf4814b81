"""CLI behaviour for models from the wild: ulp tolerance, defaults, preprocessing."""

import keras
import numpy as np
from helpers import run_cli

from surgery import cli, default


def _features(tmp_path, count=8):
    x = np.random.default_rng(3).uniform(0, 255, (count, 32, 32, 3)).astype("float32")
    path = tmp_path / "x.npy"
    np.save(path, x)
    return path


def _perturbed(tmp_path):
    other = default.load()
    kernel = other.get_layer("fc2").kernel
    kernel.assign(kernel.numpy() * 1.001)
    other.save(tmp_path / "other.keras")
    return tmp_path / "other.keras"


def test_verify_prints_whether_outputs_are_within_max_ulp(tmp_path, capsys):
    data, other = _features(tmp_path), _perturbed(tmp_path)
    argv = ["verify", default.model_path(), other, "--data", data]
    code, strict = run_cli(capsys, *argv)
    assert code == 1 and strict["within_ulp"] is False
    loose = strict["max_ulp_diff"]
    assert cli.main([*map(str, argv), "--max-ulp", str(loose)]) == 0
    assert f"within {loose} ulp: True" in capsys.readouterr().out
    assert cli.main([*map(str, argv), "--max-ulp", str(loose - 1)]) == 1
    assert f"within {loose - 1} ulp: False" in capsys.readouterr().out


_SUBCLASSED = """
import keras
import keras
import numpy as np
from keras import layers


class Small(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc = layers.Dense(6, activation="relu", name="fc")
        self.head = layers.Dense(2, name="head")

    def call(self, x):
        return self.head(self.fc(keras.ops.reshape(x, (-1, 32 * 32 * 3)) / 255.0))


def build():
    model = Small(name="small")
    model(np.ones((1, 32, 32, 3), "float32"))
    return model
"""


def test_convert_and_inspect_trace_a_subclassed_model(tmp_path, capsys, monkeypatch):
    (tmp_path / "mymodels.py").write_text(_SUBCLASSED)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["inspect", "mymodels:build"]) == 0
    out = capsys.readouterr().out
    assert "traced subclassed model 'small' (Small)" in out and "fc " in out
    data, target = _features(tmp_path), tmp_path / "bn.keras"
    argv = ["convert", "mymodels:build", "--data", data, "--after", "fc"]
    code, result = run_cli(capsys, *argv, "--out", target)
    assert code == 0 and result["identical"] is True
    assert result["notes"][0].startswith("traced subclassed model 'small' (Small)")
    converted = keras.models.load_model(target, safe_mode=True)
    assert "fc_bn" in [layer.name for layer in converted.layers]
    code, err = run_cli(capsys, "inspect", "mymodels:nothing")
    assert code == 1 and "has no 'nothing'" in err


def test_convert_without_spots_lists_candidates_and_after_takes_types(tmp_path, capsys):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(inputs)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    x = keras.layers.Dense(3, name="d")(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inputs, x, name="plain").save(tmp_path / "m.keras")
    data, out = _features(tmp_path), tmp_path / "bn.keras"
    argv = ["convert", tmp_path / "m.keras", "--data", data, "--out", out]
    code, err = run_cli(capsys, *argv)
    assert code == 1 and "no layer 'fc1'" not in err and len(err.splitlines()) == 1
    assert "candidates: c1 (Conv2D, 4), c2 (Conv2D, 4)" in err
    code, result = run_cli(capsys, *argv, "--after", "Conv2D,Dense")
    assert code == 0 and result["identical"] is True
    assert [t["tap"] for t in result["taps"]] == ["c1", "c2", "d"]
    code, err = run_cli(capsys, *argv, "--force", "--after", "Conv3D")
    assert code == 1 and "has no Conv3D layer" in err


def test_preprocess_spec_reaches_image_folders(tmp_path, capsys):
    argv = ["stats", "--data", default.images_dir(), "--layers", "fc1"]
    code, result = run_cli(
        capsys, *argv, "--preprocess", "scale=0,offset=0", "--out", tmp_path / "z.npz"
    )
    assert code == 0 and result["taps"][0]["std_max"] == 0.0
    code, result = run_cli(
        capsys, *argv, "--preprocess", "caffe", "--out", tmp_path / "c.npz"
    )
    assert code == 0 and result["taps"][0]["std_max"] > 0.0


def test_weights_h5_output_reads_back_through_its_architecture(tmp_path, capsys):
    data, out = _features(tmp_path), tmp_path / "bn.weights.h5"
    code, _ = run_cli(capsys, "convert", "--data", data, "--out", out)
    assert code == 0 and (tmp_path / "bn.json").exists()
    code, result = run_cli(capsys, "verify", default.model_path(), out, "--data", data)
    assert code == 0 and result["identical"] is True
    argv = ["inspect", tmp_path / "bn.json", "--weights", out]
    code, result = run_cli(capsys, *argv)
    assert code == 0 and "fc1_bn" in [row["path"] for row in result["layers"]]
    code, err = run_cli(capsys, "convert", "--data", data, "--out", out)
    assert code == 1 and "exists; pass --force" in err


def test_subclassed_weights_file_is_diagnosed_and_loads_with_its_builder(
    tmp_path, capsys, monkeypatch
):
    (tmp_path / "mymodels.py").write_text(_SUBCLASSED)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mymodels

    trained = mymodels.build()
    for v in trained.weights:
        v.assign(np.random.default_rng(1).normal(size=v.shape).astype("float32"))
    trained.save_weights(tmp_path / "small.weights.h5")
    code, err = run_cli(capsys, "inspect", tmp_path / "small.weights.h5")
    assert code == 1 and "subclassed Keras 3 model (attributes fc, head)" in err
    assert "module:function" in err and len(err.splitlines()) == 1
    data, out = _features(tmp_path), tmp_path / "bn.keras"
    argv = ["convert", "mymodels:build", "--weights", tmp_path / "small.weights.h5"]
    code, result = run_cli(capsys, *argv, "--data", data, "--after", "fc", "--out", out)
    assert code == 0 and result["identical"] is True
    x = np.load(data)
    converted = keras.models.load_model(out)
    assert np.array_equal(converted.predict_on_batch(x), trained.predict_on_batch(x))


def test_one_progress_bar_per_command_and_no_retracing_warnings(tmp_path, capfd):
    inputs = keras.Input((6,))
    x = inputs
    for _ in range(6):  # six BN levels: six passes in mode exact
        x = keras.layers.Dense(6)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    keras.Model(inputs, x).save(tmp_path / "deep.keras")
    data = np.random.default_rng(0).normal(size=(70, 6)).astype("float32")
    np.save(tmp_path / "x.npy", data)  # 3 batches of 32, the last one short
    argv = ["recalibrate", tmp_path / "deep.keras", "--data", tmp_path / "x.npy"]
    assert cli.main([*map(str, argv), "--out", str(tmp_path / "r.keras")]) == 0
    captured = capfd.readouterr()
    assert "retracing" not in captured.err
    # stderr is no terminal here: one plain line per pass, no bar on stdout
    lines = captured.err.splitlines()
    assert len(lines) == 6, lines
    assert lines[-1].startswith("statistics (pass 6): 3 batches, 70 samples, ")
    assert "\x1b[" not in captured.out + captured.err
    assert "(pass" not in captured.out
