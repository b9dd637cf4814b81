import sys

import h5py
import keras
import numpy as np
import pytest
import zarr
from PIL import Image

import surgery
from surgery.data import sources
from surgery.errors import SurgeryError

ROWS, DIM = 150, 6


@pytest.fixture(scope="module")
def features():
    return np.random.default_rng(0).normal(3.0, 2.0, (ROWS, DIM)).astype("float32")


@pytest.fixture(scope="module")
def dense_model():
    inputs = keras.Input((DIM,))
    x = keras.layers.Dense(5, activation="relu", name="d")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(x))


def _stats(model, data, **kwargs):
    return surgery.activation_stats(model, ["d"], data, verbose=0, **kwargs)["d"]


def _assert_same_moments(a, b):
    assert a.count == b.count
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.m2, b.m2)


def _write_sources(tmp_path, x):
    """The same rows in every on-disk format; returns the data arguments."""
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "stored.npz", x=x, y=np.arange(len(x)))
    np.savez_compressed(tmp_path / "packed.npz", x=x)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("group/x", data=x, chunks=(16, DIM))
        f.create_dataset("labels", data=np.arange(len(x)))
    zarr.create_array(store=str(tmp_path / "x.zarr"), data=x, chunks=(16, DIM))
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("feats", data=x, chunks=(16, DIM))
    return [
        str(tmp_path / "x.npy"),
        tmp_path / "x.npy",
        f"{tmp_path}/stored.npz:x",
        str(tmp_path / "packed.npz"),
        f"{tmp_path}/x.h5:/group/x",
        str(tmp_path / "x.zarr"),
        f"{tmp_path}/g.zarr:feats",
        str(tmp_path / "g.zarr"),
    ]


def test_every_file_source_gives_the_in_memory_statistics(
    tmp_path, features, dense_model
):
    expected = _stats(dense_model, features, batch_size=32)
    for data in _write_sources(tmp_path, features):
        _assert_same_moments(_stats(dense_model, data, batch_size=32), expected)


def test_open_arrays_are_sources_too(tmp_path, features, dense_model):
    expected = _stats(dense_model, features, batch_size=32)
    _write_sources(tmp_path, features)
    with h5py.File(tmp_path / "x.h5", "r") as f:
        _assert_same_moments(_stats(dense_model, f["group/x"], batch_size=32), expected)
    array = zarr.open_array(str(tmp_path / "x.zarr"), mode="r")
    _assert_same_moments(_stats(dense_model, array, batch_size=32), expected)


def test_stored_npz_members_are_memory_mapped(tmp_path, features):
    _write_sources(tmp_path, features)
    rows = sources.open_source(f"{tmp_path}/stored.npz:x", batch_size=50)
    assert isinstance(rows.arrays, np.memmap)
    assert np.array_equal(np.concatenate([rows[i] for i in range(len(rows))]), features)


def test_compressed_npz_streams_in_order_and_rewinds(tmp_path, features):
    _write_sources(tmp_path, features)
    rows = sources.open_source(str(tmp_path / "packed.npz"), batch_size=40)
    assert [len(rows[i]) for i in range(len(rows))] == [40, 40, 40, 30]
    assert np.array_equal(rows[1], features[40:80])
    assert np.array_equal(rows[0], features[:40])  # an earlier batch reopens


def test_reads_never_exceed_one_batch(features):
    class Recording:
        shape, dtype = features.shape, features.dtype
        largest = 0

        def __getitem__(self, key):
            Recording.largest = max(Recording.largest, key.stop - key.start)
            return features[key]

    rows = sources.ArrayRows(Recording(), batch_size=25)
    assert np.array_equal(np.concatenate([rows[i] for i in range(len(rows))]), features)
    assert Recording.largest == 25


def test_shards_are_contiguous_slices_that_cover_the_data(tmp_path, features):
    _write_sources(tmp_path, features)
    parts = []
    for i in range(4):
        rows = sources.open_source(str(tmp_path / "x.npy"), batch_size=16, shard=(i, 4))
        parts.append(np.concatenate([rows[j] for j in range(len(rows))]))
    assert [len(p) for p in parts] == [37, 38, 37, 38]
    assert np.array_equal(np.concatenate(parts), features)


def test_bcolz_carray_directory(tmp_path, features, dense_model):
    bcolz = pytest.importorskip("bcolz")
    carray = bcolz.carray(features, rootdir=str(tmp_path / "x.bc"), mode="w")
    carray.flush()
    expected = _stats(dense_model, features, batch_size=32)
    got = _stats(dense_model, str(tmp_path / "x.bc"), batch_size=32)
    _assert_same_moments(got, expected)


def test_bcolz_without_the_extra_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "x.bc" / "meta").mkdir(parents=True)
    (tmp_path / "x.bc" / "data").mkdir()
    monkeypatch.setitem(sys.modules, "bcolz", None)
    with pytest.raises(SurgeryError, match=r"pip install 'surgery\[bcolz\]'"):
        sources.open_source(str(tmp_path / "x.bc"))


def _write_images(folder, classes=("b", "a"), per_class=3, size=(20, 14)):
    rng = np.random.default_rng(1)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / c / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")


def _pil(path, size):
    image = Image.open(path).convert("RGB").resize(size[::-1], Image.BILINEAR)
    return np.asarray(image, dtype="float32")


def test_image_folder_in_class_order_resized_and_preprocessed(tmp_path):
    _write_images(tmp_path / "imgs")
    model = keras.Sequential([keras.Input((8, 10, 3)), keras.layers.Flatten()])
    rows = sources.open_source(
        str(tmp_path / "imgs"), model=model, preprocess="vgg16", batch_size=4
    )
    files = sources.list_images(str(tmp_path / "imgs"))
    assert [f.split("/")[-2:] for f in files] == [
        [c, f"{i:02d}.png"] for c in "ab" for i in range(3)
    ]
    batch = np.concatenate([rows[i] for i in range(len(rows))])
    raw = np.stack([_pil(f, (8, 10)) for f in files])
    bgr_centered = raw[..., ::-1] - np.array([103.939, 116.779, 123.68], "float32")
    np.testing.assert_allclose(batch, bgr_centered, rtol=0, atol=1e-4)


def test_image_folder_feeds_insertion(tmp_path):
    _write_images(tmp_path / "imgs", per_class=5)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    folder = str(tmp_path / "imgs")
    new = surgery.insert_identity_bn(model, after="conv", data=folder, verbose=0)
    report = surgery.verify(model, new, folder, verbose=0)
    assert report.identical and report.samples == 10


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: str(t / "missing.npy"), "does not exist"),
        (lambda t: str(t / "stored.npz"), "name one as"),
        (lambda t: f"{t}/stored.npz:z", "no array 'z'"),
        (lambda t: str(t / "x.h5"), "holds 2 datasets"),
        (lambda t: f"{t}/x.h5:/nope", "no dataset '/nope'"),
        (lambda t: str(t / "empty"), "no images"),
        (lambda t: str(t / "notes.csv"), "not an image folder"),
    ],
)
def test_bad_sources_fail_in_one_line(tmp_path, features, make, message):
    _write_sources(tmp_path, features)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.csv").write_text("a,b\n")
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten()])
    with pytest.raises(SurgeryError, match=message) as info:
        sources.open_source(make(tmp_path), model=model)
    assert len(str(info.value).splitlines()) == 1


def test_image_folder_needs_a_size_and_known_preprocess(tmp_path):
    _write_images(tmp_path / "imgs")
    free = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Flatten()])
    with pytest.raises(SurgeryError, match="--image-size"):
        sources.open_source(str(tmp_path / "imgs"), model=free)
    rows = sources.open_source(str(tmp_path / "imgs"), model=free, image_size=(5, 6))
    assert rows[0].shape == (6, 5, 6, 3)
    with pytest.raises(SurgeryError, match="unknown preprocess 'vgg61'"):
        sources.open_source(
            str(tmp_path / "imgs"), image_size=(5, 6), preprocess="vgg61"
        )


def test_bad_shards_are_refused():
    assert sources.parse_shard(" 2/4 ") == (2, 4)
    for text in ["4/4", "1/0", "a/b", "1-4"]:
        with pytest.raises(SurgeryError, match="shard"):
            sources.parse_shard(text)


def test_folder_labels_follow_the_sorted_class_folders(tmp_path):
    _write_images(tmp_path / "imgs", classes=("zebra", "ant"), per_class=2)
    labels, names = sources.folder_labels(str(tmp_path / "imgs"))
    assert names == ["ant", "zebra"] and labels.tolist() == [0, 0, 1, 1]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "imgs" / "loose.png")
    with pytest.raises(SurgeryError, match="outside class sub-folders"):
        sources.folder_labels(str(tmp_path / "imgs"))


def _keras_pixels(path, size, color_mode):
    image = keras.utils.load_img(
        path, color_mode=color_mode, target_size=size, interpolation="bilinear"
    )
    return keras.utils.img_to_array(image, dtype="float32")


@pytest.mark.parametrize(
    "channels, color_mode", [(3, "rgb"), (1, "grayscale"), (4, "rgba")]
)
def test_image_folder_pixels_are_load_img_pixels_kept_in_uint8(
    tmp_path, channels, color_mode
):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a.jpg", quality=85)
    Image.fromarray(rgb).save(folder / "b.png")
    Image.fromarray(rgb[..., 0]).save(folder / "c_gray.png")
    rgba = np.concatenate([rgb, rng.integers(0, 256, (30, 26, 1), np.uint8)], -1)
    Image.fromarray(rgba).save(folder / "d_rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "e_palette.gif")
    Image.fromarray(rgb[:12, :10]).save(folder / "f_small.bmp")  # resized up
    size = (17, 11)
    model = keras.Sequential([keras.Input((*size, channels)), keras.layers.Flatten()])
    plain = sources.open_source(str(folder), model=model, batch_size=8)[0]
    want = np.stack(
        [_keras_pixels(f, size, color_mode) for f in sources.list_images(str(folder))]
    )
    assert plain.dtype == np.uint8 and plain.shape == want.shape
    assert np.array_equal(plain.astype("float32"), want)
    scaled = sources.open_source(
        str(folder), model=model, batch_size=8, preprocess=lambda x: x / 255
    )[0]
    assert scaled.dtype == np.float32 and np.array_equal(scaled, want / 255)


def test_statistics_from_uint8_batches_equal_those_of_float32_pixels(tmp_path):
    _write_images(tmp_path / "imgs", per_class=5, size=(16, 16))
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    folder = str(tmp_path / "imgs")
    pixels = np.stack(
        [_keras_pixels(f, (12, 12), "rgb") for f in sources.list_images(folder)]
    )
    got = surgery.activation_stats(model, ["conv"], folder, batch_size=4, verbose=0)
    want = surgery.activation_stats(model, ["conv"], pixels, batch_size=4, verbose=0)
    _assert_same_moments(got["conv"], want["conv"])
    path = surgery.cache_features(model, folder, str(tmp_path / "f.zarr"), verbose=0)
    cached = np.concatenate(list(surgery.open_features(path, batch_size=4)))
    assert np.array_equal(cached, model.predict(pixels, batch_size=32, verbose=0))
