import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

from surgery.runtime.quiet import import_keras_quietly  # noqa: E402

import_keras_quietly()

from surgery.testing.legacy_vgg16 import write_legacy_vgg16_weights  # noqa: E402


@pytest.fixture(autouse=True)
def _delete_big_files(tmp_path):
    """VGG16 files are 60-550 MB; pytest keeps the last 3 sessions' tmp dirs."""
    yield
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size > 2**20:
            path.unlink()


@pytest.fixture(scope="session")
def top_file(tmp_path_factory):
    """SLOW, ONCE PER SESSION: the full legacy file with the top, 553 MB.

    VGG16's top needs 224x224 inputs (fc1 is 25088x4096), so it cannot be
    small. Measured on this 2-CPU box: writing 3.3 s, our load 3.7 s, Keras'
    load 3.1 s, predicting 2 images with both 2.4 s.
    """
    path = (
        tmp_path_factory.mktemp("top") / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
    )
    write_legacy_vgg16_weights(str(path), include_top=True, seed=2)
    yield path
    path.unlink()
