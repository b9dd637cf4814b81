"""`--preprocess` specs."""

import numpy as np
import pytest
from keras.applications import vgg16

import surgery
from surgery.data import preprocess


def _images():
    return np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")


def test_caffe_and_per_channel_means_match_keras_vgg16():
    x = _images()
    expected = vgg16.preprocess_input(x.copy())
    assert np.array_equal(preprocess.resolve("caffe")(x.copy()), expected)
    spec = "bgr,mean=103.939,116.779,123.68"
    assert np.array_equal(preprocess.resolve(spec)(x.copy()), expected)
    plain = preprocess.resolve("mean=103.939,116.779,123.68")(x)
    assert np.array_equal(plain, x - np.float32([103.939, 116.779, 123.68]))


def test_scale_offset_and_std_specs():
    x = _images()
    got = preprocess.resolve("scale=1/127.5,offset=-1")(x)
    assert np.array_equal(got, x * np.float32(1 / 127.5) + np.float32(-1))
    mtcnn = preprocess.resolve("mean=127.5,std=128")(x)
    assert np.array_equal(mtcnn, (x - np.float32(127.5)) / np.float32(128))


def test_module_function_and_bad_specs(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text("def prep(x):\n    return x / 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert np.array_equal(preprocess.resolve("mine:prep")(_images()), _images() / 2)
    with pytest.raises(surgery.SurgeryError, match="unknown key 'sclae'"):
        preprocess.resolve("sclae=2")
    with pytest.raises(surgery.SurgeryError, match="not a number"):
        preprocess.resolve("scale=1/x")
    with pytest.raises(surgery.SurgeryError, match="give 1 or 3"):
        preprocess.resolve("mean=1,2")(_images())
    assert preprocess.resolve("resnet50") == "resnet50"  # left to the source
