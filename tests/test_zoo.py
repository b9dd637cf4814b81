"""Identity BN after every Conv/Dense of three more keras.applications models.

test_insert.py covers VGG16, ResNet50, MobileNetV2 and EfficientNetB0; these
add separable convolutions with residual adds (Xception at 71x71),
hard-swish and squeeze-excite blocks with built-in preprocessing
(MobileNetV3Small) and the original depthwise MobileNet, each at the smallest
input it accepts, with weights=None. Xception (18 s on 2 cores) is
`-m slow`: test_insert's conv-layer and residual tests have its parts.
"""

import warnings

import keras
import numpy as np
import pytest

import surgery
from surgery.graph.spots import CONV_LAYERS, layer_paths

L = keras.layers


@pytest.mark.parametrize(
    "name,size,preprocess",
    [
        ("MobileNetV3Small", 32, keras.applications.mobilenet_v3.preprocess_input),
        pytest.param(
            "Xception",
            71,
            keras.applications.xception.preprocess_input,
            marks=pytest.mark.slow,
        ),
        ("MobileNet", 32, keras.applications.mobilenet.preprocess_input),
    ],
)
def test_zoo_model_is_bit_identical_with_every_unit_exact(name, size, preprocess):
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=10
    )
    taps = layer_paths(model, (L.Dense, *CONV_LAYERS))
    rng = np.random.default_rng(0)
    x = preprocess(rng.uniform(0, 255, (8, size, size, 3)).astype("float32"))
    reference = model.predict_on_batch(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = surgery.insert_identity_bn(model, after=taps, data=x, verbose=0)
    inexact = [str(w.message) for w in caught if "no exact" in str(w.message)]
    assert not inexact  # every unit got an exact identity pair
    bns = [layer for layer in new.layers if isinstance(layer, L.BatchNormalization)]
    assert len(bns) >= len(taps)
    assert np.array_equal(new.predict_on_batch(x), reference)
    report = surgery.verify(model, new, x, verbose=0)
    assert report.identical and report.max_ulp_diff == 0, report
