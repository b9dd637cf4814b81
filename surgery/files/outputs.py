"""A model's outputs over a data set, kept on disk between two passes.

`convert` records the original model's outputs in its first pass and
compares the new model's against them in the second, so it never holds a
data set's outputs in memory and never runs the original twice.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

from surgery.errors import SurgeryError
from surgery.files.atomic import write_error


class OutputFile:
    """Model outputs appended to raw files, read back memory-mapped.

    One file per output; only the first `limit` samples are kept.
    """

    def __init__(self, folder: str, limit: int | None):
        self.folder, self.limit = folder, limit
        self.samples = 0
        self._files: list = []
        self._specs: list[tuple] = []
        self._maps: list[np.memmap] | None = None

    @property
    def wants_more(self) -> bool:
        return self.limit is None or self.samples < self.limit

    def append(self, outputs) -> None:
        if not self.wants_more:
            return
        arrays = [np.ascontiguousarray(np.asarray(o)) for o in outputs]
        keep = arrays[0].shape[0] if arrays else 0
        if self.limit is not None:
            keep = min(keep, self.limit - self.samples)
        try:
            if not self._files:
                for k, a in enumerate(arrays):
                    name = os.path.join(self.folder, f"{k}.raw")
                    self._files.append(open(name, "wb"))  # noqa: SIM115 - kept open
                    self._specs.append((a.dtype, a.shape[1:]))
            for f, a in zip(self._files, arrays, strict=True):
                f.write(a[:keep].tobytes())
                f.flush()  # a full disk fails here, not later in close()
        except OSError as e:
            raise self._error(e) from None
        self.samples += keep

    def _error(self, error: OSError) -> SurgeryError:
        return write_error(self.folder, error, "write the reference outputs to", _FIX)

    def close(self) -> None:
        for f in self._files:
            with contextlib.suppress(OSError):  # flushed in append already
                f.close()
        self._maps = None

    def read(self, lo: int, hi: int) -> list[np.ndarray]:
        if self._maps is None:
            for f in self._files:
                f.close()
            self._maps = [
                np.memmap(f.name, dtype=dtype, mode="r", shape=(self.samples, *shape))
                if self.samples
                else np.empty((0, *shape), dtype)
                for f, (dtype, shape) in zip(self._files, self._specs, strict=True)
            ]
        if hi > self.samples:
            raise SurgeryError(
                f"the data changed between passes ({self.samples} samples, then "
                "more); give data that reads the same every time, e.g. arrays or files"
            )
        return [m[lo:hi] for m in self._maps]


_FIX = "free some space there, or pass workdir= (TMPDIR for the CLI) a folder with room"


def reference_folder(workdir: str | None) -> str:
    """A new folder for `OutputFile`s in `workdir` (the system's temporary
    folder when None)."""
    try:
        return tempfile.mkdtemp(prefix="surgery-reference-", dir=workdir)
    except OSError as e:
        where = workdir or tempfile.gettempdir()
        raise write_error(where, e, "make a folder in", _FIX) from None
