"""The one entry point for data: whatever the user passed, opened once.

`open_inputs` is the only place that decides what the data is: arrays (an
`(x, y)` pair of them loses its labels), lists and dicts of arrays per model
input, `tf.data`, `PyDataset`s and generators (read by Keras' own data
adapters), a path or an open on-disk array (opened by `surgery.data.sources`)
or a parquet path (rows for the Ray engine). It gives an `Inputs`: what the
passes read (`surgery.data.batches.Batches`), and what a Ray actor reopens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import tree

from surgery.data.images import ImageFolder
from surgery.data.sources import is_source, open_source
from surgery.errors import SurgeryError
from surgery.validate import check_batch_size, check_data_array, check_not_special


@dataclass(frozen=True)
class Inputs:
    """The user's data, opened: what every pass over it reads.

    Attributes:
        data: what Keras' data adapters read (arrays, a dataset, a
            `PyDataset`, a generator); None for parquet rows.
        path: the file or store `data` was opened from, when opening `path`
            again with `batch_size` alone gives the same batches (not an image
            folder, whose decoding options travel with the opened folder, nor
            a shard). A Ray actor reopens it there instead of receiving `data`.
        batch_size: the samples per batch `data` was opened with, if any.
        parquet: `path` is parquet rows, which only the Ray engine reads.
    """

    data: Any
    path: str | None = None
    batch_size: int | None = None
    parquet: bool = False

    @property
    def one_shot(self) -> bool:
        """Whether the data can be read only once (an iterator, a generator)."""
        return isinstance(self.data, Iterator)


def open_inputs(
    data: Any,
    *,
    model: keras.Model | None = None,
    batch_size: int | None = None,
    image_size: tuple[int, int] | None = None,
    preprocess: Callable | str | None = None,
    shard: tuple[int, int] | None = None,
    workers: int | None = None,
    labels: bool = False,
) -> Inputs:
    """`data` opened once, as every verb, the CLI and the engines read it.

    Args:
        data: anything `model.predict` takes as `x` (labels are dropped), a
            path or open on-disk array (see `surgery.data.sources`), a
            parquet path (Ray only), or an `Inputs` (returned as it is).
        model: the model the data feeds; image folders take its input size.
        batch_size: samples per batch for arrays and files (default 32).
        image_size, preprocess, shard, workers: as `open_source` takes them,
            for paths.
        labels: keep the labels of an `(x, y)` pair of arrays (for a pass
            that measures accuracy); by default they are dropped.

    Raises:
        SurgeryError: no data, or data that cannot be opened.
    """
    if isinstance(data, Inputs):
        if labels and isinstance(data.data, ImageFolder):
            data.data.keep_labels()  # other passes drop them again
        return data
    if data is None:
        raise SurgeryError("no data given: pass data=... (arrays, a dataset, ...)")
    check_batch_size(batch_size)
    if isinstance(data, tuple) and data and is_array_like(data[0]) and not labels:
        data = data[0]  # an (x, y) pair of arrays: labels are not needed
    if isinstance(data, str | os.PathLike) and is_parquet(os.fspath(data)):
        check_not_special(os.fspath(data), "data")
        return Inputs(None, os.fspath(data), batch_size, parquet=True)
    if not is_source(data):
        leaves = tree.flatten(data) if isinstance(data, list | tuple | dict) else [data]
        for leaf in leaves:
            if is_array_like(leaf):
                check_data_array(leaf.dtype, leaf.shape)
        return Inputs(data, None, batch_size)
    size = batch_size or 32
    opened = open_source(
        data,
        model=model,
        image_size=image_size,
        preprocess=preprocess,
        batch_size=size,
        shard=shard,
        workers=workers,
    )
    if labels and isinstance(opened, ImageFolder):
        opened.keep_labels()
    reopenable = (
        isinstance(data, str | os.PathLike)
        and shard is None
        and not isinstance(opened, ImageFolder)
    )
    return Inputs(opened, os.fspath(data) if reopenable else None, size)


def is_parquet(path: str) -> bool:
    """A parquet file, or a folder of them (as Ray Data writes them)."""
    if path.endswith(".parquet"):
        return True
    return os.path.isdir(path) and any(
        name.endswith(".parquet") for name in os.listdir(path)
    )


def is_array_like(x) -> bool:
    """An array Keras slices itself (NumPy, a tensor, a memmap)."""
    return isinstance(x, np.ndarray) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")
    )
