"""Every public function and CLI command on JAX and torch, with TensorFlow
made unimportable, in a fresh process per backend.

The rest of the suite runs on whichever backend `KERAS_BACKEND` names (CI
runs the core files on all three); this file checks that nothing reaches for
TensorFlow off it, and that the results hold there: statistics in float64,
bit-identity where the backend allows it, no buffer shared with the input
model.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["tensorflow"] = None  # `import tensorflow` raises ImportError
    import json
    import numpy as np
    import keras
    import surgery
    from surgery import cli
    from surgery.testing.synthetic import pretrained_like

    backend = keras.backend.backend()
    exact = {"zero_mean": True} if backend == "torch" else {}
    rng = np.random.default_rng(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(16, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(3, name="out")(x)
    model = keras.Model(inputs, outputs)
    pretrained_like(model)
    data = rng.normal(1.0, 2.0, (96, 8, 8, 3)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    result = {}

    big = (1e4 + 1e-2 * rng.standard_normal((4096, 2))).astype("float32")
    probe = keras.Sequential([keras.Input((2,)), keras.layers.Identity(name="id")])
    m = surgery.activation_stats(probe, ["id"], big, batch_size=512, verbose=0)["id"]
    ref = big.astype(np.float64).var(axis=0)
    result["var_rel_err"] = float(np.max(np.abs(m.var - ref) / ref))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = surgery.insert_identity_bn(
            model, ["conv", "fc1"], data=data, batch_size=32, verbose=0, **exact
        )
    result["warnings"] = [str(w.message) for w in caught]
    result["eager"] = bool(
        np.array_equal(
            keras.ops.convert_to_numpy(model(data)),
            keras.ops.convert_to_numpy(new(data)),
        )
    )
    result["predict"] = bool(
        np.array_equal(model.predict(data, verbose=0), new.predict(data, verbose=0))
    )
    result["report"] = surgery.verify(model, new, data, verbose=0).identical
    result["input_untouched"] = all(
        np.array_equal(a, b) for a, b in zip(before, model.get_weights())
    )

    trunk, head = surgery.split(new, at="flatten")
    joined = surgery.combine(trunk, head)
    result["split"] = bool(
        np.array_equal(joined.predict(data, verbose=0), new.predict(data, verbose=0))
    )
    path = surgery.cache_features(
        trunk, data, sys.argv[1] + "/features.zarr", batch_size=32, verbose=0
    )
    features = surgery.open_features(path, batch_size=40)
    cached = np.concatenate([features[i] for i in range(len(features))])
    result["cache"] = bool(np.array_equal(cached, trunk.predict(data, verbose=0)))
    def bns(m):
        return sum(isinstance(l, keras.layers.BatchNormalization) for l in m.layers)
    folded = surgery.fold_bn(new)
    result["bns"], result["fold_bns"] = bns(new), bns(folded)
    got, want = folded.predict(data, verbose=0), model.predict(data, verbose=0)
    result["fold_err"] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    recal = surgery.recalibrate_bn(new, data, batch_size=32, verbose=0)
    bn = recal.get_layer("fc1_bn")
    stats = surgery.activation_stats(recal, ["fc1"], data, verbose=0)["fc1"]
    result["recal_var_err"] = float(
        np.max(np.abs(np.asarray(bn.moving_variance) - stats.var) / stats.var.max())
    )
    result["same_buffers"] = bool(
        {id(v) for v in new.weights} & {id(v) for v in model.weights}
    )

    path = sys.argv[1] + "/model.keras"
    model.save(path)
    np.save(sys.argv[1] + "/data.npy", data)
    out = sys.argv[1] + "/bn.keras"
    argv = ["--format", "json", "convert", path, "--after", "conv,fc1",
            "--data", sys.argv[1] + "/data.npy", "--out", out]
    if backend == "torch":
        argv.append("--zero-mean")
    result["cli_convert"] = cli.main(argv)
    result["cli_verify"] = cli.main(
        ["--format", "json", "verify", path, out, "--data", sys.argv[1] + "/data.npy"]
    )
    result["cli_inspect"] = cli.main(["--format", "json", "inspect", out])
    result["cli_fold"] = cli.main(
        ["--format", "json", "fold", out, "--out", sys.argv[1] + "/folded.keras"]
    )
    print("RESULT " + json.dumps(result))
    """
)


def _run(backend, tmp_path):
    env = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_every_function_runs_without_tensorflow(backend, tmp_path):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (pip install -e '.[{backend}]')")
    r = _run(backend, tmp_path)
    assert r["var_rel_err"] < 1e-9  # float64 statistics, mean 1e4 / std 1e-2
    assert r["eager"] and r["predict"] and r["report"], r["warnings"]
    assert r["input_untouched"] and not r["same_buffers"]
    assert r["split"] and r["cache"]
    assert r["fold_bns"] < r["bns"] and r["fold_err"] < 1e-5
    assert r["recal_var_err"] < 1e-6
    codes = [r[k] for k in ("cli_convert", "cli_verify", "cli_inspect", "cli_fold")]
    assert codes == [0, 0, 0, 0]
