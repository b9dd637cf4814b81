"""Data on disk as batches: image folders, .npy/.npz, HDF5, zarr and bcolz.

Everything `model.predict` reads is read by Keras itself (see `batches`).
This module adds the sources ML engineers keep their data in, each read one
batch at a time so that no source is ever loaded whole:

- an image folder, flat or with class sub-folders as `flow_from_directory`
  and `image_dataset_from_directory` lay them out, resized to the model's
  input size, optionally through a `preprocess_input`;
- `x.npy` (memory-mapped) and `x.npz[:name]` (stored members memory-mapped,
  compressed ones streamed);
- `file.h5:/path/to/dataset` (HDF5 through h5py);
- a zarr array (`feats.zarr`, or `store.zarr:name` in a group);
- a bcolz carray directory, as fast.ai's `save_array` wrote them (needs the
  `bcolz` extra, the maintained `bcolz-zipline` fork);
- open h5py datasets, zarr arrays and bcolz carrays.

`shard=(i, n)` reads the i-th of n contiguous slices, so a large data set can
be split over jobs whose statistics are merged afterwards.

This module decides which kind a path is and opens it; the kinds live in
`surgery.data.images`, `surgery.data.arrays` and `surgery.data.shards`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import tree

from surgery.data.arrays import ArrayRows, is_on_disk_array, open_array_file
from surgery.data.images import (
    IMAGE_SUFFIXES,
    ImageFolder,
    folder_labels,
    list_images,
    open_image_folder,
)
from surgery.data.shards import check_shard, parse_shard
from surgery.errors import SurgeryError, quoted
from surgery.validate import check_batch_size, check_not_special

__all__ = [
    "IMAGE_SUFFIXES",
    "ArrayRows",
    "ImageFolder",
    "folder_labels",
    "is_source",
    "list_images",
    "open_source",
    "parse_shard",
    "split_key",
]

_KEYED = re.compile(r"^(?P<file>.+\.(?:h5|hdf5|npz|zarr)):(?P<key>[^\\/:].*|/.*)$")


def is_source(data: Any) -> bool:
    """Whether `data` is something this module opens (not Keras itself)."""
    if isinstance(data, str | os.PathLike):
        return True
    leaves = tree.flatten(data) if isinstance(data, list | tuple | dict) else [data]
    return bool(leaves) and all(is_on_disk_array(leaf) for leaf in leaves)


def open_source(
    source: Any,
    *,
    model: keras.Model | None = None,
    image_size: tuple[int, int] | None = None,
    preprocess: Callable | str | None = None,
    batch_size: int = 32,
    shard: tuple[int, int] | None = None,
    workers: int | None = None,
) -> keras.utils.PyDataset | np.ndarray:
    """`source` as data for `activation_stats`, `insert_identity_bn` & co.

    The verbs call it themselves for a path or an on-disk array passed as
    `data`; call it directly to choose the image size, preprocessing, shard or
    decoding threads. Whatever the source, it is read one batch at a time
    (arrays memory-mapped or sliced, images decoded per batch), so no source
    is ever loaded whole.

    Args:
        source: What to read. A path: an image folder (flat, or with class
            sub-folders as `image_dataset_from_directory` lays them out;
            `.png`, `.jpg`, `.jpeg`, `.bmp`, `.gif`, `.ppm`, `.tif`, `.tiff`,
            sorted by sub-folder then name), `x.npy` (memory-mapped),
            `x.npz` or `x.npz:name` (stored members memory-mapped, compressed
            ones streamed), `file.h5` or `file.h5:/path/to/dataset` (HDF5),
            a zarr array or `store.zarr:name` in a group, or a bcolz carray
            folder (needs the `bcolz` extra). A file holding several arrays
            needs the `:name`. Or an open h5py dataset, zarr array or bcolz
            carray, or a list or dict of them, one per model input.
        model: The model the data is for; image folders take their image
            size and channels (1 grayscale, 3 RGB, 4 RGBA) from its first
            input. Defaults to `None`: RGB, at `image_size`. A 16-bit
            grayscale image reads on the 0..255 scale of 8-bit ones (each
            value divided by 257).
        image_size: `(height, width)` to resize images to, for image folders
            when the model does not fix its input size (or no model is
            given); it overrides the model's. Defaults to `None`: the model's
            size.
        preprocess: For image folders, a function applied to each float32
            batch of 0..255 pixels, or the name of a `keras.applications`
            module whose `preprocess_input` to use (`"vgg16"`, `"resnet50"`,
            `"mobilenet_v2"`, ...), or `"none"`. Defaults to `None`: the raw
            0..255 pixels.
        batch_size: Samples per batch, at least 1. Defaults to `32`, as
            `model.predict`.
        shard: `(i, n)` to read only the i-th (from 0) of n contiguous
            slices of the samples, so a large data set can be split over jobs
            whose statistics are merged afterwards (`Moments.merge`).
            Defaults to `None`: every sample.
        workers: Threads that decode an image folder's next batches while
            the model runs on this one, at least 1 (1 decodes on the calling
            thread); the order stays the same. Defaults to `None`: one per
            available core, plus one, so that both cores keep decoding while
            a thread waits for the interpreter lock.

    Returns:
        A `keras.utils.PyDataset` of input batches, in order, whose
        `num_samples` is the number of samples it gives.

    Raises:
        SurgeryError: `batch_size` or `workers` is below 1, or `shard` is not
            `0 <= i < n`; the path does not exist, is a FIFO, device or
            socket (refused without being opened), or is none of the kinds
            above; a file is corrupt, truncated, fails its CRC check, holds
            Python objects, text, dates or complex numbers or a single (0-d)
            value, or holds several arrays and no `:name` picks one (or the
            name is not there); a zarr array misses chunks; a bcolz folder is given
            without the `bcolz` extra; arrays for several inputs have other
            numbers of rows; an image folder holds no images, its image size
            is unknown, the model's input is not 4-D or has other than 1, 3
            or 4 channels, or `preprocess` names no `keras.applications`
            module. An unreadable image, or one with 32-bit pixels, raises
            when its batch is read.

    Example:

    ```python
    import os
    import tempfile

    import numpy as np
    from surgery import default
    from surgery.sources import open_source

    path = os.path.join(tempfile.mkdtemp(), "x.npy")
    np.save(path, np.zeros((100, 8), "float32"))
    rows = open_source(path, batch_size=32, shard=(1, 2))
    print(rows.num_samples, len(rows), rows[0].shape)  # 50 2 (32, 8)

    images = open_source(default.images_dir(), model=default.load(), batch_size=16)
    print(images.num_samples, images[0].shape)  # 200 (16, 32, 32, 3)
    ```
    """
    shard = check_shard(shard)
    check_batch_size(batch_size)
    if not isinstance(source, str | os.PathLike):
        return ArrayRows(source, batch_size, shard)
    path, key = split_key(os.fspath(source))
    if not os.path.exists(path):
        raise SurgeryError(f"data {quoted(path)} does not exist; check the path")
    check_not_special(path, "data")
    rows = open_array_file(path, key, batch_size, shard)
    if rows is not None:
        return rows
    if os.path.isdir(path):
        return open_image_folder(
            path,
            model=model,
            image_size=image_size,
            preprocess=preprocess,
            batch_size=batch_size,
            shard=shard,
            workers=workers,
        )
    raise SurgeryError(
        f"data {quoted(path)}: not an image folder, .npy, .npz, .h5, zarr or "
        "bcolz store; convert it to one of these"
    )


def split_key(text: str) -> tuple[str, str | None]:
    """`file.h5:/dataset`, `x.npz:name` or `store.zarr:name` as (file, key);
    a path that exists as given, or has no key, comes back whole."""
    match = _KEYED.match(text)
    if match is None or os.path.exists(text):
        return text, None
    return match["file"], match["key"]
