"""Files that appear whole or not at all.

Every output is written inside a work folder beside it, named
`.surgery-tmp-<host>-<pid>-<random>`, and moved into place only when complete.
The name says which process made it, so a folder left by a run that was
killed (SIGKILL, power loss) is recognised and removed by the next write into
the same directory, once that process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator

from surgery.errors import SurgeryError

WORK_PREFIX = ".surgery-tmp-"
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_WORK_NAME = re.compile(rf"^{re.escape(WORK_PREFIX)}(?P<host>.+)-(?P<pid>\d+)-\w+$")


@contextlib.contextmanager
def atomic_path(
    path: str,
    suffix: str = "",
    prefix: str = "",
    *,
    overwrite: bool = True,
    capture_tempfiles: bool = False,
) -> Iterator[str]:
    """A temporary path beside `path`, moved onto it when the block succeeds.

    On any error the temporary file is removed and `path` is left as it was.
    `suffix` is for writers that insist on one (`.keras`, `.weights.h5`).

    With `overwrite=False` the move is an exclusive create (`os.link`): when
    `path` appeared meanwhile, for instance written by a second run, nothing
    is replaced and a SurgeryError says so; of two writers exactly one wins.
    The file gets the permissions the umask gives a new file (not mkstemp's
    0600). `capture_tempfiles=True` sends Python's `tempfile` files made
    inside the block (Keras' saving makes some) to the same work folder, so
    a killed save leaves nothing elsewhere.
    """
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_work(folder)
    work = tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{_HOST}-{os.getpid()}-", dir=folder)
    tmp = os.path.join(work, prefix + os.path.basename(path) + suffix)
    saved_tempdir = tempfile.tempdir
    try:
        if capture_tempfiles:
            tempfile.tempdir = work
        yield tmp
        tempfile.tempdir = saved_tempdir
        if not os.path.exists(tmp):
            raise SurgeryError(f"nothing was written for {path}")
        os.chmod(tmp, 0o666 & ~_umask())
        _move_into_place(tmp, path, overwrite)
    finally:
        tempfile.tempdir = saved_tempdir
        shutil.rmtree(work, ignore_errors=True)


def _move_into_place(tmp: str, path: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if `path` exists: an atomic exclusive create
    except FileExistsError:
        raise SurgeryError(
            f"{path} appeared while this run was writing it (another run?); "
            "it was kept: pass --force to overwrite it"
        ) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        _claim(path)  # a file system without hard links: claim the name first
        os.replace(tmp, path)


def _claim(path: str) -> None:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        raise SurgeryError(
            f"{path} appeared while this run was writing it (another run?); "
            "it was kept: pass --force to overwrite it"
        ) from None


def remove_stale_work(folder: str) -> list[str]:
    """Remove work folders in `folder` of processes of this host that are gone."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _WORK_NAME.match(name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
