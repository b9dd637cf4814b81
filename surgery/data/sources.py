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
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import PIL.Image
from keras import tree

from surgery.data.prefetch import Prefetcher, available_cores
from surgery.errors import SurgeryError, first_line
from surgery.validate import check_zarr_complete

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff")
_KEYED = re.compile(r"^(?P<file>.+\.(?:h5|hdf5|npz|zarr)):(?P<key>[^\\/:].*|/.*)$")
_ON_DISK_MODULES = ("h5py", "zarr", "bcolz")


def is_source(data: Any) -> bool:
    """Whether `data` is something this module opens (not Keras itself)."""
    if isinstance(data, str | os.PathLike):
        return True
    leaves = tree.flatten(data) if isinstance(data, list | tuple | dict) else [data]
    return bool(leaves) and all(_is_on_disk_array(leaf) for leaf in leaves)


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
            input. Defaults to `None`: RGB, at `image_size`.
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
            thread); the order stays the same. Defaults to `None`: every core
            available.

    Returns:
        A `keras.utils.PyDataset` of input batches, in order, whose
        `num_samples` is the number of samples it gives.

    Raises:
        SurgeryError: `batch_size` or `workers` is below 1, or `shard` is not
            `0 <= i < n`; the path does not exist, is not a regular file or
            folder, or is none of the kinds above; a file is corrupt,
            truncated, fails its CRC check, holds Python objects, or holds
            several arrays and no `:name` picks one (or the name is not
            there); a zarr array misses chunks; a bcolz folder is given
            without the `bcolz` extra; arrays for several inputs have other
            numbers of rows; an image folder holds no images, its image size
            is unknown, the model's input is not 4-D or has other than 1, 3
            or 4 channels, or `preprocess` names no `keras.applications`
            module. An unreadable image raises when its batch is read.

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
    shard = _check_shard(shard)
    if batch_size < 1:
        raise SurgeryError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(source, str | os.PathLike):
        return ArrayRows(source, batch_size, shard)
    path, key = _split_key(os.fspath(source))
    if not os.path.exists(path):
        raise SurgeryError(f"data {path} does not exist")
    if not (os.path.isdir(path) or stat.S_ISREG(os.stat(path).st_mode)):
        raise SurgeryError(
            f"data {path} is not a regular file or folder (a FIFO or device "
            "would block); write the data to a file"
        )
    if path.endswith(".npy"):
        return ArrayRows(_npy_memmap(path), batch_size, shard)
    if path.endswith(".npz"):
        return _npz_rows(path, key, batch_size, shard)
    if path.endswith((".h5", ".hdf5")):
        return ArrayRows(_h5_dataset(path, key), batch_size, shard)
    if _is_zarr(path):
        return ArrayRows(_zarr_array(path, key), batch_size, shard)
    if os.path.isdir(os.path.join(path, "meta")) and os.path.isdir(
        os.path.join(path, "data")
    ):
        return ArrayRows(_bcolz_array(path), batch_size, shard)
    if os.path.isdir(path):
        size, channels = _image_shape(model, image_size)
        return ImageFolder(
            path,
            size,
            channels,
            _preprocess_fn(preprocess),
            batch_size,
            shard,
            workers=workers,
        )
    raise SurgeryError(
        f"data {path}: not an image folder, .npy, .npz, .h5, zarr or bcolz "
        "store; convert it to one of these"
    )


class ArrayRows(keras.utils.PyDataset):
    """Batches sliced from array-likes that Keras cannot read itself.

    With `labels` (one per row), batches are `(x, labels)` pairs for `fit`.
    """

    def __init__(self, arrays, batch_size: int, shard=None, labels=None):
        super().__init__()
        self.arrays, self.batch_size, self.labels = arrays, batch_size, labels
        lengths = {int(a.shape[0]) for a in tree.flatten(arrays)}
        if len(lengths) != 1:
            raise SurgeryError(
                f"data arrays have different numbers of rows {sorted(lengths)}; "
                "give every model input the same number of samples"
            )
        self.start, self.stop = _shard_range(lengths.pop(), shard)

    @property
    def num_samples(self) -> int:
        return self.stop - self.start

    def __len__(self):
        return math.ceil(self.num_samples / self.batch_size)

    def __getitem__(self, i):
        lo = self.start + i * self.batch_size
        hi = min(lo + self.batch_size, self.stop)
        x = tree.map_structure(lambda a: np.asarray(a[lo:hi]), self.arrays)
        if self.labels is not None:
            return x, np.asarray(self.labels[lo:hi])
        return (x,) if isinstance(x, list | tuple) else x


class ImageFolder(keras.utils.PyDataset):
    """Images under a folder (recursively, sorted), resized and stacked.

    Sorted sub-folders then sorted file names: the order
    `image_dataset_from_directory` and `flow_from_directory` use, so cached
    features line up with their labels. `workers` threads decode the images
    of the next batches while the model runs on this one (see
    `surgery.data.prefetch`); the order stays the same.
    """

    def __init__(
        self, folder, size, channels, preprocess, batch_size, shard=None, workers=None
    ):
        super().__init__()
        workers = available_cores() if workers is None else workers
        if workers < 1:
            raise SurgeryError(f"workers must be >= 1, got {workers}")
        self.files = list_images(folder)
        if not self.files:
            raise SurgeryError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}; "
                "point --data at the folder that holds them"
            )
        start, stop = _shard_range(len(self.files), shard)
        self.files = self.files[start:stop]
        self.size, self.preprocess, self.batch_size = size, preprocess, batch_size
        self.color_mode = {1: "grayscale", 3: "rgb", 4: "rgba"}[channels]
        self.decoder = Prefetcher(self._load, self._batch_files, len(self), workers)

    @property
    def num_samples(self) -> int:
        return len(self.files)

    def __len__(self):
        return math.ceil(len(self.files) / self.batch_size)

    def __getitem__(self, i):
        batch = np.stack(self.decoder.get(i))
        return batch if self.preprocess is None else self.preprocess(batch)

    def on_epoch_end(self):
        self.decoder.close()

    def _batch_files(self, i):
        return self.files[i * self.batch_size : (i + 1) * self.batch_size]

    def _load(self, path):
        try:
            image = keras.utils.load_img(
                path,
                color_mode=self.color_mode,
                target_size=self.size,
                interpolation="bilinear",
            )
        except (OSError, PIL.Image.DecompressionBombError) as e:
            raise SurgeryError(f"cannot read image {path}: {_image_error(e)}") from None
        return keras.utils.img_to_array(image, dtype="float32")


def list_images(folder: str) -> list[str]:
    """Image files under `folder`, sub-folders in sorted order, then names.

    Symbolic links are followed, but each folder and each file is visited
    once (a link to `.` or a loop adds nothing), and only regular files are
    listed: a FIFO or device named `x.png` would block or never end.
    """
    found, seen_dirs, seen_files = [], set(), set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        here = _file_id(root)
        if here is None or here in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(here)
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(root, name)
            ident = _file_id(path, regular=True)
            if ident is not None and ident not in seen_files:
                seen_files.add(ident)
                found.append(path)
    return found


def _file_id(path, regular=False):
    """(device, inode) of what `path` points to; None if absent or irregular."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # a dangling link
    if regular and not stat.S_ISREG(st.st_mode):
        return None
    return st.st_dev, st.st_ino


def _image_error(e: Exception) -> str:
    if isinstance(e, PIL.Image.DecompressionBombError):
        return "it has too many pixels (a decompression bomb?); resize it first"
    if isinstance(e, PIL.UnidentifiedImageError):
        return "not a readable image (corrupt, or not an image); remove it"
    return first_line(e)


def folder_labels(folder: str) -> tuple[np.ndarray, list[str]]:
    """Class index of each image of an image folder, and the class names.

    The images are listed in the order `open_source` reads them (sorted
    sub-folders, then sorted names), so the labels line up with the batches
    and with features cached from the folder (`cache_features`), ready for
    `open_features(path, labels=...)`. A class is a top-level sub-folder, and
    its index is its position in sorted order, as
    `image_dataset_from_directory` and `flow_from_directory` number classes.

    Args:
        folder: An image folder laid out as `<folder>/<class>/.../<image>`.

    Returns:
        A `(labels, names)` pair: an int64 array of one class index per image,
        and the class names in index order.

    Raises:
        SurgeryError: an image lies directly in `folder`, outside any class
            sub-folder.

    Example:

    ```python
    from surgery import default
    from surgery.sources import folder_labels

    labels, names = folder_labels(default.images_dir())
    print(labels.shape, labels[:3], names[:3])  # (200,) [0 0 0] ['0', '1', '2']
    ```
    """
    files = list_images(folder)
    classes = [os.path.relpath(f, folder).split(os.sep)[0] for f in files]
    if any(
        c == os.path.relpath(f, folder) for c, f in zip(classes, files, strict=True)
    ):
        raise SurgeryError(
            f"{folder} has images outside class sub-folders; put each image in "
            "<folder>/<class>/ to get labels"
        )
    names = sorted(set(classes))
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[c] for c in classes], dtype="int64"), names


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/n"` (0-based i) as a checked `(i, n)` pair."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if match is None:
        raise SurgeryError(f"--shard {text!r}: write it as i/N, e.g. 0/4")
    return _check_shard((int(match[1]), int(match[2])))


def _check_shard(shard):
    if shard is None:
        return None
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise SurgeryError(f"shard {i}/{n}: need 0 <= i < N (shards count from 0)")
    return i, n


def _shard_range(rows: int, shard) -> tuple[int, int]:
    if shard is None:
        return 0, rows
    i, n = shard
    return i * rows // n, (i + 1) * rows // n


def _split_key(text: str) -> tuple[str, str | None]:
    match = _KEYED.match(text)
    if match is None or os.path.exists(text):
        return text, None
    return match["file"], match["key"]


def _is_on_disk_array(x) -> bool:
    module = type(x).__module__.split(".")[0]
    return module in _ON_DISK_MODULES and hasattr(x, "shape")


def _is_zarr(path: str) -> bool:
    return path.endswith(".zarr") or any(
        os.path.exists(os.path.join(path, marker))
        for marker in ("zarr.json", ".zarray", ".zgroup")
    )


def _h5_dataset(path, key):
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SurgeryError(f"cannot open {path} as HDF5: {e}") from None
    names = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    if key is None:
        if len(names) != 1:
            raise SurgeryError(
                f"{path} holds {len(names)} datasets; name one as "
                f"{path}:/<dataset> (found: {', '.join(names[:5]) or 'none'})"
            )
        key = names[0]
    if not isinstance(f.get(key), h5py.Dataset):
        raise SurgeryError(
            f"{path} has no dataset '{key}' (found: {', '.join(names[:5]) or 'none'})"
        )
    return f[key]


def _zarr_array(path, key):
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except Exception as e:  # zarr raises several unrelated types for bad stores
        raise SurgeryError(f"cannot open {path} as zarr: {e}") from None
    if key is not None:
        if not isinstance(node, zarr.Group) or key.strip("/") not in node:
            raise SurgeryError(f"{path} has no array '{key}'")
        node = node[key.strip("/")]
    if isinstance(node, zarr.Group):
        names = sorted(node.array_keys())
        if len(names) != 1:
            raise SurgeryError(
                f"{path} is a zarr group with arrays {names}; name one as {path}:<name>"
            )
        node = node[names[0]]
    check_zarr_complete(node, path)
    return node


def _bcolz_array(path):
    try:
        import bcolz
    except ImportError:
        raise SurgeryError(
            f"{path} is a bcolz carray; reading it needs the bcolz extra: "
            "pip install 'surgery[bcolz]' (the bcolz-zipline fork)"
        ) from None
    return bcolz.open(rootdir=path, mode="r")


def _npy_memmap(path):
    """A .npy file memory-mapped, or a one-line error saying what is wrong."""
    with open(path, "rb") as f:
        try:
            _read_npy_header(f)
        except SurgeryError as e:
            raise SurgeryError(f"{path}: {e}") from None
        except Exception:  # noqa: BLE001 - numpy raises several kinds
            raise SurgeryError(
                f"{path} is not a .npy file (its header is not numpy's); save "
                "the array with numpy.save"
            ) from None
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise SurgeryError(
            f"cannot read {path}: {first_line(e)} (truncated?); save it again"
        ) from None


def _npz_rows(path, key, batch_size, shard):
    try:
        with zipfile.ZipFile(path) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            if key is None:
                if len(names) != 1:
                    raise SurgeryError(
                        f"{path} holds arrays {names}; name one as {path}:<name>"
                    )
                key = names[0]
            if key not in names:
                raise SurgeryError(f"{path} has no array '{key}' (found: {names})")
            info = z.getinfo(key + ".npy")
    except zipfile.BadZipFile as e:
        raise SurgeryError(
            f"{path} is not a readable .npz ({first_line(e)}); save it with numpy.savez"
        ) from None
    if info.compress_type == zipfile.ZIP_STORED:
        return ArrayRows(_npz_memmap(path, info), batch_size, shard)
    return _ZipStreamRows(path, info.filename, batch_size, shard)


def _npz_memmap(path, info):
    """A stored (uncompressed) .npz member, memory-mapped in place."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        shape, fortran, dtype = _read_npy_header(f)
        offset = f.tell()
    order = "F" if fortran else "C"
    size = dtype.itemsize * math.prod(shape)
    if offset + size > os.path.getsize(path):
        raise SurgeryError(f"{path}: the member {info.filename} is truncated")
    _check_crc(path, info)
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order
    )


def _check_crc(path, info):
    """The stored member's CRC-32, checked in one sequential read.

    A memory map bypasses zipfile, which would otherwise check it: flipped
    bytes in the data would be read as numbers.
    """
    crc = 0
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        left = info.compress_size
        while left > 0:
            block = f.read(min(left, 2**24))
            if not block:
                break
            crc = zlib.crc32(block, crc)
            left -= len(block)
    if left > 0 or crc != info.CRC:
        raise SurgeryError(
            f"{path}: the member {info.filename} fails its CRC check (the file is "
            "damaged); restore or rewrite it"
        )


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        raise SurgeryError("the array holds Python objects; save it as numbers")
    return shape, fortran, dtype


class _ZipStreamRows(keras.utils.PyDataset):
    """A compressed .npz member, decompressed row block by row block.

    A compressed stream has no random access; batches are read in order
    (which is how every pass here reads them) and a request for an earlier
    batch reopens the stream.
    """

    def __init__(self, path, member, batch_size, shard):
        super().__init__()
        self.path, self.member, self.batch_size = path, member, batch_size
        self._stream, self._next = None, 0
        self._open()
        if self.fortran and len(self.shape) > 1:
            raise SurgeryError(
                f"{path}:{member[:-4]} is a compressed Fortran-order array; "
                "save it with np.savez (uncompressed) or as .npy"
            )
        self.start, self.stop = _shard_range(self.shape[0], shard)
        self.row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])

    @property
    def num_samples(self) -> int:
        return self.stop - self.start

    def __len__(self):
        return math.ceil(self.num_samples / self.batch_size)

    def __getitem__(self, i):
        if i < self._next:
            self._open()
        lo = self.start + i * self.batch_size
        hi = min(lo + self.batch_size, self.stop)
        self._skip_to(lo)
        data = self._stream.read((hi - lo) * self.row_bytes)
        self._row, self._next = hi, i + 1
        rows = np.frombuffer(data, dtype=self.dtype)
        return rows.reshape((hi - lo, *self.shape[1:]))

    def _open(self):
        if self._stream is not None:
            self._stream.close()
        self._zip = zipfile.ZipFile(self.path)
        self._stream = self._zip.open(self.member)
        self.shape, self.fortran, self.dtype = _read_npy_header(self._stream)
        self._row, self._next = 0, 0

    def _skip_to(self, row):
        while self._row < row:
            step = min(row - self._row, max(1, 2**24 // max(1, self.row_bytes)))
            self._stream.read(step * self.row_bytes)
            self._row += step


def _image_shape(model, image_size):
    shape = None if model is None else model.inputs[0].shape
    if shape is not None and len(shape) != 4:
        raise SurgeryError(
            f"an image folder feeds 4-D image inputs, but the model takes {shape}"
        )
    size = image_size or (None if shape is None else tuple(shape[1:3]))
    if size is None or None in size:
        raise SurgeryError(
            "cannot tell the image size: the model does not fix it; pass "
            "image_size=(height, width) (CLI: --image-size HxW)"
        )
    channels = 3 if shape is None or shape[-1] is None else int(shape[-1])
    if channels not in (1, 3, 4):
        raise SurgeryError(
            f"the model's input has {channels} channels; image folders give "
            "1 (grayscale), 3 (RGB) or 4 (RGBA)"
        )
    return tuple(int(s) for s in size), channels


def _preprocess_fn(preprocess):
    if preprocess is None or callable(preprocess):
        return preprocess
    if preprocess == "none":
        return None
    module = getattr(keras.applications, preprocess, None)
    fn = getattr(module, "preprocess_input", None)
    if fn is None:
        raise SurgeryError(
            f"unknown preprocess {preprocess!r}: name a keras.applications "
            "module (vgg16, resnet50, mobilenet_v2, ...) or 'none'"
        )
    return fn
