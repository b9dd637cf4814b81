"""What the example scripts share: a work directory and an image subset."""

from __future__ import annotations

import os
import tempfile

import numpy as np

import surgery.data.sources


def run_in_workdir(run, args, prefix: str) -> dict:
    """`run(args, workdir)` in `args.workdir`, or in a temporary folder removed after."""
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as workdir:
            return run(args, workdir)
    os.makedirs(args.workdir, exist_ok=True)
    return run(args, args.workdir)


def subset_folder(folder: str, max_samples: int | None, workdir: str) -> str:
    """`folder`, or a folder of symlinks to `max_samples` of its images.

    The image list is sorted by class, so its first N images would be one
    or two classes; we take N evenly spaced ones instead, keeping the
    `<class>/<file>` layout so that labels still come from folder names.
    """
    files = surgery.data.sources.list_images(folder)
    if max_samples is None or max_samples >= len(files):
        return folder
    subset = os.path.join(workdir, f"images_{max_samples}")
    picks = np.linspace(0, len(files) - 1, max_samples).round().astype(int)
    for i in np.unique(picks):
        link = os.path.join(subset, os.path.relpath(files[i], folder))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(files[i]), link)
    return subset
