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

    Freshly initialised models hide re-association errors: every BN has mean
    0, variance 1, gamma 1 and beta 0, and biases are 0, so adding an offset
    is exact in any order. Trained networks have none of that, so checking
    exactness on a `weights=None` model needs this first, and no download.
    BN layers get gamma in [0.5, 1.5], beta ~ N(0, 0.3), moving mean
    ~ N(0, 0.5) and moving variance in [0.2, 2]; every other layer's `bias`
    ~ N(0, 0.1). Kernels are left as initialised.

    Args:
        model: A built `keras.Model`; its layers, nested models' included,
            are changed in place.
        seed: Seed of the random values, so the same model gets the same
            weights. Defaults to `0`.

    Returns:
        `model` itself.

    Example:

    ```python
    import keras
    import numpy as np
    from surgery.synthetic import pretrained_like

    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    pretrained_like(model, seed=1)
    bn = model.get_layer("bn_Conv1")
    print(float(np.min(bn.moving_variance)) >= 0.2)  # True
    ```
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
