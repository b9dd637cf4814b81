"""Recurrent layers: a BN after LSTM, GRU or SimpleRNN, compiled and under XLA.

A recurrent layer's output is computed inside a loop (a `While` in the
compiled graph), and a BN after it sits either at a model output or before
another layer. Both must be bit-identical in every mode users run, with
pretrained-like weights, on the CPU kinds where that was measured
(`helpers.MEASURED_ON`), and elsewhere identical or warned by the check.
Measured before the float32 cast-back layer (TF
2.21, AMD AVX-512): a BN at the output of chars2vec's second LSTM cost 164
ulp under XLA.
"""

import warnings

import keras
import numpy as np
import pytest
from helpers import MEASURED_ON, TORCH, assert_exact_where_measured

import surgery
from surgery.runtime.machine import cpu_kind
from surgery.testing.synthetic import pretrained_like

L = keras.layers
RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 10, 6)).astype("float32")
MODES = {"tensorflow": ("graph", "xla"), "jax": ("xla",)}.get(
    keras.backend.backend(), ()
)


def insert(model, x, after):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = surgery.insert_identity_bn(
            model, after=after, data=x, verbose=0, zero_mean=TORCH
        )
    return new, [str(w.message) for w in caught if w.category is UserWarning]


def assert_identical_everywhere(model, new, x, after):
    """Identical in every mode where measured (see helpers.MEASURED_ON)."""
    assert surgery.verify(model, new, x, verbose=0, mode="eager").identical
    assert_exact_where_measured(model, new, x, MODES, after=after, zero_mean=TORCH)
    if cpu_kind() in MEASURED_ON:
        assert np.array_equal(model.predict(x, verbose=0), new.predict(x, verbose=0))


@pytest.mark.parametrize("cell", [L.LSTM, L.GRU, L.SimpleRNN])
@pytest.mark.parametrize("sequences", [True, False])
@pytest.mark.parametrize("at_output", [True, False])
def test_bn_after_a_recurrent_layer(cell, sequences, at_output):
    inp = keras.Input((10, 6))
    h = cell(16, return_sequences=sequences, name="r")(inp)
    if not at_output:
        h = L.Dense(4, name="out")(h)
    model = pretrained_like(keras.Model(inp, h))
    new, messages = insert(model, X, ["r"])
    assert not messages or cpu_kind() not in MEASURED_ON, messages
    assert new.get_layer("r_bn").axis in (-1, 2 if sequences else 1)
    assert_identical_everywhere(model, new, X, ["r"])


def chars2vec_like():
    """chars2vec's embedding model: one-hot characters, two stacked LSTMs."""
    inp = keras.Input((None, 59))
    h = L.LSTM(50, return_sequences=True, name="lstm1")(inp)
    model = pretrained_like(keras.Model(inp, L.LSTM(50, name="lstm2")(h)))
    x = np.zeros((64, 12, 59), "float32")
    chars = RNG.integers(0, 59, size=(64, 12))
    x[np.arange(64)[:, None], np.arange(12), chars] = 1
    return model, x


def test_bn_after_both_of_two_stacked_lstms():
    model, x = chars2vec_like()
    xla = keras.backend.backend() != "torch"
    model.compile(jit_compile=xla)  # the check runs in the mode predict will
    new, messages = insert(model, x, ["lstm1", "lstm2"])
    assert not messages or cpu_kind() not in MEASURED_ON, messages
    new.compile(jit_compile=xla)
    assert new.outputs[0].dtype == model.outputs[0].dtype
    assert_identical_everywhere(model, new, x, ["lstm1", "lstm2"])
