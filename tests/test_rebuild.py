"""The rebuilt model's variables start as copies of the original's values."""

import keras
import numpy as np
import pytest

import surgery
from surgery.graph import rewrite as graph

L = keras.layers


def _model(policy):
    inputs = keras.Input((6, 8))
    x = L.Dense(8, activation="relu", name="d1", dtype=policy)(inputs)
    x = L.MultiHeadAttention(2, 4, name="mha", dtype=policy)(x, x)  # sublayers
    x = L.Conv1D(5, 3, name="conv", dtype=policy)(x)
    x = L.LayerNormalization(name="ln", dtype=policy)(x)
    return keras.Model(inputs, L.Dense(3, name="out", dtype=policy)(x))


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_copies_hold_the_original_values_and_own_them(policy, monkeypatch):
    keras.utils.set_random_seed(4)
    model = _model(policy)
    x = np.random.default_rng(1).normal(size=(16, 6, 8)).astype("float32")
    given = []
    original = graph.Rewriter._start_from_source

    def spy(self, old, new):
        original(self, old, new)
        given.append(self._given)

    monkeypatch.setattr(graph.Rewriter, "_start_from_source", spy)
    new = surgery.insert_identity_bn(model, ["d1", "conv"], data=x, verbose=0)
    if keras.backend.backend() == "tensorflow":  # only TF variables copy a source
        assert len(given[-1]) >= 8  # d1, conv, ln and out made from the source
    copies = {w.path: w for w in new.weights}
    for w in model.weights:
        twin = copies[w.path]
        assert twin is not w and twin.dtype == w.dtype
        assert np.array_equal(twin.numpy(), w.numpy()), w.path
    assert surgery.verify(model, new, x, verbose=0).identical
    before = [w.copy() for w in model.get_weights()]
    for v in new.weights:
        v.assign(v.numpy() + 1)
    for a, b in zip(before, model.get_weights(), strict=True):
        assert np.array_equal(a, b)
    assert not any("add_weight" in layer.__dict__ for layer in new.layers)
