"""Rows appended to an on-disk array so that a killed run never leaves wrong rows.

`RowWriter` is what `cache_features` writes through. The data goes to
`<path>.partial` (zarr, or HDF5 for a `.h5` path). After each append the
data is flushed and fsynced, and only then is the number of rows recorded in
`<path>.partial.json` (itself written to a temporary file, fsynced and
renamed). A resumed run trusts that record, never the array's own shape:
zarr writes the new shape before the chunk data, so after a kill the shape
can count rows that were never written (they read as zeros). Rows beyond the
record are cut off and written again. The record also holds the
fingerprint the writer gives with each append (what made the rows, see
`surgery.verbs.cache_check`), so it is committed together with the rows it
describes; `finish` copies it into the complete file's `surgery` attribute.

One writer per path: `<path>.lock` is held with `fcntl.flock` while writing,
and a second writer gets a one-line error naming the holder. A lock of a
killed process is released by the kernel.

Files: `<path>` appears only when complete (renamed from the partial file);
`<path>.lock` exists only while a writer holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import socket
import stat
import time

import numpy as np

from surgery.errors import SurgeryError, first_line
from surgery.files.atomic import check_name, write_error

_ZARR_TEMP = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr's own atomic writes


class CacheLock:
    """An exclusive lock on `<path>.lock`, held by one process at a time.

    The lock file is opened without following a link (`O_NOFOLLOW`) and
    without truncating it; a lock path that is a link, not a regular file,
    a hard link to another file or a file holding anything but a holder line
    of ours is refused, so a file of the user's is never written into.
    """

    def __init__(self, path: str):
        self.path = path + ".lock"
        self.fd = None

    def __enter__(self) -> CacheLock:
        check_name(self.path[:-5], ".partial.json")  # the longest name it gets
        while self.fd is None:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                if not _HOLDER.match(holder):
                    holder = ""
                raise SurgeryError(
                    f"{self.path[:-5]} is being written by another run "
                    f"({holder or 'unknown process'}); wait for it to finish or "
                    "cache to another path"
                ) from None
            if _same_inode(fd, self.path):
                self._check_ours(fd)
                self.fd = fd
            else:  # the previous holder removed the file we opened: retry
                os.close(fd)
        os.ftruncate(self.fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(
            self.fd,
            f"pid {os.getpid()} on {socket.gethostname()} since {started}".encode(),
        )
        return self

    def _open(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            mode = os.lstat(self.path).st_mode  # refused before it is opened
            if not stat.S_ISREG(mode):
                raise self._foreign(_LINK if stat.S_ISLNK(mode) else _NOT_REG)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR):  # a link, or a folder
                why = _LINK if e.errno == errno.ELOOP else _NOT_REG
                raise self._foreign(why) from None
            raise write_error(self.path, e, "create the lock") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a fifo, a device, ...
            os.close(fd)
            raise self._foreign(_NOT_REG)
        return fd

    def _check_ours(self, fd: int) -> None:
        """Refuse a file that holds anything but a holder line of ours."""
        st = os.fstat(fd)
        text = os.pread(fd, 400, 0).decode(errors="replace")
        if (
            st.st_nlink != 1
            or st.st_size > 400
            or (text and not _HOLDER.fullmatch(text))
        ):
            os.close(fd)
            raise self._foreign("is a hard link or holds data that is not a lock's")

    def _foreign(self, why: str) -> SurgeryError:
        return SurgeryError(
            f"the lock {self.path} {why}; it is not a lock of surgery and was "
            "left as it is: move it away, or cache to another path"
        )

    def __exit__(self, *exc) -> None:
        try:
            os.unlink(self.path)  # while still held, so no one locks a ghost
        finally:
            os.close(self.fd)
            self.fd = None


_HOLDER = re.compile(r"pid \d+ on .{0,300} since [0-9: -]{19}")
_LINK, _NOT_REG = "is a symbolic link (never followed)", "is not a regular file"


def _same_inode(fd, path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.lstat(path).st_ino
    except FileNotFoundError:
        return False


class RowWriter:
    """Appends rows to `<path>.partial` with a durable committed-rows record.

    Use inside `CacheLock(path)`. `rows` is the number of committed rows the
    partial file resumed from, and `fingerprint` what the run that committed
    them recorded of its model and data (None if it recorded nothing: a file
    from before fingerprints). `restart=True` discards a partial file.
    """

    def __init__(self, path: str, *, restart: bool = False):
        self.path = path
        self.partial = path + ".partial"
        self.record = self.partial + ".json"
        self.h5 = path.endswith(".h5")
        self.array = None
        self._file = None
        self.fingerprint = None
        for stale in glob.glob(glob.escape(self.record) + ".*.tmp"):
            _remove(stale)  # a record a killed run did not finish writing
        if restart:
            self.discard()
        committed = _read_record(self.record)
        if committed is None or not os.path.exists(self.partial):
            self.discard()  # nothing was committed: nothing to keep
            self.rows = 0
            return
        self._resume(committed)

    def _resume(self, committed: dict) -> None:
        try:
            self._open()
            rows = self.array.shape[0]
            shape, dtype = list(self.array.shape[1:]), str(self.array.dtype)
        except Exception as e:  # noqa: BLE001 - h5py and zarr raise many kinds
            self.close()
            raise self._damaged(f"it cannot be read ({first_line(e)})") from None
        if (shape, dtype) != (committed["shape"], committed["dtype"]):
            self.close()
            raise self._damaged(
                f"it holds {dtype} rows of shape {shape}, the record says "
                f"{committed['dtype']} {committed['shape']}"
            )
        if rows < committed["rows"]:
            self.close()
            raise self._damaged(
                f"it holds {rows} rows but {committed['rows']} were committed"
            )
        if rows > committed["rows"]:  # an append the kill cut short
            self._resize(committed["rows"])
        if not self.h5:
            _remove_zarr_temps(self.partial)
        self.rows = committed["rows"]
        self.fingerprint = committed.get("fingerprint")

    def _damaged(self, why: str) -> SurgeryError:
        return SurgeryError(
            f"the partial cache {self.partial} is damaged: {why}; pass "
            f"restart=True to cache_features or delete {self.partial} and run again"
        )

    def append(self, rows: np.ndarray, fingerprint: dict | None = None) -> None:
        """Write `rows` durably, then record them as committed.

        `fingerprint` (JSON data describing every row up to these) goes into
        the same record as the row count, so the two are committed together.
        """
        if len(rows) == 0:
            return
        if self.array is None:
            self._create(rows)
        if list(rows.shape[1:]) != list(self.array.shape[1:]):
            raise SurgeryError(
                f"rows of shape {rows.shape[1:]} do not fit the cache's "
                f"{tuple(self.array.shape[1:])}"
            )
        start = self.rows
        if self.h5:
            self.array.resize(start + len(rows), axis=0)
            self.array[start:] = rows
            self._file.flush()
            os.fsync(self._file.id.get_vfd_handle())
        else:
            self.array.append(rows, axis=0)
            self._sync_zarr(start, start + len(rows))
        self.rows = start + len(rows)
        self.fingerprint = fingerprint
        _write_record(self.record, self._record())

    def finish(self) -> str:
        """Move the complete partial file to `path` and drop the record.

        The last fingerprint goes into the file's attributes (`surgery`)
        first, so a complete file says what made it.
        """
        if self.fingerprint is not None:
            self._write_attrs({"surgery": self.fingerprint})
        self.close()
        os.replace(self.partial, self.path)
        _fsync_dir(self.path)
        _remove(self.record)
        return self.path

    def discard(self) -> None:
        self.close()
        if os.path.isdir(self.partial):
            shutil.rmtree(self.partial)
        else:
            _remove(self.partial)
        _remove(self.record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self.array = None, None

    def _record(self) -> dict:
        record = {
            "rows": self.rows,
            "shape": list(self.array.shape[1:]),
            "dtype": str(self.array.dtype),
        }
        if self.fingerprint is not None:
            record["fingerprint"] = self.fingerprint
        return record

    def _write_attrs(self, attrs: dict) -> None:
        if self.array is None:
            self._open()
        if self.h5:
            for key, value in attrs.items():
                self.array.attrs[key] = json.dumps(value)
            self._file.flush()
            os.fsync(self._file.id.get_vfd_handle())
        else:
            self.array.attrs.update(attrs)
            _fsync(os.path.join(self.partial, "zarr.json"))

    def _open(self) -> None:
        if self.h5:
            import h5py

            self._file = h5py.File(self.partial, "r+")
            self.array = self._file["features"]
        else:
            import zarr

            self.array = zarr.open_array(self.partial, mode="r+")

    def _create(self, rows: np.ndarray) -> None:
        chunks = (_chunk_rows(rows[0]), *rows.shape[1:])
        if self.h5:
            import h5py

            self._file = h5py.File(self.partial, "w")
            self.array = self._file.create_dataset(
                "features",
                shape=(0, *rows.shape[1:]),
                maxshape=(None, *rows.shape[1:]),
                dtype=rows.dtype,
                chunks=chunks,
            )
        else:
            import zarr

            self.array = zarr.create_array(
                store=self.partial,
                shape=(0, *rows.shape[1:]),
                dtype=rows.dtype,
                chunks=chunks,
                config={"write_empty_chunks": True},
            )

    def _resize(self, rows: int) -> None:
        if self.h5:
            self.array.resize(rows, axis=0)
            self._file.flush()
        else:
            self.array.resize((rows, *self.array.shape[1:]))

    def _sync_zarr(self, start: int, stop: int) -> None:
        """fsync the chunk files rows [start, stop) went to, and the metadata."""
        per_chunk = self.array.chunks[0]
        tail = ["0"] * (self.array.ndim - 1)
        for i in range(start // per_chunk, (stop - 1) // per_chunk + 1):
            chunk = os.path.join(self.partial, "c", str(i), *tail)
            _fsync(chunk)
            _fsync_dir(chunk)  # the chunk's name, not only its bytes
        _fsync(os.path.join(self.partial, "zarr.json"))


def _chunk_rows(row) -> int:
    """Rows per chunk: about 4 MB, whatever the batch size."""
    return max(1, 2**22 // max(1, row.nbytes))


def _read_record(path: str) -> dict | None:
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record.get("rows"), int) or record["rows"] < 0:
            return None
        return record
    except (OSError, ValueError, AttributeError):
        return None  # absent or torn: nothing is committed


def _write_record(path: str, record: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path)


def read_fingerprint(rows) -> dict | None:
    """The fingerprint a complete file's `surgery` attribute holds, or None."""
    try:
        value = rows.attrs.get("surgery")
        if isinstance(value, (str, bytes)):
            value = json.loads(value)
    except (OSError, ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def _remove_zarr_temps(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            if _ZARR_TEMP.search(name):
                _remove(os.path.join(root, name))


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    _fsync(os.path.dirname(os.path.abspath(path)))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
