"""The payoff benchmark's quick mode (benchmarks/payoff.py, about 20 s).

It asserts properties of the pipeline, never outcomes: identity BN keeps the
pretrained function bit for bit, fast.ai's BN does not, and fine-tuning runs.
"""

import json
import os
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import run  # noqa: E402

if keras.backend.backend() != "tensorflow":
    pytest.skip("the payoff experiment runs on TensorFlow", allow_module_level=True)
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("payoff")
    assert run.main(["--quick", "--only", "payoff", "--plot", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    return out, results["sections"]["payoff"]["data"]


def test_identity_bn_keeps_the_pretrained_loss_and_fastai_changes_it(quick):
    _, d = quick
    kept = d["source_val_loss"]
    assert kept["identity BN"] == kept["original"]
    assert kept["fast.ai BN"] != kept["original"]
    for runs in (d["runs"], d["mixed"]["runs"]):
        before = {(r["lr"], r["seed"], r["variant"]): r["before"] for r in runs}
        for (lr, seed, variant), loss in before.items():
            original = before[lr, seed, "original"]
            if variant == "identity BN":
                assert loss == original
            elif variant == "fast.ai BN":
                assert loss != original


def test_every_variant_trains_at_the_lowest_learning_rate(quick):
    _, d = quick
    lowest = min(d["sizes"]["lrs"])
    runs = [r for r in d["runs"] + d["mixed"]["runs"] if r["lr"] == lowest]
    assert {r["variant"] for r in runs} == {"original", "identity BN", "fast.ai BN"}
    for r in runs:
        end = r["val_loss"][-1]
        assert end is not None and np.isfinite(end) and end != r["before"]
        # recalibrate_bn ran on the fine-tuned BN models, and only on those
        recalibrated = r["recalibrated_loss"]
        if r["variant"] == "original":
            assert recalibrated is None
        else:
            assert recalibrated is not None and np.isfinite(recalibrated)


def test_the_mixed_float16_runs_use_a_loss_scale(quick):
    _, d = quick
    assert all(r["loss_scale"] > 0 for r in d["mixed"]["runs"])
    assert all(
        r["identical_before"]
        for r in d["mixed"]["runs"]
        if r["variant"] == "identity BN"
    )


def test_table_and_plot_are_written(quick):
    out, d = quick
    markdown = (out / "results.md").read_text()
    assert "The payoff" in markdown
    rows = len(d["sizes"]["lrs"]) + 1  # one per lr, and the mixed_float16 run
    assert markdown.count("| identity BN |") == rows
    assert (out / "payoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_reset_trainer_replays_a_freshly_compiled_model():
    """Every run of the sweep starts from the same state, whatever ran before."""
    import keras

    from benchmarks import payoff

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8,))
        x = keras.layers.Dense(16, activation="relu", name="fc1")(inputs)
        x = keras.layers.BatchNormalization(name="fc1_bn")(x)
        x = keras.layers.Dropout(0.3)(x)
        outputs = keras.layers.Dense(5, activation="softmax", name=payoff.NEW_HEAD)(x)
        return keras.Model(inputs, outputs)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype("float32")
    y = rng.integers(0, 5, 96)
    task = {"x_train": x[:64], "y_train": y[:64], "x_val": x[64:], "y_val": y[64:]}
    trainer = payoff.Trainer(build())
    first = payoff.fine_tune(trainer, task, seed=0, lr=1e-2, epochs=2)
    payoff.fine_tune(trainer, task, seed=1, lr=1.0, epochs=2)
    again = payoff.fine_tune(trainer, task, seed=0, lr=1e-2, epochs=2)
    fresh = payoff.fine_tune(payoff.Trainer(build()), task, seed=0, lr=1e-2, epochs=2)
    for key in ("train_loss", "val_loss", "recalibrated_loss"):
        assert first[key] == again[key] == fresh[key], key
    assert first["val_loss"][-1] != first["before"]
