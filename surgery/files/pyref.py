"""`package.module:attribute` references to the user's own Python objects.

The command line takes a model or a preprocessing function that lives in the
user's code this way, like `uvicorn app:main`. The module is imported from
the current directory or `sys.path`; importing it runs its code, as a Python
user importing it would. `--import MODULE` imports a module alone (one that
registers custom Keras classes), and `load_error` names the module a model
file's unknown class needs.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

from surgery.errors import SurgeryError, first_line

_REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_reference(text: str) -> bool:
    """Whether `text` reads as `module:attribute` (and is not a file)."""
    return bool(_REFERENCE.fullmatch(text)) and not os.path.exists(text)


def resolve(text: str, what: str):
    """The object `module:attribute` names, or one line saying what failed."""
    module_name, _, attribute = text.partition(":")
    module = _import(module_name, f"{what} {text!r}")
    value = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise SurgeryError(f"{what} {text!r}: {module_name} has no {attribute!r}")
        value = getattr(value, part)
    return value


def import_module(name: str, what: str = "module"):
    """Import the user's module `name` (e.g. one registering custom layers).

    Args:
        name: a dotted module name, importable from the current folder or
            `sys.path` (`mylayers`, `mypkg.layers`).
        what: how the message names the source, e.g. `"--import"`. Defaults
            to `"module"`.

    Returns:
        The imported module.

    Raises:
        SurgeryError: `name` is not a module name (a file path, say), cannot
            be imported, or raises while it is imported.
    """
    if not _MODULE.fullmatch(name) or name.endswith(".py"):
        stem = os.path.splitext(os.path.basename(name))[0]
        hint = (
            f" (for {name}: {stem}, run from its folder)" if stem.isidentifier() else ""
        )
        raise SurgeryError(
            f"{what} {name!r}: give a Python module name such as mylayers or "
            f"mypkg.layers{hint}"
        )
    return _import(name, f"{what} {name!r}")


def _import(module_name: str, where: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise SurgeryError(
            f"{where}: cannot import {module_name!r} ({first_line(e)}); "
            "run from its folder or put it on PYTHONPATH"
        ) from None
    except Exception as e:  # noqa: BLE001 - the user's module failed: one line
        raise SurgeryError(
            f"{where}: importing {module_name!r} raised {type(e).__name__}: "
            f"{first_line(e)}; fix the module"
        ) from None


_UNREGISTERED = re.compile(
    r"Could not locate (class|function) '([^']+)'"
    r"(?:.*?Full object config: \{'module': '([^']+)')?",
    re.DOTALL,
)


def load_error(what: str, error: Exception) -> SurgeryError:
    """Keras' error loading a model, in one line naming the module to import.

    Args:
        what: what failed, e.g. `"could not load net.keras"`.
        error: the exception Keras raised.

    Returns:
        A `SurgeryError` (to raise): for a class Keras could not locate, its
        name and the module that defines it (`--import MODULE` on the
        command line); otherwise the error's first line.
    """
    match = _UNREGISTERED.search(str(error))
    if match is None:
        return SurgeryError(f"{what}: {first_line(error)}")
    kind, name, module = match.groups()
    known = module and module.isidentifier() or module and "." in module
    where = f"{module}, " if known and module != "__main__" else ""
    flag = f"--import {module}" if where else "--import MODULE"
    return SurgeryError(
        f"{what}: it uses the custom {kind} {name!r}, which no imported module "
        f"registers; import the module defining it ({where}with "
        "@keras.saving.register_keras_serializable) first: on the command line, "
        f"{flag}"
    )
