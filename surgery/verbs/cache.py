"""`cache_features`: a model's outputs over a data set, streamed to disk.

Rows are appended batch by batch to `<path>.partial` (zarr, or HDF5 for a
`.h5` path) and the file is renamed to `path` only when complete, so a file
at `path` is always whole. An interrupted run resumes from the rows it
committed (the data must come in the same order), once the fingerprint of the
model and data that made them is checked (`surgery.verbs.cache_check`); see
`surgery.files.rowstore`.
"""

from __future__ import annotations

import errno
import math
import os
from typing import Any

import keras
import numpy as np

from surgery.data.batches import Batches, batch_length, progress, shape_fits
from surgery.data.sources import ArrayRows
from surgery.errors import SurgeryError, first_line
from surgery.files.atomic import is_io_error, write_error
from surgery.files.fingerprint import RowDigests, as_recorded, sample_layout
from surgery.files.rowstore import CacheLock, RowWriter, read_fingerprint
from surgery.validate import check_not_empty, check_zarr_complete
from surgery.verbs.cache_check import Resume, check_complete, made_by


def cache_features(
    model: keras.Model,
    data: Any,
    path: str,
    *,
    batch_size: int | None = None,
    steps: int | None = None,
    max_samples: int | None = None,
    verbose: int | str = "auto",
    restart: bool = False,
) -> str:
    """Write `model`'s outputs over `data` to `path` (zarr or HDF5); return it.

    A trunk's features, computed once, make every later pass over a head cheap
    (see `split`). Rows are appended batch by batch to `<path>.partial`, and
    the file is renamed to `path` only when complete, so a file at `path` is
    always whole. With its rows the cache records what made them: digests
    of the model's weights and architecture, each input's per-sample shape
    and dtype, and digests of the first and the last committed input
    samples. An interrupted run resumes from the rows it committed (the
    data must come in the same order) once these are checked, before any
    row is appended: another model, other data or another shape is refused.
    An existing complete cache is returned as it is, once checked to be of
    this model, with the data's first samples, and to fit the model's output
    shape and, when the data says, its number of samples. A second run on
    the same path while one is writing gets an error naming the writer.

    Args:
        model: A `keras.Model` with one output, usually a trunk from `split`.
        data: The model inputs: anything `model.predict` accepts as `x`
            (NumPy arrays, a list or dict of them for several inputs, a
            `tf.data.Dataset`, a `keras.utils.PyDataset`, a generator), or a
            path or on-disk array that `surgery.sources.open_source` opens
            (image folder, `.npy`, `.npz`, `.h5`, zarr, bcolz). Labels in
            `(x, y)` or `(x, y, sample_weight)` batches are ignored. It is
            read one batch at a time, never whole.
        path: Where to write the features: a path ending in `.h5` gets an
            HDF5 file with one dataset, `features`; any other path (e.g.
            `feats.zarr`) a zarr array. One row per sample, in data order.
        batch_size: Samples per batch for arrays, paths and on-disk arrays.
            Defaults to `None`: 32, as in `model.predict`. Datasets,
            generators and `PyDataset`s keep their own batches.
        steps: Stop after this many batches. Defaults to `None`: every batch
            the data gives.
        max_samples: Stop after this many samples, cutting the last batch
            short; at least 1. Defaults to `None`: every sample the data
            gives.
        verbose: `"auto"` (the default) or 1: a Keras progress bar; 2: one
            line when the pass ends; 0: silent.
        restart: Discard the rows an interrupted run committed to
            `<path>.partial` and start again (after that file was damaged,
            or was made by another model or from other data, or before
            caches recorded what made them). Defaults to `False`: resume
            from them, once checked. A complete cache at `path` is kept
            either way.

    Returns:
        `path`, once it holds every row.

    Raises:
        SurgeryError: the model has more than one output; an existing cache
            at `path` is unreadable, has another row shape than the model's
            output or another number of rows than the data, or was made by
            another model, from other data or without a fingerprint; the
            partial file is damaged, holds rows from other data (another
            row count, shape or digest), was made by another model (other
            weights or architecture) or records no fingerprint (pass
            `restart=True`); another run is writing `path`, or its lock
            cannot be created, or `<path>.lock` is not a lock of ours (a
            link, a folder, a user's file: it is left as it is); the name is
            too long for `<path>.partial.json` (a `UsageError`, before any
            pass); a write fails (e.g. a full disk: the message names the
            file; committed rows are kept); the data is missing, unreadable
            or empty; or `max_samples` is below 1.

    Example:

    ```python
    import os
    import tempfile

    import keras
    import numpy as np
    import surgery

    trunk = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16)])
    x = np.random.default_rng(0).normal(size=(100, 8)).astype("float32")
    path = os.path.join(tempfile.mkdtemp(), "feats.zarr")
    surgery.cache_features(trunk, x, path, verbose=0)
    print(np.asarray(surgery.open_features(path, batch_size=100)[0]).shape)
    # (100, 16)
    ```
    """
    if len(model.outputs) != 1:
        raise SurgeryError("cache_features needs a model with one output")
    batches = Batches(
        data, batch_size=batch_size, steps=steps, max_samples=max_samples, model=model
    )
    fingerprint = made_by(model, data)
    with CacheLock(path):
        if os.path.exists(path):
            _remove_stale_record(path)
            rows = _open_rows(path)
            _check_fits(path, rows, model, batches.num_samples)
            check_complete(path, rows, read_fingerprint(rows), fingerprint, batches)
            return path
        writer = RowWriter(path, restart=restart)
        try:
            return _write(model, batches, writer, verbose, fingerprint)
        except Exception as e:
            if not is_io_error(e):
                raise
            raise write_error(writer.partial, e) from None
        finally:
            writer.close()


def _write(model, batches, writer, verbose, fingerprint) -> str:
    done = writer.rows
    resume = None
    if done:
        _check_fits(writer.partial, writer.array, model, None)
        resume = Resume(writer.partial, done, writer.fingerprint, fingerprint)
    digests = RowDigests(mark=done)
    data = fingerprint["data"]
    seen = 0
    for x in progress(batches, verbose, "cache"):
        n = batch_length(x)
        if seen == 0:
            data["layout"] = sample_layout(x)
            if resume is not None:
                recorded = resume.recorded["data"]["layout"]
                data["layout"] = as_recorded(data["layout"], recorded)
                resume.check_layout(data["layout"])
            digests.dtypes = [dtype for _, dtype in data["layout"]]
        digests.add(x, seen)
        skip = min(max(done - seen, 0), n)
        seen += n
        if resume is not None and seen >= done:
            resume.check_rows(digests.digest(done))  # before any row is added
            resume, digests.mark = None, 0
        if skip == n:
            continue
        rows = np.asarray(model.predict_on_batch(x))[skip:]
        _check_room(writer, rows)
        writer.append(rows, {**fingerprint, "data": {**data, **digests.digest(seen)}})
    if writer.rows == 0:
        writer.discard()  # no empty cache file is left behind
        check_not_empty(0, "nothing was cached")
    if writer.rows != seen:
        raise SurgeryError(
            f"{writer.partial} holds {writer.rows} rows but the data gave {seen} "
            "samples: it is from other data; delete it (or pass restart=True) "
            "and run again"
        )
    return writer.finish()


def _check_room(writer, rows) -> None:
    """Refuse an HDF5 append a full disk would fail: HDF5 does not recover
    from a failed write (the process crashes when the file is closed)."""
    if not writer.h5:
        return  # zarr's failed writes are plain errors, reported as they come
    folder = os.path.dirname(os.path.abspath(writer.partial))
    disk = os.statvfs(folder)
    if disk.f_bavail * disk.f_frsize < rows.nbytes + _H5_ROOM:
        raise write_error(writer.partial, OSError(errno.ENOSPC, "full"))


_H5_ROOM = 5 * 2**20  # a new chunk (up to 4 MB) and the file's metadata


def _remove_stale_record(path):
    """A run killed between its final rename and removing its record."""
    record = path + ".partial.json"
    if os.path.exists(record) and not os.path.exists(path + ".partial"):
        os.remove(record)


def open_features(
    path: str,
    batch_size: int = 256,
    *,
    labels: np.ndarray | None = None,
    shuffle: bool = False,
    seed: int | None = None,
) -> keras.utils.PyDataset:
    """A feature cache written by `cache_features`, as data read in chunks.

    The result is a `keras.utils.PyDataset`, so it serves as `data` for every
    verb here and, with `labels`, as `x` for `model.fit`. Only one batch (or
    one shuffle buffer) is in memory at a time.

    Args:
        path: The cache's path, as given to `cache_features` (`.h5` for
            HDF5, else zarr).
        batch_size: Rows per batch. Defaults to `256`.
        labels: One label per cached row, in row order (e.g. from
            `surgery.sources.folder_labels` for an image folder), to make the
            batches `(features, labels)` pairs for `fit`. Defaults to `None`:
            the batches are the features alone.
        shuffle: Draw a new order every epoch, in bounded memory: blocks of
            `batch_size` rows are shuffled, a few thousand rows of them read
            together and shuffled again. A cache of a class-sorted image
            folder read front to back gives one-class batches, which is bad
            for SGD and worse for BN. Defaults to `False`: rows in order.
        seed: Seed of the shuffle, for a repeatable order. Defaults to
            `None`: a fresh order on every run. Ignored without `shuffle`.

    Returns:
        A `keras.utils.PyDataset` over the cached rows: feature batches, or
        `(features, labels)` batches when `labels` is given.

    Raises:
        SurgeryError: there is no cache at `path`, it cannot be read (or a
            zarr array misses chunks), or `labels` does not hold one label
            per row.

    Example:

    ```python
    import os
    import tempfile

    import keras
    import numpy as np
    import surgery

    trunk = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16)])
    x = np.random.default_rng(0).normal(size=(100, 8)).astype("float32")
    labels = np.arange(100) % 2
    path = surgery.cache_features(
        trunk, x, os.path.join(tempfile.mkdtemp(), "feats.h5"), verbose=0
    )
    features = surgery.open_features(path, 32, labels=labels, shuffle=True, seed=0)
    head = keras.Sequential([keras.Input((16,)), keras.layers.Dense(2)])
    head.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    head.fit(features, epochs=1, verbose=0)
    print(len(features), features[0][0].shape)  # 4 (32, 16)
    ```
    """
    if not os.path.exists(path):
        raise SurgeryError(f"no feature cache at {path}; run cache_features first")
    rows = _open_rows(path)
    if labels is not None and len(labels) != rows.shape[0]:
        raise SurgeryError(
            f"{path} holds {rows.shape[0]} rows but {len(labels)} labels were "
            "given; pass one label per cached sample"
        )
    if shuffle:
        return ShuffledRows(rows, labels, batch_size, seed=seed)
    return ArrayRows(rows, batch_size, labels=labels)


class ShuffledRows(keras.utils.PyDataset):
    """Rows in a new random order each epoch, with one buffer in memory.

    Blocks of `batch_size` contiguous rows are shuffled, `buffer_rows` worth
    of them are read together (sequential reads), and the rows inside that
    buffer are shuffled again, like `tf.data.Dataset.shuffle`. Every row is
    read once per epoch and every batch but the last is full.
    """

    def __init__(self, rows, labels, batch_size, *, buffer_rows=4096, seed=None):
        super().__init__()
        self.rows, self.batch_size = rows, batch_size
        self.labels = None if labels is None else np.asarray(labels)
        self.blocks = math.ceil(rows.shape[0] / batch_size)
        self.per_buffer = max(1, buffer_rows // batch_size)
        self.rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def on_epoch_end(self):
        order = self.rng.permutation(self.blocks)
        short = self.blocks - 1  # the last block may be short: keep it last
        order = np.concatenate([order[order != short], [short]])
        self.buffers = [
            np.sort(order[i : i + self.per_buffer])
            for i in range(0, self.blocks, self.per_buffer)
        ]
        self._loaded = None

    def __len__(self):
        return self.blocks

    def __getitem__(self, i):
        b, j = divmod(i, self.per_buffer)
        if self._loaded != b:
            self._load(b)
        part = slice(j * self.batch_size, (j + 1) * self.batch_size)
        x = self._x[part]
        return x if self._y is None else (x, self._y[part])

    def _load(self, b):
        spans = [
            slice(k * self.batch_size, (k + 1) * self.batch_size)
            for k in self.buffers[b]
        ]
        x = np.concatenate([np.asarray(self.rows[s]) for s in spans])
        mix = self.rng.permutation(len(x))
        self._x = x[mix]
        self._y = None
        if self.labels is not None:
            self._y = np.concatenate([self.labels[s] for s in spans])[mix]
        self._loaded = b


def _open_rows(path):
    try:
        if path.endswith(".h5"):
            import h5py

            return h5py.File(path, "r")["features"]
        import zarr

        rows = zarr.open_array(path, mode="r")
    except Exception as e:  # noqa: BLE001 - h5py and zarr raise many kinds
        raise SurgeryError(
            f"cannot read the feature cache {path} ({first_line(e)}); delete it "
            "and cache again"
        ) from None
    check_zarr_complete(rows, path)
    return rows


def _check_fits(path, rows, model, samples):
    """Refuse a cache made by another model or from other data."""
    want = tuple(model.outputs[0].shape[1:])
    got = tuple(rows.shape[1:])
    if not shape_fits(want, got):
        raise SurgeryError(
            f"{path} holds features of shape {got} but the model outputs {want}; "
            "delete it or cache to another path"
        )
    if samples is not None and rows.shape[0] != samples:
        raise SurgeryError(
            f"{path} holds {rows.shape[0]} rows but the data has {samples} "
            "samples; delete it or cache to another path"
        )
