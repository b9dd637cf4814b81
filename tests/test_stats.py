import importlib.util

import keras
import numpy as np
import pytest

import surgery
from surgery.numerics.moments import Moments


def dense_model():
    inp = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu", name="fc1")(inp)
    out = keras.layers.Dense(4, name="fc2")(h)
    return keras.Model(inp, out)


def test_chan_merge_matches_float64_two_pass_on_adversarial_data():
    rng = np.random.default_rng(1)
    x = (1e4 + 1e-2 * rng.normal(size=(20000, 8))).astype("float32")
    truth_mean = x.astype(np.float64).mean(0)
    truth_var = x.astype(np.float64).var(0)
    merged = Moments.empty(8)
    for chunk in np.array_split(x, 37):
        merged = merged.merge(Moments.of(chunk))
    np.testing.assert_allclose(merged.mean, truth_mean, rtol=1e-9)
    np.testing.assert_allclose(merged.var, truth_var, rtol=1e-9)


def test_stats_pass_matches_numpy_and_ignores_batching_and_order():
    rng = np.random.default_rng(2)
    inp = keras.Input((5,))
    out = keras.layers.Dense(5, name="d", kernel_initializer="identity")(inp)
    model = keras.Model(inp, out)
    x = (1e4 + 1e-2 * rng.normal(size=(3001, 5))).astype("float32")
    truth = Moments.of(model.predict(x, verbose=0))
    for batch_size in (7, 64, 1000):
        for data in (x, x[::-1].copy()):
            m = surgery.activation_stats(
                model, ["d"], data, batch_size=batch_size, verbose=0
            )["d"]
            assert m.count == 3001
            np.testing.assert_allclose(m.mean, truth.mean, rtol=1e-9)
            np.testing.assert_allclose(m.var, truth.var, rtol=1e-9)


def test_per_channel_reduction_for_sequences_and_channels_first():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 7, 3)).astype("float32")
    inp = keras.Input((7, 3))
    out = keras.layers.Dense(4, name="d")(inp)
    model = keras.Model(inp, out)
    m = surgery.activation_stats(model, "d", x, verbose=0)["d"]
    act = model.predict(x, verbose=0)
    assert m.count == 70
    np.testing.assert_allclose(m.var, act.reshape(-1, 4).var(0), rtol=1e-6)

    x3 = rng.normal(size=(4, 2, 5, 5, 5)).astype("float32")
    inp = keras.Input((2, 5, 5, 5))
    out = keras.layers.Conv3D(3, 2, data_format="channels_first", name="c")(inp)
    model = keras.Model(inp, out)
    m = surgery.activation_stats(model, "c", x3, verbose=0)["c"]
    act = model.predict(x3, verbose=0)
    np.testing.assert_allclose(
        m.mean, act.mean(axis=(0, 2, 3, 4)), rtol=1e-5, atol=1e-7
    )


def test_data_sources_give_the_same_stats(tmp_path):
    x = np.random.default_rng(4).normal(size=(100, 6)).astype("float32")
    y = np.zeros((100, 1))
    model = dense_model()
    ref = surgery.activation_stats(model, ["fc1"], x, verbose=0)["fc1"]
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")

    def gen():
        for i in range(0, 100, 30):
            yield x[i : i + 30], y[i : i + 30]

    class Seq(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return x[i * 25 : (i + 1) * 25], y[i * 25 : (i + 1) * 25]

    sources = [mm, (x, y), gen(), Seq()]
    if importlib.util.find_spec("tensorflow"):  # tf.data needs TensorFlow
        import tensorflow as tf

        sources.append(tf.data.Dataset.from_tensor_slices((x, y)).batch(13))
    for source in sources:
        m = surgery.activation_stats(model, ["fc1"], source, verbose=0)["fc1"]
        assert m.count == 100
        # float32 matmuls round differently per batch shape: 1e-6 is their noise
        np.testing.assert_allclose(m.mean, ref.mean, rtol=1e-6)
        np.testing.assert_allclose(m.m2, ref.m2, rtol=1e-6)


def test_max_samples_and_steps():
    x = np.random.default_rng(5).normal(size=(100, 6)).astype("float32")
    model = dense_model()
    m = surgery.activation_stats(
        model, "fc1", x, max_samples=45, batch_size=20, verbose=0
    )
    truth = Moments.of(model.get_layer("fc1")(x[:45]))
    assert m["fc1"].count == 45
    np.testing.assert_allclose(m["fc1"].mean, truth.mean, rtol=1e-6)
    m = surgery.activation_stats(model, "fc1", x, steps=2, batch_size=10, verbose=0)
    assert m["fc1"].count == 20


def test_non_finite_activation_names_layer_and_unit():
    x = np.ones((8, 6), dtype="float32")
    model = dense_model()
    kernel, *rest = model.get_layer("fc1").get_weights()
    kernel[0, 2] = np.inf  # finite data, a broken weight
    model.get_layer("fc1").set_weights([kernel, *rest])
    with pytest.raises(
        surgery.SurgeryError, match="layer 'fc1' produced a non-finite.* unit 2"
    ):
        surgery.activation_stats(model, "fc1", x, verbose=0)
    x[3, 0] = np.inf  # non-finite data is refused before any layer sees it
    with pytest.raises(surgery.SurgeryError, match="data has a non-finite value"):
        surgery.activation_stats(dense_model(), "fc1", x, verbose=0)


def test_empty_and_wrong_shape_data():
    model = dense_model()
    with pytest.raises(surgery.SurgeryError, match="empty|cannot read"):
        surgery.activation_stats(model, "fc1", np.zeros((0, 6), "float32"), verbose=0)
    with pytest.raises(surgery.SurgeryError, match=r"expects \(None, 6\)"):
        surgery.activation_stats(model, "fc1", np.zeros((4, 7), "float32"), verbose=0)
