"""The one exception type users see for problems they can fix."""

from __future__ import annotations

import os


class SurgeryError(ValueError):
    """A user-caused problem, reported in one line that says what to do.

    Every problem the caller can fix (a layer name that is not in the model,
    data that does not fit its inputs, a corrupt statistics file, an option
    out of range, ...) raises `SurgeryError` (or its subclass `UsageError`
    for a bad option value) with a message whose first line says what is
    wrong and what to do about it. The command line prints that line, without
    a traceback. It subclasses `ValueError`, so code that catches
    `ValueError` keeps working.

    Example:

    ```python
    import keras
    import numpy as np
    import surgery

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="fc")])
    try:
        surgery.insert_identity_bn(model, after="fcc", data=np.ones((4, 8)))
    except surgery.SurgeryError as e:
        print(e)  # no layer 'fcc' in model 'sequential'; did you mean 'fc'?
    ```
    """


class UsageError(SurgeryError):
    """A bad option or argument value; the command line exits 2 for it."""


def first_line(error: Exception) -> str:
    """The first line of an error's message, or its type when it has none.

    A `SurgeryError` is written as one line, so a line break in it comes
    from a value it quotes (a file name with a newline): it is shown escaped,
    as `repr` shows it, instead of cutting the message there.
    """
    text = str(error).strip()
    if not text:
        return type(error).__name__
    if isinstance(error, SurgeryError):
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    line = text.splitlines()[0].rstrip()
    if line.endswith(":"):
        # "... You are likely doing something like:" leads into lines not
        # shown: end at the last whole sentence instead
        end = line.rfind(". ")
        line = line[: end + 1] if end > 0 else line[:-1]
    return line


def quoted(path: str | os.PathLike) -> str:
    """A path for a one-line message: quoted, odd characters escaped (`repr`)."""
    return repr(os.fspath(path))
