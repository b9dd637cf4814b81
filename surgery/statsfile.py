"""Activation statistics on disk (.npz), and their exact merge across shards.

A big data set can be split over jobs (`surgery stats --shard i/N`), each
writing the raw moments (count, mean, M2 in float64) of its slice; merging
the files with Chan's formula gives the statistics of the whole data set, as
one pass over it would (equal up to float64 rounding). Files hold numbers
only and load without pickle.
"""

from __future__ import annotations

import json

import numpy as np

from surgery.atomic import atomic_path
from surgery.errors import SurgeryError
from surgery.moments import Moments

FORMAT = "surgery-stats"
VERSION = 1


def save_stats(path: str, stats: dict[str, Moments], **meta) -> str:
    """Write `stats` to `path` (.npz) atomically; `meta` is kept beside them."""
    if not path.endswith(".npz"):
        raise SurgeryError(f"statistics files end in .npz, got {path}")
    header = {"format": FORMAT, "version": VERSION, "taps": list(stats), **meta}
    arrays = {"header": np.array(json.dumps(header))}
    for i, moments in enumerate(stats.values()):
        arrays[f"count_{i}"] = np.array(moments.count, dtype=np.int64)
        arrays[f"mean_{i}"] = np.asarray(moments.mean, dtype=np.float64)
        arrays[f"m2_{i}"] = np.asarray(moments.m2, dtype=np.float64)
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_stats(path: str) -> tuple[dict[str, Moments], dict]:
    """The statistics in `path` and the metadata saved with them."""
    try:
        f = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SurgeryError(f"{path} does not exist") from None
    except (ValueError, OSError):
        f = None
    try:
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise KeyError("header")
        with f:
            header = json.loads(str(f["header"]))
            if header.get("format") != FORMAT:
                raise KeyError("format")
            stats = {
                key: Moments(int(f[f"count_{i}"]), f[f"mean_{i}"], f[f"m2_{i}"])
                for i, key in enumerate(header["taps"])
            }
    except (KeyError, ValueError, OSError):
        raise SurgeryError(
            f"{path} is not a statistics file; write one with `surgery stats`"
        ) from None
    return stats, header


def merge_stats(paths: list[str], *, partial: bool = False) -> tuple[dict, dict]:
    """The statistics of all shards together, checked to fit each other.

    Shards of one run must all be there, once each, unless `partial`.
    """
    if not paths:
        raise SurgeryError("nothing to merge: give one or more .npz files")
    loaded = [load_stats(p) for p in paths]
    first_stats, first_header = loaded[0]
    _check_shards([h for _, h in loaded], paths, partial)
    total = dict(first_stats)
    for path, (stats, header) in zip(paths[1:], loaded[1:], strict=True):
        if list(stats) != list(total):
            raise SurgeryError(
                f"{path} has taps {list(stats)} but {paths[0]} has {list(total)}; "
                "merge statistics of the same layers only"
            )
        if header.get("model") != first_header.get("model"):
            raise SurgeryError(
                f"{path} is from model '{header.get('model')}', {paths[0]} from "
                f"'{first_header.get('model')}'; merge one model's shards only"
            )
        for key, moments in stats.items():
            if moments.units != total[key].units:
                raise SurgeryError(
                    f"tap '{key}': {path} has {moments.units} units, "
                    f"{paths[0]} has {total[key].units}"
                )
            total[key] = total[key].merge(moments)
    header = {k: v for k, v in first_header.items() if k != "shard"}
    header["samples"] = next(iter(total.values())).count if total else 0
    return total, header


def _check_shards(headers, paths, partial):
    shards = [h.get("shard") for h in headers]
    if all(s is None for s in shards):
        return
    counts = {s[1] for s in shards if s is not None}
    if None in shards or len(counts) != 1:
        raise SurgeryError(
            "the files mix different shardings (or unsharded runs); merge the "
            "shards of one `--shard i/N` run"
        )
    n = counts.pop()
    seen = {}
    for path, (i, _) in zip(paths, shards, strict=True):
        if i in seen:
            raise SurgeryError(f"shard {i}/{n} is given twice: {seen[i]} and {path}")
        seen[i] = path
    missing = sorted(set(range(n)) - set(seen))
    if missing and not partial:
        raise SurgeryError(
            f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing; add them "
            "or pass --partial to merge what is there"
        )
