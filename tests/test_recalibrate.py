"""recalibrate_bn: moving statistics equal float64 numpy statistics (rtol 1e-6).

The BN inputs are float32 activations; the reference reduces the same
activations in numpy float64, so only the summation order differs.
"""

import keras
import numpy as np
import pytest
from helpers import snapshot

import surgery
from surgery.verbs.recalibrate import recalibrate_bn

L = keras.layers
RNG = np.random.default_rng(2)
RTOL = 1e-6


def data(n=48):
    return RNG.normal(1.0, 2.0, size=(n, 6, 6, 3)).astype("float32")


def scramble_bn(model):
    """Moving statistics far from any data's, gamma and beta non-trivial."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights(
                [
                    RNG.uniform(0.5, 1.5, n).astype("float32"),
                    RNG.normal(0, 0.5, n).astype("float32"),
                    RNG.normal(5, 1, n).astype("float32"),
                    RNG.uniform(5, 9, n).astype("float32"),
                ]
            )
    return model


def chain(levels=3):
    inp = keras.Input((6, 6, 3))
    h = inp
    for i in range(1, levels + 1):
        h = L.Conv2D(4, 3, padding="same", name=f"conv{i}")(h)
        h = L.ReLU()(L.BatchNormalization(name=f"bn{i}")(h))
    return scramble_bn(keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(h))))


def branching():
    """bn_a and inner/bn_b at level 1 (bn_b in a nested Sequential), bn_c at 2."""
    inner = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            L.Conv2D(3, 3, padding="same"),
            L.BatchNormalization(name="bn_b"),
            L.ReLU(),
        ],
        name="inner",
    )
    scramble_bn(inner)
    inp = keras.Input((6, 6, 3))
    a = L.ReLU()(L.BatchNormalization(name="bn_a")(L.Conv2D(4, 3, padding="same")(inp)))
    h = L.Conv2D(5, 1)(L.Concatenate()([a, inner(inp)]))
    out = L.BatchNormalization(name="bn_c")(h)
    return scramble_bn(keras.Model(inp, out))


class Counting(keras.utils.PyDataset):
    """`x` in batches, counting the batches drawn."""

    def __init__(self, x, batch_size):
        super().__init__()
        self.x, self.batch_size, self.drawn = x, batch_size, 0

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i):
        self.drawn += 1
        return self.x[i * self.batch_size : (i + 1) * self.batch_size]


def input_moments(model, bn, x):
    """float64 mean and population variance of `bn`'s input over `x`."""
    sub = keras.Model(model.inputs, bn.input)
    act = sub.predict(x, verbose=0).astype(np.float64)
    axes = tuple(i for i in range(act.ndim) if i != bn.axis % act.ndim)
    return act.mean(axes), act.var(axes)


def assert_population_stats(model, bn, x):
    mean, var = input_moments(model, bn, x)
    np.testing.assert_allclose(
        bn.moving_mean.numpy(), mean, rtol=RTOL, atol=RTOL * np.sqrt(var).max()
    )
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=RTOL)


def bn_stats(model, name):
    bn = model.get_layer(name)
    return bn.moving_mean.numpy(), bn.moving_variance.numpy()


def test_exact_chain_is_population_stats_one_pass_per_level():
    model, x = chain(), data()
    before = snapshot(model)
    source = Counting(x, batch_size=16)
    new = recalibrate_bn(model, source, verbose=0)
    assert source.drawn == 3 * len(source)
    for name in ("bn1", "bn2", "bn3"):
        bn = new.get_layer(name)
        assert_population_stats(new, bn, x)
        assert not np.allclose(bn.moving_mean.numpy(), bn_stats(model, name)[0])
        old_gamma, old_beta = model.get_layer(name).get_weights()[:2]
        assert np.array_equal(bn.gamma.numpy(), old_gamma)
        assert np.array_equal(bn.beta.numpy(), old_beta)
    for a, b in zip(before, model.get_weights(), strict=True):
        assert np.array_equal(a, b)
    assert not {id(v) for v in new.weights} & {id(v) for v in model.weights}


def test_exact_measures_a_level_in_one_pass_also_in_nested_models():
    model, x = branching(), data()
    source = Counting(x, batch_size=16)
    new = recalibrate_bn(model, source, verbose=0)
    assert source.drawn == 2 * len(source)  # bn_a with inner/bn_b, then bn_c
    inner = new.get_layer("inner")
    assert_population_stats(inner, inner.get_layer("bn_b"), x)
    for name in ("bn_a", "bn_c"):
        assert_population_stats(new, new.get_layer(name), x)


def test_exact_does_not_depend_on_order_or_batch_size():
    model, x = chain(), data(64)
    shuffled = x[RNG.permutation(len(x))]
    a = recalibrate_bn(model, x, batch_size=16, verbose=0)
    b = recalibrate_bn(model, shuffled, batch_size=7, verbose=0)
    for name in ("bn1", "bn2", "bn3"):
        for p, q in zip(bn_stats(a, name), bn_stats(b, name), strict=True):
            np.testing.assert_allclose(p, q, rtol=RTOL, atol=1e-7)


def sorted_and_shuffled(n=64):
    """Two 'classes' far apart, sorted by class, and the same samples shuffled."""
    x = data(n)
    x[: n // 2] -= 3.0
    x[n // 2 :] += 3.0
    return x, x[RNG.permutation(n)]


def test_precise_pools_batch_statistics_exactly():
    model = chain(levels=2)
    ordered, shuffled = sorted_and_shuffled()
    a = recalibrate_bn(model, ordered, mode="precise", batch_size=16, verbose=0)
    b = recalibrate_bn(model, shuffled, mode="precise", batch_size=16, verbose=0)
    exact = recalibrate_bn(model, shuffled, batch_size=16, verbose=0)
    # bn1 has no recalibrated BN before it: the pooled population statistics,
    # whatever the order (a mean of per-batch variances would be far lower for
    # the class-sorted batches).
    for other in (b, exact):
        for p, q in zip(bn_stats(a, "bn1"), bn_stats(other, "bn1"), strict=True):
            np.testing.assert_allclose(p, q, rtol=RTOL, atol=1e-7)
    act, _ = _bn1_input_batches(model, ordered)
    per_batch_var = np.mean([batch.var((0, 1, 2)) for batch in act], axis=0)
    assert not np.allclose(per_batch_var, bn_stats(a, "bn1")[1], rtol=0.05)


def test_precise_normalises_earlier_bns_by_batch_statistics():
    model = chain(levels=2)
    ordered, _ = sorted_and_shuffled()
    precise = recalibrate_bn(model, ordered, mode="precise", batch_size=16, verbose=0)
    # Reference: bn2's input with bn1 in training mode, batch by batch, pooled.
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    to_bn2 = keras.Model(copy.input, copy.get_layer("bn2").input)
    act = np.concatenate(
        [
            host(to_bn2(ordered[i : i + 16], training=True))
            for i in range(0, len(ordered), 16)
        ]
    )
    mean, var = act.mean((0, 1, 2)), act.var((0, 1, 2))
    got_mean, got_var = bn_stats(precise, "bn2")
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_var, var, rtol=1e-5)
    # exact sees bn1 at inference; on class-sorted batches that differs a lot
    exact = recalibrate_bn(model, ordered, batch_size=16, verbose=0)
    assert not np.allclose(bn_stats(exact, "bn2")[1], got_var, rtol=1e-2)


def host(tensor):
    """A backend tensor as float64 numpy (torch's may require grad)."""
    return np.asarray(keras.ops.convert_to_numpy(tensor), dtype=np.float64)


def _bn1_input_batches(model, x, batch_size=16):
    to_bn1 = keras.Model(model.input, model.get_layer("bn1").input)
    batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    return [host(to_bn1(b)) for b in batches], batches


def test_layers_selection_leaves_the_other_bns_untouched():
    model, x = chain(), data()
    new = recalibrate_bn(model, x, layers=["bn2"], verbose=0)
    for name in ("bn1", "bn3"):
        for p, q in zip(
            new.get_layer(name).get_weights(),
            model.get_layer(name).get_weights(),
            strict=True,
        ):
            assert np.array_equal(p, q)
    assert_population_stats(new, new.get_layer("bn2"), x)


def test_exact_refuses_data_that_changes_between_passes():
    model, x = chain(), data()

    def once():
        for i in range(0, len(x), 16):
            yield (x[i : i + 16],)

    with pytest.raises(surgery.SurgeryError, match="once per BN level"):
        recalibrate_bn(model, once(), verbose=0)
    new = recalibrate_bn(model, once(), mode="precise", verbose=0)
    assert_population_stats(new, new.get_layer("bn1"), x)


def test_bad_input_raises_one_line_errors():
    model, x = chain(), data()
    cases = [
        (dict(layers="bn_1"), "no BatchNormalization layer 'bn_1'.*did you mean"),
        (dict(layers="conv1"), "'conv1' is not a BatchNormalization layer"),
        (dict(mode="fast"), "mode must be 'auto', 'exact' or 'precise'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(surgery.SurgeryError, match=message) as error:
            recalibrate_bn(model, x, verbose=0, **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(surgery.SurgeryError, match="no BatchNormalization layer"):
        recalibrate_bn(keras.Sequential([keras.Input((3,)), L.Dense(2)]), x[:, 0, 0])
    with pytest.raises(surgery.SurgeryError, match="data is empty"):
        recalibrate_bn(model, x[:0], verbose=0)


def test_auto_is_exact_up_to_the_level_limit_then_precise(monkeypatch):
    from surgery.verbs import recalibrate

    model, x = chain(levels=3), data(64)
    exact = recalibrate_bn(model, x, mode="exact", batch_size=4, verbose=0)
    precise = recalibrate_bn(model, x, mode="precise", batch_size=4, verbose=0)
    auto = recalibrate_bn(model, x, batch_size=4, verbose=0)
    last = "bn3"
    assert np.array_equal(bn_stats(auto, last)[1], bn_stats(exact, last)[1])
    assert not np.allclose(bn_stats(precise, last)[1], bn_stats(exact, last)[1])
    monkeypatch.setattr(recalibrate, "MAX_EXACT_LEVELS", 2)
    with pytest.warns(UserWarning, match="3 BN levels .* using mode='precise'"):
        auto = recalibrate_bn(model, x, batch_size=4, verbose=0)
    assert np.array_equal(bn_stats(auto, last)[1], bn_stats(precise, last)[1])
