"""What the commands write: the output checks before any work, and the atomic saves.

`check_output` refuses a bad, existing or unwritable `--out` (and `--plot`)
before a model loads; `save_model` writes a whole model, or a weights file
and its architecture as a pair that appears together or not at all.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from surgery.cli.common import MODEL_SUFFIXES
from surgery.errors import SurgeryError, UsageError, first_line
from surgery.files.atomic import (
    atomic_path,
    atomic_paths,
    check_name,
    remove_stale_work,
)

if TYPE_CHECKING:
    import keras


def check_output(args, suffixes=MODEL_SUFFIXES) -> None:
    """Refuse a bad, existing or unwritable --out (and --plot) before any work.

    An output may never be one of the command's inputs, nor an image inside
    an input folder (it would be read as data next time), even with --force.
    """
    if not args.out.endswith(suffixes):
        raise UsageError(f"--out must end in {' or '.join(suffixes)}, got {args.out}")
    outputs = [("--out", args.out)]
    plot = getattr(args, "plot", None)
    if plot:
        _check_plot(plot)
        outputs.append(("--plot", plot))
    if len(outputs) == 2 and _same_file(args.out, plot):
        raise UsageError("--out and --plot name the same file; give two paths")
    architecture = _sidecar(args.out)
    if architecture:
        outputs.append(("--out's architecture", architecture))
    inputs = _input_paths(args)
    for flag, path in outputs:
        check_name(path)
        # a run killed while moving its outputs into place is rolled back first
        remove_stale_work(os.path.dirname(os.path.abspath(path)))
        for name in inputs:
            if _same_file(path, name) or _read_from(path, name):
                raise UsageError(
                    f"{flag} {path} is an input of this command ({name}); "
                    "write the output to another path"
                )
        if os.path.lexists(path) and not args.force:
            raise SurgeryError(f"{path} exists; pass --force to overwrite it")
        if os.path.isdir(path):
            raise SurgeryError(f"{flag} {path} is a folder; give a file name")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise SurgeryError(
                f"{flag} folder {folder} does not exist; create it first"
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SurgeryError(
                f"{flag} folder {folder} is not writable; choose another folder"
            )


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _check_plot(path):
    import importlib.util

    if not path.lower().endswith(PLOT_SUFFIXES):
        raise UsageError(f"--plot must end in {', '.join(PLOT_SUFFIXES)}, got {path}")
    if importlib.util.find_spec("matplotlib") is None:
        raise SurgeryError("--plot needs matplotlib: pip install 'surgery[plot]'")


def _input_paths(args) -> list[str]:
    """The files and folders a command reads, as given on its command line."""
    from surgery.data.sources import split_key

    names = []
    for attr in ("model", "a", "b", "weights", "stats"):
        value = getattr(args, attr, None)
        if isinstance(value, str):
            names.append(value)
    names += list(getattr(args, "files", None) or [])
    data = getattr(args, "data", None)
    if data:
        names.append(split_key(data)[0])
    return [name for name in names if os.path.exists(name)]


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _read_from(path: str, folder: str) -> bool:
    """Whether `path` would be read as an image of the input `folder`."""
    from surgery.data.sources import IMAGE_SUFFIXES

    if not os.path.isdir(folder) or not path.lower().endswith(IMAGE_SUFFIXES):
        return False
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    root = os.path.realpath(folder)
    return os.path.commonpath([parent, root]) == root


def save_model(model: keras.Model, out: str, *, force: bool = False) -> None:
    """Save a whole model (.keras) or its weights (.weights.h5) atomically.

    Without `force` the file is created exclusively: if another run wrote
    `out` meanwhile, its file is kept and this run fails.

    Weights alone cannot be read back without their architecture, which has
    changed (BN inserted or folded), so a `.weights.h5` output gets its
    architecture beside it as `NAME.json`: `surgery ... NAME.weights.h5`
    finds it, and `keras.models.model_from_json` reads it. The two are
    written in one work folder and appear together or not at all: the
    weights are moved into place first and the `.json` last, under a
    journal that the next run rolls back if this one is killed in between
    (see `surgery.files.atomic`).
    """
    if not out.endswith(".weights.h5"):
        with atomic_path(
            out, suffix=".keras", overwrite=force, capture_tempfiles=True
        ) as tmp:
            model.save(tmp)
        return
    architecture = _architecture(model, out)
    with atomic_paths(
        [out, _sidecar(out)],
        [".weights.h5", ".json"],
        overwrite=force,
        capture_tempfiles=True,
    ) as (weights, json_path):
        model.save_weights(weights)
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(architecture)


def save_outputs(args, model: keras.Model, stats) -> None:
    """Write --out and, when asked, --plot: both, or neither if one fails."""
    with staged_plot(args, stats):
        save_model(model, args.out, force=args.force)


@contextlib.contextmanager
def staged_plot(args, stats):
    """Render --plot to a temporary file, moved into place after the block."""
    plot = getattr(args, "plot", None)
    if not plot:
        yield
        return
    from surgery.verbs import stats_report as report

    with atomic_path(plot, overwrite=args.force) as tmp:
        report.plot_report(stats, tmp)
        yield


def _architecture(model, out) -> str:
    try:
        return model.to_json()
    except (TypeError, ValueError, NotImplementedError) as e:
        raise SurgeryError(
            f"cannot write the architecture {_sidecar(out)} that {out} needs "
            f"to be read back ({first_line(e)[:100]}); "
            "write a .keras file instead"
        ) from None


def _sidecar(out):
    from surgery.files.models import sidecar

    return sidecar(out) if out.endswith(".weights.h5") else None
