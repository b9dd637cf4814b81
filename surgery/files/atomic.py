"""Files that appear whole or not at all, alone or together.

Every output is written inside a work folder beside it, named
`.surgery-tmp-<host>-<pid>-<random>`, and moved into place only when complete.
The name says which process made it, so a folder left by a run that was
killed (SIGKILL, power loss) is recognised and removed by the next write into
the same directory, once that process is gone. Temporary files inside it get
short names (`0.keras`), so any output name the file system accepts works;
`check_name` refuses a longer one before any work.

Outputs written together (a `.weights.h5` and the `.json` architecture it
needs) are moved under a journal: `journal.json` in the work folder lists
each output with the inode of its new file before the first move; a file
replaced with `overwrite` is first moved aside into the work folder; and
`committed` is written after the last move. The moves go in the order given
(the `.json` last). A run killed between two moves leaves its journal; the
next write into the folder (or `surgery`'s output check) finds its process
gone and rolls it back: it removes each output that is still that run's new
file (the same inode, never a file of anyone else) and puts the old files
back. So after any kill a folder holds the old outputs or the new ones,
never a mix, and a rerun succeeds.

Errors while writing (a full disk, a read-only folder, ...) are one
`SurgeryError` naming the output and what to do (`write_error`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence

from surgery.errors import SurgeryError, UsageError, first_line

WORK_PREFIX = ".surgery-tmp-"
JOURNAL, COMMITTED = "journal.json", "committed"
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_WORK_NAME = re.compile(rf"^{re.escape(WORK_PREFIX)}(?P<host>.+)-(?P<pid>\d+)-\w+$")
_LIB_ERRNO = re.compile(r"errno = (\d+)")  # how HDF5 reports a failed write


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

    On any error the temporary file is removed and `path` is left as it was;
    an I/O error becomes a `SurgeryError` naming `path` (`write_error`).
    `suffix` is for writers that insist on one (`.keras`, `.weights.h5`).

    With `overwrite=False` the move is an exclusive create (`os.link`): when
    `path` appeared meanwhile, for instance written by a second run, nothing
    is replaced and a SurgeryError says so; of two writers exactly one wins.
    The file gets the permissions the umask gives a new file (not mkstemp's
    0600). `capture_tempfiles=True` sends Python's `tempfile` files made
    inside the block (Keras' saving makes some) to the same work folder, so
    a killed save leaves nothing elsewhere.
    """
    with atomic_paths(
        [path],
        [suffix],
        prefix=prefix,
        overwrite=overwrite,
        capture_tempfiles=capture_tempfiles,
    ) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(
    paths: Sequence[str],
    suffixes: Sequence[str],
    *,
    prefix: str = "",
    overwrite: bool = True,
    capture_tempfiles: bool = False,
) -> Iterator[list[str]]:
    """Temporary paths for `paths` (one folder), moved into place together.

    As `atomic_path`, for several outputs that must appear together or not
    at all: they are moved in the order given, under a journal that the
    next run rolls back if this one is killed between two moves.
    """
    for path in paths:
        check_name(path)
    folder = os.path.dirname(os.path.abspath(paths[0]))
    if any(os.path.dirname(os.path.abspath(p)) != folder for p in paths):
        raise ValueError("outputs written together must share one folder")
    remove_stale_work(folder)
    try:
        work = tempfile.mkdtemp(
            prefix=f"{WORK_PREFIX}{_HOST}-{os.getpid()}-", dir=folder
        )
    except OSError as e:
        raise write_error(paths[0], e) from None
    tmps = [
        os.path.join(work, f"{prefix}{i}{suffix}") for i, suffix in enumerate(suffixes)
    ]
    saved_tempdir = tempfile.tempdir
    try:
        if capture_tempfiles:
            tempfile.tempdir = work
        try:
            yield tmps
        except BaseException as e:
            _release_space(work)
            if is_io_error(e):
                raise write_error(_named(e, tmps, paths), e) from None
            raise
        tempfile.tempdir = saved_tempdir
        for path, tmp in zip(paths, tmps, strict=True):
            if not os.path.exists(tmp):
                raise SurgeryError(f"nothing was written for {path}")
            os.chmod(tmp, 0o666 & ~_umask())
        try:
            if len(paths) == 1:
                _move_into_place(tmps[0], paths[0], overwrite)
            else:
                _move_together(work, tmps, paths, overwrite)
        except OSError as e:
            raise write_error(_named(e, tmps, paths), e) from None
    finally:
        tempfile.tempdir = saved_tempdir
        shutil.rmtree(work, ignore_errors=True)


def _named(error, tmps, paths) -> str:
    """The output an error is about (the first when it does not say)."""
    text = f"{getattr(error, 'filename', '')} {getattr(error, 'filename2', '')} {error}"
    for tmp, path in zip(tmps, paths, strict=True):
        if tmp in text or os.path.abspath(path) in text:
            return path
    return paths[0]


def _release_space(work: str) -> None:
    """Empty the block's files, so that a library closing one after a failed
    write (HDF5 flushes on close, and crashes the process when that fails
    too) finds room on a full disk."""
    for root, _, names in os.walk(work):
        for name in names:
            with contextlib.suppress(OSError):
                os.truncate(os.path.join(root, name), 0)


def _move_together(work: str, tmps, paths, overwrite: bool) -> None:
    moves = []
    for i, (tmp, path) in enumerate(zip(tmps, paths, strict=True)):
        st = os.stat(tmp)
        new = [st.st_dev, st.st_ino]
        moves.append({"final": os.path.abspath(path), "new": new, "old": f"old-{i}"})
    _write_durably(os.path.join(work, JOURNAL), json.dumps({"moves": moves}))
    try:
        for tmp, path, move in zip(tmps, paths, moves, strict=True):
            if overwrite and os.path.lexists(path):
                os.rename(path, os.path.join(work, move["old"]))
            _move_into_place(tmp, path, overwrite)
        _fsync_dir(work)
        _write_durably(os.path.join(work, COMMITTED), "")
    except BaseException:
        roll_back(work)
        raise


def roll_back(work: str) -> None:
    """Undo the moves of an uncommitted journal in the work folder `work`.

    An output is removed only while it is still the new file the journal
    names (same inode); an old file moved aside goes back where it was.
    """
    try:
        with open(os.path.join(work, JOURNAL), encoding="utf-8") as f:
            moves = json.load(f)["moves"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no journal: nothing was moved yet
    if os.path.exists(os.path.join(work, COMMITTED)):
        return
    for move in reversed(moves):
        final = move["final"]
        try:
            st = os.lstat(final)
            present = True
        except FileNotFoundError:
            present = False
        if present and [st.st_dev, st.st_ino] == move["new"]:
            os.unlink(final)
            present = False
        old = os.path.join(work, move["old"])
        if not present and os.path.lexists(old):
            os.rename(old, final)
    _fsync_dir(moves[0]["final"] if moves else work)


def _move_into_place(tmp: str, path: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if `path` exists: an atomic exclusive create
    except FileExistsError:
        raise _appeared(path) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        _claim(path)  # a file system without hard links: claim the name first
        os.replace(tmp, path)


def _appeared(path: str) -> SurgeryError:
    return SurgeryError(
        f"{path} appeared while this run was writing it (another run?); "
        "it was kept: pass --force to overwrite it"
    )


def _claim(path: str) -> None:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        raise _appeared(path) from None


def remove_stale_work(folder: str) -> list[str]:
    """Remove work folders in `folder` of processes of this host that are gone,
    first rolling back outputs such a process had moved only in part."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _WORK_NAME.match(name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        work = os.path.join(folder, name)
        try:
            roll_back(work)
        except OSError:
            continue  # kept, with its journal, for a later run to finish
        shutil.rmtree(work, ignore_errors=True)
        removed.append(name)
    return removed


def check_name(path: str, suffix: str = "") -> None:
    """Refuse an output whose name (with `suffix`) its file system cannot hold."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(os.path.basename(path) + suffix))
    if size > limit:
        with_suffix = f" with its {suffix} suffix" if suffix else ""
        raise UsageError(
            f"the name of {path} is {size} bytes{with_suffix}, more than the "
            f"{limit} its file system allows; give a shorter name"
        )


def io_errno(error: BaseException) -> int | None:
    """The errno of an I/O error, also when a library only says it in words."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    match = _LIB_ERRNO.search(str(error))
    return int(match[1]) if match else None


def is_io_error(error: BaseException) -> bool:
    """An OSError, or a library's error about a failed read or write."""
    return isinstance(error, OSError) or io_errno(error) is not None


def write_error(
    path: str, error: BaseException, what: str = "write", fix: str = ""
) -> SurgeryError:
    """One line for an I/O error on `path`: what happened and what to do
    (`fix`, when given, instead of the usual advice)."""
    code = io_errno(error)
    folder = os.path.dirname(os.path.abspath(path))
    if code in (errno.ENOSPC, errno.EDQUOT):
        why = f"no space left on the device of {folder}"
        advice = "free some space there or write to another folder, and run again"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = os.strerror(code).lower()
        advice = "write to a folder you can write to"
    elif code == errno.ENAMETOOLONG:
        why, advice = "the name is too long", "give a shorter name"
    else:
        why = os.strerror(code).lower() if code else first_line(error)[:200]
        advice = f"check {folder} and run again"
    return SurgeryError(f"cannot {what} {path}: {why}; {fix or advice}")


def _write_durably(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
