"""Activation statistics on disk (.npz), and their exact merge across shards.

A big data set can be split over jobs (`surgery stats --shard i/N`), each
writing the raw moments (count, mean, M2 in float64) of its slice; merging
the files with Chan's formula gives the statistics of the whole data set, as
one pass over it would (equal up to float64 rounding). Files hold numbers
only and load without pickle.
"""

from __future__ import annotations

import json
import os

import numpy as np

from surgery.errors import SurgeryError, first_line
from surgery.files.atomic import atomic_path
from surgery.files.fingerprint import model_fingerprint
from surgery.numerics.moments import Moments
from surgery.validate import check_moments

FORMAT = "surgery-stats"
VERSION = 1


def save_stats(
    path: str, stats: dict[str, Moments], *, overwrite: bool = True, **meta
) -> str:
    """Write `stats` to `path` (.npz) atomically; `meta` is kept beside them.

    With `overwrite=False` an existing `path` is never replaced.
    """
    if not path.endswith(".npz"):
        raise SurgeryError(f"statistics files end in .npz, got {path}")
    header = {"format": FORMAT, "version": VERSION, "taps": list(stats), **meta}
    arrays = {"header": np.array(json.dumps(header))}
    for i, moments in enumerate(stats.values()):
        arrays[f"count_{i}"] = np.array(moments.count, dtype=np.int64)
        arrays[f"mean_{i}"] = np.asarray(moments.mean, dtype=np.float64)
        arrays[f"m2_{i}"] = np.asarray(moments.m2, dtype=np.float64)
    with (
        atomic_path(path, suffix=".npz", overwrite=overwrite) as tmp,
        open(tmp, "wb") as f,
    ):
        np.savez(f, **arrays)
    return path


def load_stats(path: str) -> tuple[dict[str, Moments], dict]:
    """The statistics in `path` and the metadata saved with them.

    Every member's CRC is checked as it is read, and values no measurement
    can give (count < 1, M2 < 0, non-finite) are refused.
    """
    if not os.path.exists(path):
        raise SurgeryError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            header = json.loads(str(f["header"][()]))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise KeyError("format")
            taps = header["taps"]
            if not isinstance(taps, list) or not all(isinstance(t, str) for t in taps):
                raise KeyError("taps")
            stats = {
                key: Moments(_count(f[f"count_{i}"]), f[f"mean_{i}"], f[f"m2_{i}"])
                for i, key in enumerate(taps)
            }
    except OSError as e:
        raise SurgeryError(f"cannot read {path}: {first_line(e)}") from None
    except Exception:  # noqa: BLE001 - zip, npy, json and key errors alike
        raise SurgeryError(
            f"{path} is not a statistics file, or it is damaged; write one with "
            "`surgery stats`"
        ) from None
    for key, moments in stats.items():
        check_moments(moments, key, source=path)
    return stats, header


def _count(value) -> int:
    value = np.asarray(value)
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise ValueError("count")
    return int(value)


def check_stats_model(header: dict, model, path: str) -> None:
    """Refuse statistics measured on another model (same widths or not)."""
    saved = header.get("weights")
    if saved is not None and saved != model_fingerprint(model):
        raise SurgeryError(
            f"{path} was measured on another model (model '{header.get('model')}', "
            "other weights); recompute it with `surgery stats` on this model"
        )
    if saved is None and header.get("model") not in (None, model.name):
        raise SurgeryError(
            f"{path} is from model '{header.get('model')}', not '{model.name}'; "
            "recompute it with `surgery stats` on this model"
        )


def merge_stats(paths: list[str], *, partial: bool = False) -> tuple[dict, dict]:
    """The statistics of all shards together, checked to fit each other.

    Shards of one run must all be there, once each, unless `partial`.
    """
    if not paths:
        raise SurgeryError("nothing to merge: give one or more .npz files")
    loaded = [load_stats(p) for p in paths]
    first_stats, first_header = loaded[0]
    _check_shards([h for _, h in loaded], paths, partial)
    _check_distinct_paths(paths)
    _check_distinct_contents(loaded, paths)
    total = dict(first_stats)
    for path, (stats, header) in zip(paths[1:], loaded[1:], strict=True):
        if list(stats) != list(total):
            raise SurgeryError(
                f"{path} has taps {list(stats)} but {paths[0]} has {list(total)}; "
                "merge statistics of the same layers only"
            )
        if header.get("model") != first_header.get("model") or header.get(
            "weights"
        ) != first_header.get("weights"):
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


def _check_distinct_paths(paths):
    seen = {}
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            raise SurgeryError(
                f"{path} is given twice ({seen[key]}); each sample may be counted "
                "once: give every file once"
            )
        seen[key] = path


def _check_distinct_contents(loaded, paths):
    """The same statistics twice (a copied file) would double every count."""
    seen = {}
    for path, (stats, _) in zip(paths, loaded, strict=True):
        key = tuple(
            (k, m.count, m.mean.tobytes(), m.m2.tobytes()) for k, m in stats.items()
        )
        if key in seen:
            raise SurgeryError(
                f"{path} holds the same statistics as {seen[key]} (a copy?); "
                "merging them would count the same samples twice"
            )
        seen[key] = path


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
