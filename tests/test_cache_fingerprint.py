"""A feature cache knows what it holds: a resume (or a reuse) with another
model or other data is refused in one line, before a row is added."""

import json
import os

import keras
import numpy as np
import pytest

import surgery
from surgery.data.sources import open_source

X = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
NAMES = ["f.zarr", "f.h5"]


def _model(seed=0, activation="relu"):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation=activation),
            keras.layers.Dense(3),
        ],
        name="small",
    )


class Killed(Exception):
    """The run stopped here (as a kill would, after its committed rows)."""


def _stopping(data, batches):
    """`data` in batches of 16, failing after `batches` of them."""
    for i, lo in enumerate(range(0, len(data), 16)):
        if i == batches:
            raise Killed
        yield (data[lo : lo + 16],)


def _interrupt(model, path, data=X, batches=2):
    """A cache of `data` interrupted after `batches` batches of 16 rows."""
    with pytest.raises(Killed):
        surgery.cache_features(model, _stopping(data, batches), path, verbose=0)
    assert not os.path.exists(path)
    with open(path + ".partial.json") as f:
        assert json.load(f)["rows"] == 16 * batches


def _rows(path):
    return np.concatenate(list(surgery.open_features(path, batch_size=7)))


def _refused(match, model, data, path, **kwargs):
    with open(path + ".partial.json") as f:
        before = f.read()
    with pytest.raises(surgery.SurgeryError, match=match) as e:
        surgery.cache_features(model, data, path, batch_size=16, verbose=0, **kwargs)
    assert len(str(e.value).splitlines()) == 1
    assert "restart=True" in str(e.value)
    with open(path + ".partial.json") as f:
        assert f.read() == before  # nothing was appended
    assert not os.path.exists(path)


@pytest.mark.parametrize("name", NAMES)
def test_a_resume_with_other_data_of_the_same_shape_is_refused(tmp_path, name):
    path = str(tmp_path / name)
    model = _model()
    _interrupt(model, path)
    other = np.random.default_rng(1).normal(size=X.shape).astype("float32")
    _refused("other data .its first samples differ", model, other, path)
    last = X.copy()
    last[31] += 1  # the last committed sample differs, the first ones do not
    _refused("other data .its last committed samples differ", model, last, path)


@pytest.mark.parametrize("name", NAMES)
def test_a_resume_with_samples_of_another_shape_is_refused(tmp_path, name):
    keras.utils.set_random_seed(0)
    pooled = keras.Sequential(  # any sequence length: the features fit either way
        [
            keras.Input((None, 3)),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    path = str(tmp_path / name)
    short = np.random.default_rng(0).normal(size=(40, 4, 3)).astype("float32")
    _interrupt(pooled, path, data=short)
    long = np.random.default_rng(0).normal(size=(40, 5, 3)).astype("float32")
    _refused(
        r"another shape .per sample: \(4, 3\) float32 then, \(5, 3\)",
        pooled,
        long,
        path,
    )


@pytest.mark.parametrize("name", NAMES)
def test_a_resume_with_another_model_is_refused(tmp_path, name):
    path = str(tmp_path / name)
    _interrupt(_model(0), path)
    _refused("another model .same architecture, other weights", _model(1), X, path)
    _refused("another model .another architecture", _model(0, "tanh"), X, path)


@pytest.mark.parametrize("name", NAMES)
def test_a_resume_with_the_same_model_and_data_is_the_uninterrupted_cache(
    tmp_path, name
):
    reference = _rows(
        surgery.cache_features(
            _model(), X, str(tmp_path / ("ref_" + name)), batch_size=16, verbose=0
        )
    )
    path = str(tmp_path / name)
    _interrupt(_model(), path)
    again = _model()  # the same model rebuilt, as a new session would
    surgery.cache_features(again, X, path, batch_size=16, verbose=0)
    assert np.array_equal(_rows(path), reference)
    assert not os.path.exists(path + ".partial.json")
    # once complete, it is reused for this model and data, and for no other
    assert surgery.cache_features(again, X, path, batch_size=16, verbose=0) == path
    with pytest.raises(surgery.SurgeryError, match="other weights.*delete it"):
        surgery.cache_features(_model(1), X, path, verbose=0)
    with pytest.raises(surgery.SurgeryError, match="other data.*delete it"):
        surgery.cache_features(again, X[::-1].copy(), path, verbose=0)


@pytest.mark.parametrize("name", NAMES)
def test_a_cache_without_a_fingerprint_is_refused(tmp_path, name):
    path = str(tmp_path / name)
    model = _model()
    _interrupt(model, path)
    with open(path + ".partial.json") as f:
        record = json.load(f)
    del record["fingerprint"]  # as written before caches recorded one
    with open(path + ".partial.json", "w") as f:
        json.dump(record, f)
    _refused("without a fingerprint.*cannot be trusted", model, X, path)
    surgery.cache_features(model, X, path, batch_size=16, verbose=0, restart=True)
    # a complete cache from before fingerprints is not trusted either
    _drop_attrs(path)
    with pytest.raises(surgery.SurgeryError, match="without a fingerprint"):
        surgery.cache_features(model, X, path, batch_size=16, verbose=0)


def _drop_attrs(path):
    if path.endswith(".h5"):
        import h5py

        with h5py.File(path, "r+") as f:
            del f["features"].attrs["surgery"]
    else:
        import zarr

        array = zarr.open_array(path, mode="r+")
        array.attrs.put({})


@pytest.mark.parametrize("name", NAMES)
def test_restart_rebuilds_a_refused_cache(tmp_path, name):
    reference = _rows(
        surgery.cache_features(
            _model(1), X, str(tmp_path / ("ref_" + name)), batch_size=16, verbose=0
        )
    )
    path = str(tmp_path / name)
    _interrupt(_model(0), path)
    _refused("other weights", _model(1), X, path)
    surgery.cache_features(_model(1), X, path, batch_size=16, verbose=0, restart=True)
    assert np.array_equal(_rows(path), reference)
    assert sorted(os.listdir(tmp_path)) == sorted(["ref_" + name, name])


def test_the_fingerprint_is_committed_with_the_rows_it_describes(tmp_path):
    """Every record names the rows it counts: a kill between the rows and the
    record leaves the previous record, which describes the previous rows."""
    path = str(tmp_path / "f.zarr")
    model = _model()
    _interrupt(model, path, batches=2)
    with open(path + ".partial.json") as f:
        one = json.load(f)
    os.remove(path + ".partial.json")
    import shutil

    shutil.rmtree(path + ".partial")
    _interrupt(model, path, batches=3)
    with open(path + ".partial.json") as f:
        two = json.load(f)
    assert one["fingerprint"]["data"]["rows"] == one["rows"] == 32
    assert two["fingerprint"]["data"]["rows"] == two["rows"] == 48
    assert one["fingerprint"]["data"]["tail"] != two["fingerprint"]["data"]["tail"]
    assert one["fingerprint"]["model"] == two["fingerprint"]["model"]


def _append_uncommitted(path, rows):
    """Rows written after the last record, as a kill before the record leaves."""
    if path.endswith(".h5"):
        import h5py

        with h5py.File(path + ".partial", "r+") as f:
            array = f["features"]
            n = array.shape[0]
            array.resize(n + len(rows), axis=0)
            array[n:] = rows
    else:
        import zarr

        zarr.open_array(path + ".partial", mode="r+").append(rows, axis=0)


@pytest.mark.parametrize("name", NAMES)
def test_a_kill_between_rows_and_record_is_judged_by_the_record(tmp_path, name):
    """Rows past the record are not described by it: they are redone, and the
    data they came from is not held against the resume."""
    path = str(tmp_path / name)
    model = _model()
    _interrupt(model, path)  # 32 rows committed
    _append_uncommitted(path, np.full((16, 3), 7, "float32"))
    changed = X.copy()
    changed[32:] += 1  # differs only after the committed rows
    reference = _rows(
        surgery.cache_features(
            model, changed, str(tmp_path / ("ref_" + name)), batch_size=16, verbose=0
        )
    )
    surgery.cache_features(model, changed, path, batch_size=16, verbose=0)
    assert np.array_equal(_rows(path), reference)


@pytest.mark.parametrize("name", NAMES)
def test_a_resume_with_a_trunk_split_elsewhere_is_refused(tmp_path, name):
    """Split after fc1 or after its Dropout: same weights, same feature shape."""
    import surgery.default

    model = surgery.default.load()
    at_fc1, _ = surgery.split(model, "fc1")
    at_dropout, _ = surgery.split(model, "dropout")
    images = np.random.default_rng(0).uniform(0, 255, (48, 32, 32, 3))
    images = images.astype("float32")
    path = str(tmp_path / name)
    _interrupt(at_fc1, path, data=images)
    _refused("another architecture or split point", at_dropout, images, path)


def _image_folder(folder, count=40):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(count):
        pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return str(folder)


def _image_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((6, 6, 3)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )


@pytest.mark.parametrize("name", NAMES)
def test_a_cache_of_float32_pixels_holds_for_the_folder_read_as_uint8(tmp_path, name):
    """Caches written when image folders were read as float32 stay valid now
    that they are read as uint8, complete or interrupted; other pixels do not."""
    folder = _image_folder(tmp_path / "imgs")
    model = _image_model()
    pixels = np.concatenate(list(open_source(folder, model=model, batch_size=16)))
    assert pixels.dtype == np.uint8
    old = pixels.astype("float32")  # what the folder gave before
    path = str(tmp_path / name)
    surgery.cache_features(model, old, path, batch_size=16, verbose=0)
    assert surgery.cache_features(model, folder, path, batch_size=16, verbose=0) == path
    resumed = str(tmp_path / ("r" + name))
    _interrupt(model, resumed, data=old)
    surgery.cache_features(model, folder, resumed, batch_size=16, verbose=0)
    assert np.array_equal(_rows(resumed), _rows(path))
    brighter = (pixels // 2).astype("float32")
    with pytest.raises(surgery.SurgeryError, match="other data") as e:
        surgery.cache_features(model, brighter, path, batch_size=16, verbose=0)
    assert len(str(e.value).splitlines()) == 1
