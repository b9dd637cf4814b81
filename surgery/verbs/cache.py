"""`cache_features`: a model's outputs over a data set, streamed to disk.

Rows are appended batch by batch to `<path>.partial` (zarr, or HDF5 for a
`.h5` path) and the file is renamed to `path` only when complete, so a file
at `path` is always whole. An interrupted run resumes from the rows it
committed (the data must come in the same order); see `surgery.files.rowstore`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import keras
import numpy as np

from surgery.data.batches import Batches, batch_length, progress, shape_fits
from surgery.data.inputs import check_not_empty
from surgery.data.sources import ArrayRows
from surgery.errors import SurgeryError, first_line
from surgery.files.rowstore import CacheLock, RowWriter
from surgery.validate import check_zarr_complete


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
    """Write `model`'s outputs over `data` to `path` (.zarr or .h5); return it.

    An existing complete cache is returned as it is, once checked to fit the
    model's output shape and, when the data says, its number of samples. An
    interrupted run resumes from the rows it committed; `restart=True`
    discards them instead (e.g. after the partial file was damaged). A
    second run on the same path while one is writing gets an error naming
    the writer.
    """
    if len(model.outputs) != 1:
        raise SurgeryError("cache_features needs a model with one output")
    batches = Batches(
        data, batch_size=batch_size, steps=steps, max_samples=max_samples, model=model
    )
    with CacheLock(path):
        if os.path.exists(path):
            _remove_stale_record(path)
            _check_fits(path, _open_rows(path), model, batches.num_samples)
            return path
        writer = RowWriter(path, restart=restart)
        try:
            return _write(model, batches, writer, verbose)
        finally:
            writer.close()


def _write(model, batches, writer, verbose) -> str:
    done = writer.rows
    if done:
        _check_fits(writer.partial, writer.array, model, None)
    seen = 0
    for x in progress(batches, verbose):
        n = batch_length(x)
        skip = min(max(done - seen, 0), n)
        seen += n
        if skip == n:
            continue
        writer.append(np.asarray(model.predict_on_batch(x))[skip:])
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
    """A cached feature file as data, read in chunks; with `labels`, for `fit`.

    With `labels` (one per row, e.g. `surgery.data.sources.folder_labels`) the
    batches are `(features, labels)`. `shuffle=True` draws a new order every
    epoch in bounded memory: a cache of a class-sorted image folder read front
    to back gives one-class batches, which is bad for SGD and worse for BN.
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
