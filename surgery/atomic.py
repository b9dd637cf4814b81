"""Files that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", prefix: str = ".tmp-") -> Iterator[str]:
    """A temporary path beside `path`, renamed onto it when the block succeeds.

    On any error the temporary file is removed and `path` is left as it was.
    `suffix` is for writers that insist on one (`.keras`, `.weights.h5`).
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=prefix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
