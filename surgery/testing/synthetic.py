"""Weights like a trained network's, for checking exactness without downloads.

Freshly initialised models hide re-association errors: every BN has mean 0,
variance 1, gamma 1 and beta 0, and biases are 0, so adding an offset is
exact in any order. Trained nets have none of that.
"""

from __future__ import annotations

import keras
import numpy as np


def pretrained_like(model: keras.Model, seed: int = 0) -> keras.Model:
    """Give `model` (in place) trained-looking BN statistics and biases.

    BN layers get gamma in [0.5, 1.5], beta ~ N(0, 0.3), moving mean
    ~ N(0, 0.5) and moving variance in [0.2, 2]; every bias ~ N(0, 0.1).
    Kernels are left as initialised. Returns `model`.
    """
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            values = {
                "gamma": rng.uniform(0.5, 1.5, n),
                "beta": rng.normal(0, 0.3, n),
                "moving_mean": rng.normal(0, 0.5, n),
                "moving_variance": rng.uniform(0.2, 2.0, n),
            }
            for w in layer.weights:
                w.assign(values[w.name].astype(w.dtype))
        else:
            for w in layer.weights:
                if w.name == "bias":
                    w.assign(rng.normal(0, 0.1, w.shape).astype(w.dtype))
    return model
