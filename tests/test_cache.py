import os

import numpy as np
import pytest

import surgery
import surgery.default
from surgery.files.rowstore import _write_record, read_fingerprint

X = np.random.default_rng(0).uniform(0, 255, (70, 32, 32, 3)).astype("float32")


def _fingerprint(path):
    """What a complete cache records of the model and data that made it."""
    if path.endswith(".h5"):
        import h5py

        with h5py.File(path, "r") as f:
            return read_fingerprint(f["features"])
    import zarr

    return read_fingerprint(zarr.open_array(path, mode="r"))


def _as_partial(path):
    """Turn a complete cache back into a partial one with all rows committed."""
    rows = np.concatenate(list(surgery.open_features(path)))
    fingerprint = _fingerprint(path)
    os.replace(path, path + ".partial")
    record = {"rows": len(rows), "shape": list(rows.shape[1:]), "dtype": "float32"}
    record["fingerprint"] = fingerprint
    _write_record(path + ".partial.json", record)


@pytest.mark.parametrize("name", ["feats.zarr", "feats.h5"])
def test_cache_then_insert_on_cached_features_is_identical(tmp_path, name):
    model = surgery.default.load()
    trunk, head = surgery.split(model, "block3_pool")
    path = surgery.cache_features(
        trunk, X, str(tmp_path / name), batch_size=16, verbose=0
    )
    assert not (tmp_path / (name + ".partial")).exists()
    feats = np.concatenate(list(surgery.open_features(path, batch_size=32)))
    assert np.array_equal(feats, trunk.predict(X, batch_size=16, verbose=0))
    head_bn = surgery.insert_identity_bn(
        head, after=["fc1", "fc2"], data=surgery.open_features(path), verbose=0
    )
    assert surgery.verify(
        model, surgery.combine(trunk, head_bn), X, verbose=0
    ).identical


@pytest.mark.parametrize("name", ["feats.zarr", "feats.h5"])
def test_interrupted_cache_resumes_without_duplicates(tmp_path, name):
    model = surgery.default.load()
    trunk, _ = surgery.split(model, "fc1")
    path = str(tmp_path / name)
    surgery.cache_features(trunk, X, path, batch_size=16, max_samples=40, verbose=0)
    _as_partial(path)  # as if the run had stopped after committing 40 rows
    surgery.cache_features(trunk, X, path, batch_size=16, verbose=0)
    feats = np.concatenate(list(surgery.open_features(path)))
    assert feats.shape[0] == 70
    # rows 32-39 were computed in a batch of 8 first: float32 rounding differs by shape
    np.testing.assert_allclose(
        feats, trunk.predict(X, batch_size=16, verbose=0), rtol=1e-5, atol=1e-5
    )


def test_empty_data_leaves_no_file(tmp_path):
    trunk, _ = surgery.split(surgery.default.load(), "fc1")
    with pytest.raises(surgery.SurgeryError):
        surgery.cache_features(trunk, X[:0], str(tmp_path / "f.zarr"), verbose=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["feats.zarr", "feats.h5"])
def test_a_cache_from_other_data_or_model_is_refused(tmp_path, name):
    model = surgery.default.load()
    trunk, _ = surgery.split(model, "fc1")
    path = str(tmp_path / name)
    surgery.cache_features(trunk, X[:60], path, batch_size=16, verbose=0)
    assert surgery.cache_features(trunk, X[:60], path, verbose=0) == path
    with pytest.raises(surgery.SurgeryError, match="holds 60 rows but the data has 70"):
        surgery.cache_features(trunk, X, path, verbose=0)
    other, _ = surgery.split(model, "block3_pool")
    with pytest.raises(surgery.SurgeryError, match=r"shape \(256,\) but the model"):
        surgery.cache_features(other, X[:60], path, verbose=0)


def test_a_partial_cache_longer_than_the_data_is_refused(tmp_path):
    trunk, _ = surgery.split(surgery.default.load(), "fc1")
    path = str(tmp_path / "f.zarr")
    surgery.cache_features(trunk, X, path, verbose=0)
    _as_partial(path)
    with pytest.raises(
        surgery.SurgeryError, match="holds 70 rows but the data gave 50"
    ):
        surgery.cache_features(trunk, X[:50], path, verbose=0)
    assert not os.path.exists(path)


def test_chunks_do_not_follow_the_batch_size(tmp_path):
    import zarr

    trunk, _ = surgery.split(surgery.default.load(), "fc1")
    path = surgery.cache_features(
        trunk, X[:10], str(tmp_path / "f.zarr"), batch_size=1, verbose=0
    )
    assert zarr.open_array(path, mode="r").chunks[0] >= 10


def test_features_with_labels_shuffle_every_epoch_and_cover_every_row(tmp_path):
    trunk, _ = surgery.split(surgery.default.load(), "fc1")
    path = surgery.cache_features(trunk, X, str(tmp_path / "f.zarr"), verbose=0)
    feats = np.concatenate(list(surgery.open_features(path)))
    labels = np.arange(70)
    plain = surgery.open_features(path, batch_size=16, labels=labels)
    x, y = plain[1]
    assert np.array_equal(y, labels[16:32]) and np.array_equal(x, feats[16:32])
    data = surgery.open_features(
        path, batch_size=16, labels=labels, shuffle=True, seed=1
    )
    data.per_buffer = 2  # two blocks per buffer: the buffer logic is exercised
    data.on_epoch_end()
    orders = []
    for _ in range(2):
        batches = [data[i] for i in range(len(data))]
        assert [len(b[1]) for b in batches] == [16, 16, 16, 16, 6]
        order = np.concatenate([b[1] for b in batches])
        assert sorted(order) == list(range(70))  # every row once
        for bx, by in batches:
            assert np.array_equal(bx, feats[by])  # features stay with labels
        orders.append(order)
        data.on_epoch_end()
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[0], labels)
    with pytest.raises(surgery.SurgeryError, match="holds 70 rows but 3 labels"):
        surgery.open_features(path, labels=labels[:3])
