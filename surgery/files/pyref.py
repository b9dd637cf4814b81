"""`package.module:attribute` references to the user's own Python objects.

The command line takes a model or a preprocessing function that lives in the
user's code this way, like `uvicorn app:main`. The module is imported from
the current directory or `sys.path`; importing it runs its code, as a Python
user importing it would.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

from surgery.errors import SurgeryError, first_line

_REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def is_reference(text: str) -> bool:
    """Whether `text` reads as `module:attribute` (and is not a file)."""
    return bool(_REFERENCE.fullmatch(text)) and not os.path.exists(text)


def resolve(text: str, what: str):
    """The object `module:attribute` names, or one line saying what failed."""
    module_name, _, attribute = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SurgeryError(
            f"{what} {text!r}: cannot import {module_name!r} ({first_line(e)}); "
            "run from its folder or put it on PYTHONPATH"
        ) from None
    value = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise SurgeryError(f"{what} {text!r}: {module_name} has no {attribute!r}")
        value = getattr(value, part)
    return value
