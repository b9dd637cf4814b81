import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import run_cli

import surgery
from surgery import cli, default
from surgery.data import sources
from surgery.files import statsfile

# Keras' torch BN computes (x - mean) * inv + beta: exact only with a zero mean
EXACT = ["--zero-mean"] if keras.backend.backend() == "torch" else []


def test_convert_embedded_default_is_identical_and_reloads(tmp_path, capsys):
    out = tmp_path / "bn.keras"
    assert cli.main(["--format", "json", "convert", "--out", str(out), *EXACT]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["identical"] is True
    original = default.load()
    converted = keras.models.load_model(out, safe_mode=True)
    assert {"fc1_bn", "fc2_bn"} <= {layer.name for layer in converted.layers}
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    assert np.array_equal(converted.predict_on_batch(x), original.predict_on_batch(x))


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch's BN form")
def test_torch_default_convert_names_its_ulps_and_the_two_ways_out(tmp_path, capsys):
    out = tmp_path / "bn.keras"
    assert cli.main(["convert", "--out", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(line for line in lines if line.startswith("surgery:"))
    assert len(err.splitlines()) == 1 and "--zero-mean" in err and not out.exists()
    assert all(": " in line and "batches" in line for line in lines if line != err)
    ulps = int(err.rsplit("--max-ulp ", 1)[1].split()[0])
    assert ulps > 0  # the measured mean costs ulps with torch's BN form
    code = cli.main(
        ["--format", "json", "convert", "--out", str(out), "--max-ulp", str(ulps)]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["identical"] is False
    assert result["max_ulp_diff"] == ulps and out.exists()


def test_existing_output_is_not_overwritten_and_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "bn.keras"
    out.write_bytes(b"keep me")
    assert cli.main(["convert", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "exists; pass --force" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b"keep me"
    assert (
        cli.main(["convert", "--after", "fc9", "--out", str(tmp_path / "x.keras")]) == 1
    )
    assert "no layer 'fc9'" in capsys.readouterr().err
    assert not (tmp_path / "x.keras").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bn.keras"]


def _default_features(tmp_path, count=60):
    """Raw 0..255 images for the embedded model, as a .npy file."""
    x = np.random.default_rng(3).uniform(0, 255, (count, 32, 32, 3)).astype("float32")
    path = tmp_path / "x.npy"
    np.save(path, x)
    return path, x


# VGG16 at 224x224 from the 553 MB legacy file takes 20 s on TensorFlow and
# 40-70 s on JAX (where it is a known 14 ulp) and torch; reading the file is
# the same there, and test_insert's VGG16 at 32x32 checks their exactness, so
# on JAX and torch it is `-m slow`.
@pytest.mark.xfail(
    keras.backend.backend() == "jax",
    reason="VGG16 at 224x224 under XLA: 14 ulp (its dense head's fusions, unlike "
    "32x32's, are not reproduced by the identity search)",
    strict=True,
)
@(pytest.mark.slow if keras.backend.backend() != "tensorflow" else lambda test: test)
def test_legacy_vgg16_file_converts_to_a_bit_identical_keras_model(
    top_file, tmp_path, capsys
):
    out = tmp_path / "vgg16_bn.keras"
    code, result = run_cli(
        capsys,
        "convert", "vgg16", "--weights", top_file, "--data", default.images_dir(),
        "--max-samples", 6, "--batch-size", 3, "--out", out, *EXACT,
    )  # fmt: skip
    assert code == 0 and result["identical"] is True, result
    assert [t["tap"] for t in result["taps"]] == ["fc1", "fc2"]
    converted = keras.models.load_model(out, safe_mode=True)
    names = [layer.name for layer in converted.layers]
    assert names.index("fc1_bn") == names.index("fc1") + 1
    assert names.index("fc2_bn") == names.index("fc2") + 1
    reference = keras.applications.VGG16(weights=str(top_file))
    x = np.random.default_rng(4).uniform(-120, 150, (2, 224, 224, 3)).astype("float32")
    assert np.array_equal(converted.predict_on_batch(x), reference.predict_on_batch(x))
    bn = converted.get_layer("fc1_bn")
    images = sources.open_source(
        default.images_dir(), model=reference, preprocess="vgg16", batch_size=6
    )[0]
    fc1 = keras.Model(reference.inputs, reference.get_layer("fc1").output)
    acts = np.asarray(fc1.predict_on_batch(images), dtype=np.float64)
    mean = np.zeros(acts.shape[1]) if EXACT else acts.mean(0)  # torch: zero_mean
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)


def test_conv_flag_and_weights_output(tmp_path, capsys):
    out = tmp_path / "bn.weights.h5"
    code, result = run_cli(capsys, "convert", "--conv", "--out", out, *EXACT)
    assert code == 0 and result["identical"] is True
    convs = [t["tap"] for t in result["taps"] if "conv" in t["tap"]]
    assert len(convs) == 6 and len(result["taps"]) == 6  # --conv alone: convs only
    original = default.load()
    rebuilt = surgery.insert_identity_bn(
        original,
        after=convs,
        data=np.zeros((1, 32, 32, 3), "float32"),
        verbose=0,
        zero_mean=bool(EXACT),
    )
    rebuilt.load_weights(out)
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    assert np.array_equal(rebuilt.predict_on_batch(x), original.predict_on_batch(x))
    assert not np.array_equal(
        rebuilt.get_layer("block1_conv1_bn").moving_variance.numpy(), np.ones(16)
    )


def test_sharded_stats_merge_to_the_one_pass_result(tmp_path, capsys):
    data, _ = _default_features(tmp_path, count=70)
    # batch size 1: float32 activations then do not depend on batch shapes
    layers = ["--layers", "fc1", "block2_conv2", "--before", "predictions"]
    layers += ["--batch-size", "1"]
    assert (
        run_cli(
            capsys, "stats", "--data", data, *layers, "--out", tmp_path / "all.npz"
        )[0]
        == 0
    )
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"s{i}.npz")
        code, _ = run_cli(
            capsys, "stats", "--data", data, *layers,
            "--shard", f"{i}/3", "--out", shards[-1],
        )  # fmt: skip
        assert code == 0
    code, result = run_cli(capsys, "merge", *shards[::-1], "--out", tmp_path / "m.npz")
    assert code == 0 and result["taps"][0]["samples"] == 70
    whole, _ = statsfile.load_stats(str(tmp_path / "all.npz"))
    merged, _ = statsfile.load_stats(str(tmp_path / "m.npz"))
    assert list(merged) == ["fc1", "block2_conv2", "predictions:input"]
    for key in whole:
        assert merged[key].count == whole[key].count
        # float64 sums in another order: equal up to float64 rounding
        np.testing.assert_allclose(merged[key].mean, whole[key].mean, rtol=1e-12)
        np.testing.assert_allclose(merged[key].m2, whole[key].m2, rtol=1e-10, atol=1e-9)
    shard_counts = [statsfile.load_stats(str(s))[0]["fc1"].count for s in shards]
    assert shard_counts == [23, 23, 24]


def test_merge_refuses_duplicate_missing_and_mismatched_shards(tmp_path, capsys):
    data, _ = _default_features(tmp_path, count=20)
    paths = {}
    for name, extra in {
        "s0": ["--shard", "0/2"],
        "s1": ["--shard", "1/2"],
        "other": ["--layers", "fc2", "--shard", "1/2"],
    }.items():
        paths[name] = tmp_path / f"{name}.npz"
        layers = [] if "--layers" in extra else ["--layers", "fc1"]
        assert (
            run_cli(
                capsys, "stats", "--data", data, *layers, *extra, "--out", paths[name]
            )[0]
            == 0
        )
    out = tmp_path / "m.npz"
    for files, message in [
        ([paths["s0"], paths["s0"]], "shard 0/2 is given twice"),
        ([paths["s0"]], "shard(s) 1/2 missing"),
        ([paths["s0"], paths["other"]], "has taps ['fc2']"),
        ([paths["s0"], tmp_path / "x.npy"], "not a statistics file"),
    ]:
        code, err = run_cli(capsys, "merge", *files, "--out", out)
        assert code == 1 and message in err and len(err.splitlines()) == 1
        assert not out.exists()
    assert run_cli(capsys, "merge", paths["s0"], "--partial", "--out", out)[0] == 0


def test_insert_from_a_stats_file_is_identical(tmp_path, capsys):
    data, x = _default_features(tmp_path)
    stats = tmp_path / "s.npz"
    run_cli(
        capsys,
        "stats",
        "--data",
        data,
        "--layers",
        "fc1",
        "--before",
        "fc2",
        "--out",
        stats,
    )
    out = tmp_path / "bn.keras"
    code, result = run_cli(capsys, "insert", "--stats", stats, "--out", out, *EXACT)
    assert code == 0 and result["after"] == ["fc1"] and result["before"] == ["fc2"]
    converted = keras.models.load_model(out)
    assert {"fc1_bn", "fc2_pre_bn"} <= {layer.name for layer in converted.layers}
    assert np.array_equal(
        converted.predict_on_batch(x), default.load().predict_on_batch(x)
    )
    code, result = run_cli(capsys, "verify", default.model_path(), out, "--data", data)
    assert code == 0 and result["identical"] is True and result["samples"] == 60
    code, err = run_cli(
        capsys,
        "insert",
        "--stats",
        stats,
        "--after",
        "fc2",
        "--out",
        tmp_path / "y.keras",
    )
    assert code == 1 and "stats has no entry 'fc2'" in err
    assert not (tmp_path / "y.keras").exists()


def test_verify_fails_with_exit_1_on_different_models(tmp_path, capsys):
    data, _ = _default_features(tmp_path, count=8)
    other = default.load()
    kernel = other.get_layer("fc2").kernel
    kernel.assign(kernel.numpy() * 1.001)
    other.save(tmp_path / "other.keras")
    code, result = run_cli(
        capsys, "verify", default.model_path(), tmp_path / "other.keras", "--data", data
    )
    assert code == 1 and result["identical"] is False and result["max_ulp_diff"] > 0


def test_inspect_lists_insertion_points(capsys):
    code, result = run_cli(capsys, "inspect")
    rows = {r["path"]: r for r in result["layers"]}
    assert code == 0 and rows["fc1"]["insertable"] and rows["fc1"]["units"] == 256
    assert rows["block1_conv1"]["units"] == 16
    assert rows["block1_conv1"]["shapes"] == [[None, 32, 32, 16]]
    assert not rows["input_layer"]["insertable"]
    assert "InputLayer" in rows["input_layer"]["reason"]


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data, _ = _default_features(tmp_path, count=10)
    png = tmp_path / "r.png"
    code, _ = run_cli(
        capsys,
        "stats",
        "--data",
        data,
        "--layers",
        "fc1",
        "fc2",
        "--out",
        tmp_path / "s.npz",
        "--plot",
        png,
    )
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["convert", "--out", "{t}/x.h5"], "--out must end in .keras or .weights.h5"),
        (["convert", "--out", "{t}/no/x.keras"], "does not exist; create it"),
        (["convert", "vgg16", "--out", "{t}/x.keras"], "pass --weights FILE"),
        (["convert", "{t}/m.keras", "--out", "{t}/x.keras"], "does not exist"),
        (["convert", "--data", "{t}/none", "--out", "{t}/x.keras"], "does not exist"),
        (
            ["stats", "--layers", "fc1", "--shard", "3/3", "--out", "{t}/s.npz"],
            "shard 3/3",
        ),
        (["stats", "--layers", "fc1", "--out", "{t}/s.txt"], "--out must end in .npz"),
        (
            ["convert", "--preprocess", "vgg61", "--out", "{t}/x.keras"],
            "unknown preprocess",
        ),
        (["convert", "--image-size", "3by4", "--out", "{t}/x.keras"], "--image-size"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    code, err = run_cli(capsys, *[a.format(t=tmp_path) for a in argv])
    usage = message.startswith(("--out must", "shard", "--image-size"))
    assert code == (2 if usage else 1), err  # a bad option value is a usage error
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "surgery", "--format", "json", "inspect"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert any(r["path"] == "fc2" for r in json.loads(done.stdout)["layers"])
    assert done.stderr == ""
    usage = subprocess.run(
        [sys.executable, "-m", "surgery"], capture_output=True, check=False
    )
    assert usage.returncode == 2


def _bn_model(path):
    """Dense -> BN (folds back) -> ReLU -> BN (folds forward into out)."""
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, name="fc")(inputs)
    x = keras.layers.BatchNormalization(name="fc_bn")(x)
    x = keras.layers.Activation("relu", name="relu")(x)
    x = keras.layers.BatchNormalization(name="relu_bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    rng = np.random.default_rng(5)
    for name in ("fc_bn", "relu_bn"):
        bn = model.get_layer(name)
        bn.set_weights(
            [rng.uniform(0.5, 2, 8), rng.normal(size=8), rng.normal(size=8),
             rng.uniform(0.5, 3, 8)]
        )  # fmt: skip
    model.save(path)
    return model


def test_fold_command_folds_what_it_can_and_says_why_not(tmp_path, capsys):
    model = _bn_model(tmp_path / "m.keras")
    x = np.random.default_rng(6).normal(size=(40, 6)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "folded.keras"
    code, result = run_cli(
        capsys, "fold", tmp_path / "m.keras", "--data", tmp_path / "x.npy", "--out", out
    )
    assert code == 0 and result["folded"] == ["fc_bn", "relu_bn"]
    assert result["kept"] == {}
    assert result["how"]["relu_bn"] == "ok: forward into Dense 'out'"
    folded = keras.models.load_model(out)
    assert not {"fc_bn", "relu_bn"} & {layer.name for layer in folded.layers}
    expected = model.predict_on_batch(x)
    got = folded.predict_on_batch(x)
    np.testing.assert_allclose(
        got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
    )
    assert result["max_abs_diff"] == pytest.approx(
        np.abs(got - expected).max(), abs=1e-7
    )


def test_recalibrate_command_stores_the_population_statistics(tmp_path, capsys):
    _bn_model(tmp_path / "m.keras")
    x = np.random.default_rng(7).normal(2, 3, size=(50, 6)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "recal.keras"
    code, result = run_cli(
        capsys, "recalibrate", tmp_path / "m.keras", "--data", tmp_path / "x.npy",
        "--batch-size", 7, "--mode", "exact", "--out", out,
    )  # fmt: skip
    assert code == 0 and result["mode"] == "exact"
    recal = keras.models.load_model(out)
    # batches of 7 as above: float32 activations depend on the batch shape
    fc = keras.Model(recal.inputs, recal.get_layer("fc").output)
    fc = fc.predict(x, batch_size=7, verbose=0)
    fc = np.asarray(fc, np.float64)
    bn = recal.get_layer("fc_bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), fc.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), fc.var(0), rtol=1e-6)
    relu_in = keras.Model(recal.inputs, recal.get_layer("relu").output)
    acts = np.asarray(relu_in.predict(x, batch_size=7, verbose=0), np.float64)
    np.testing.assert_allclose(
        recal.get_layer("relu_bn").moving_variance.numpy(), acts.var(0), rtol=1e-6
    )
