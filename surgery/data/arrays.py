"""On-disk arrays as batches: .npy/.npz, HDF5, zarr and bcolz, never loaded whole.

`.npy` files and stored `.npz` members are memory-mapped (a member's CRC is
checked first), compressed members are streamed, and h5py datasets, zarr
arrays and bcolz carrays are sliced one batch at a time.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib

import keras
import numpy as np
from keras import tree

from surgery.data.shards import shard_range
from surgery.errors import SurgeryError, first_line, quoted
from surgery.validate import check_data_array, check_zarr_complete

_ON_DISK_MODULES = ("h5py", "zarr", "bcolz")


def open_array_file(path: str, key: str | None, batch_size: int, shard=None):
    """The rows of the array file at `path` (`key`: the member or dataset),
    or None when `path` is no array file this module reads."""
    name = f"data {quoted(path)}"
    if path.endswith(".npy"):
        return ArrayRows(_npy_memmap(path), batch_size, shard, name=name)
    if path.endswith(".npz"):
        return _npz_rows(path, key, batch_size, shard)
    if path.endswith((".h5", ".hdf5")):
        return ArrayRows(_h5_dataset(path, key), batch_size, shard, name=name)
    if _is_zarr(path):
        return ArrayRows(_zarr_array(path, key), batch_size, shard, name=name)
    if os.path.isdir(os.path.join(path, "meta")) and os.path.isdir(
        os.path.join(path, "data")
    ):
        return ArrayRows(_bcolz_array(path), batch_size, shard, name=name)
    return None


class ArrayRows(keras.utils.PyDataset):
    """Batches sliced from array-likes that Keras cannot read itself.

    With `labels` (one per row), batches are `(x, labels)` pairs for `fit`.
    `name` says what the arrays are in error messages.
    """

    def __init__(self, arrays, batch_size: int, shard=None, labels=None, name="data"):
        super().__init__()
        self.arrays, self.batch_size, self.labels = arrays, batch_size, labels
        for array in tree.flatten(arrays):
            check_data_array(
                getattr(array, "dtype", None), getattr(array, "shape", None), name
            )
        lengths = {int(a.shape[0]) for a in tree.flatten(arrays)}
        if len(lengths) != 1:
            raise SurgeryError(
                f"data arrays have different numbers of rows {sorted(lengths)}; "
                "give every model input the same number of samples"
            )
        self.start, self.stop = shard_range(lengths.pop(), shard)

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


def is_on_disk_array(x) -> bool:
    """Whether `x` is an open h5py dataset, zarr array or bcolz carray."""
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
        raise SurgeryError(
            f"cannot open {quoted(path)} as HDF5: {first_line(e)}"
        ) from None
    names = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    if key is None:
        if len(names) != 1:
            raise SurgeryError(
                f"{quoted(path)} holds {len(names)} datasets; name one as "
                f"{quoted(path + ':/<dataset>')} (found: "
                f"{', '.join(names[:5]) or 'none'})"
            )
        key = names[0]
    if not isinstance(f.get(key), h5py.Dataset):
        raise SurgeryError(
            f"{quoted(path)} has no dataset {key!r} (found: "
            f"{', '.join(names[:5]) or 'none'})"
        )
    return f[key]


def _zarr_array(path, key):
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except Exception as e:  # zarr raises several unrelated types for bad stores
        raise SurgeryError(
            f"cannot open {quoted(path)} as zarr: {first_line(e)}"
        ) from None
    if key is not None:
        if not isinstance(node, zarr.Group) or key.strip("/") not in node:
            raise SurgeryError(f"{quoted(path)} has no array {key!r}")
        node = node[key.strip("/")]
    if isinstance(node, zarr.Group):
        names = sorted(node.array_keys())
        if len(names) != 1:
            raise SurgeryError(
                f"{quoted(path)} is a zarr group with arrays {names}; name one as "
                f"{quoted(path + ':<name>')}"
            )
        node = node[names[0]]
    check_zarr_complete(node, path)
    return node


def _bcolz_array(path):
    try:
        import bcolz
    except ImportError:
        raise SurgeryError(
            f"{quoted(path)} is a bcolz carray; reading it needs the bcolz extra: "
            "pip install 'surgery[bcolz]' (the bcolz-zipline fork)"
        ) from None
    return bcolz.open(rootdir=path, mode="r")


def _npy_memmap(path):
    """A .npy file memory-mapped, or a one-line error saying what is wrong."""
    with open(path, "rb") as f:
        try:
            _read_npy_header(f)
        except SurgeryError as e:
            raise SurgeryError(f"{quoted(path)}: {first_line(e)}") from None
        except Exception:  # noqa: BLE001 - numpy raises several kinds
            raise SurgeryError(
                f"{quoted(path)} is not a .npy file (its header is not numpy's); save "
                "the array with numpy.save"
            ) from None
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise SurgeryError(
            f"cannot read {quoted(path)}: {first_line(e)} (truncated?); save it again"
        ) from None


def _npz_rows(path, key, batch_size, shard):
    try:
        with zipfile.ZipFile(path) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            if key is None:
                if len(names) != 1:
                    raise SurgeryError(
                        f"{quoted(path)} holds arrays {names}; name one as "
                        f"{quoted(path + ':<name>')}"
                    )
                key = names[0]
            if key not in names:
                raise SurgeryError(
                    f"{quoted(path)} has no array {key!r} (found: {names})"
                )
            info = z.getinfo(key + ".npy")
    except zipfile.BadZipFile as e:
        raise SurgeryError(
            f"{quoted(path)} is not a readable .npz ({first_line(e)}); save it "
            "with numpy.savez"
        ) from None
    if info.compress_type == zipfile.ZIP_STORED:
        return ArrayRows(
            _npz_memmap(path, info), batch_size, shard, name=f"data {quoted(path)}"
        )
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
        raise SurgeryError(
            f"{quoted(path)}: the member {info.filename!r} is truncated; save it again"
        )
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
            f"{quoted(path)}: the member {info.filename!r} fails its CRC check "
            "(the file is damaged); restore or rewrite it"
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
        check_data_array(self.dtype, self.shape, f"data {quoted(path)}")
        if self.fortran and len(self.shape) > 1:
            raise SurgeryError(
                f"{quoted(path + ':' + member[:-4])} is a compressed Fortran-order "
                "array; save it with np.savez (uncompressed) or as .npy"
            )
        self.start, self.stop = shard_range(self.shape[0], shard)
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
