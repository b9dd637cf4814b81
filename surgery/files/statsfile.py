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

from surgery.errors import SurgeryError, first_line, quoted
from surgery.files.atomic import atomic_path
from surgery.files.fingerprint import model_fingerprint
from surgery.numerics.moments import Moments
from surgery.validate import check_moments, check_not_special

FORMAT = "surgery-stats"
VERSION = 1


def save_stats(
    path: str, stats: dict[str, Moments], *, overwrite: bool = True, **meta
) -> str:
    """Write `stats` to `path` (.npz) atomically; `meta` is kept beside them.

    With `overwrite=False` an existing `path` is never replaced.
    """
    if not path.endswith(".npz"):
        raise SurgeryError(f"statistics files end in .npz, got {quoted(path)}")
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
        raise SurgeryError(f"{quoted(path)} does not exist; check the path")
    check_not_special(path, "statistics file")
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
        raise SurgeryError(f"cannot read {quoted(path)}: {first_line(e)}") from None
    except Exception:  # noqa: BLE001 - zip, npy, json and key errors alike
        raise SurgeryError(
            f"{quoted(path)} is not a statistics file, or it is damaged; write "
            "one with `surgery stats`"
        ) from None
    _check_header(header, path)
    for key, moments in stats.items():
        check_moments(moments, key, source=quoted(path))
    return stats, header


def _check_header(header: dict, path: str) -> None:
    """Refuse header fields that no `surgery stats` run writes."""
    version = header.get("version")
    if not _is_int(version) or version < 1:
        _bad_field(path, "version", version, "a version number")
    if version > VERSION:
        raise SurgeryError(
            f"{quoted(path)} is a version {version} statistics file, newer than "
            f"this surgery reads ({VERSION}); upgrade surgery"
        )
    for field in ("model", "weights", "data"):
        if header.get(field) is not None and not isinstance(header[field], str):
            _bad_field(path, field, header[field], "a string")
    shard = header.get("shard")
    if shard is not None and not (
        isinstance(shard, list)
        and len(shard) == 2
        and all(map(_is_int, shard))
        and 0 <= shard[0] < shard[1]
    ):
        _bad_field(path, "shard", shard, "[i, N] with 0 <= i < N")
    samples = header.get("samples")
    if samples is not None and not (_is_int(samples) and samples >= 0):
        _bad_field(path, "samples", samples, "a count >= 0")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad_field(path, field, value, want):
    raise SurgeryError(
        f"{quoted(path)}: its header field {field!r} is {value!r}, not {want} (the "
        "file is damaged or was edited); write it again with `surgery stats`"
    )


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
            f"{quoted(path)} was measured on another model (model "
            f"'{header.get('model')}', "
            "other weights); recompute it with `surgery stats` on this model"
        )
    if saved is None and header.get("model") not in (None, model.name):
        raise SurgeryError(
            f"{quoted(path)} is from model '{header.get('model')}', not "
            f"'{model.name}'; "
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
                f"{quoted(path)} has taps {list(stats)} but {quoted(paths[0])} has "
                f"{list(total)}; "
                "merge statistics of the same layers only"
            )
        if header.get("model") != first_header.get("model"):
            raise SurgeryError(
                f"{quoted(path)} is from model '{header.get('model')}', "
                f"{quoted(paths[0])} from '{first_header.get('model')}'; merge one "
                "model's shards only"
            )
        if header.get("weights") != first_header.get("weights"):
            raise SurgeryError(
                f"{quoted(path)} and {quoted(paths[0])} were measured on models "
                f"both named '{header.get('model')}' but with different weights; "
                "merge the shards of one model only (recompute the others with "
                "`surgery stats` on it)"
            )
        for key, moments in stats.items():
            if moments.units != total[key].units:
                raise SurgeryError(
                    f"tap '{key}': {quoted(path)} has {moments.units} units, "
                    f"{quoted(paths[0])} has {total[key].units}; merge statistics "
                    "of the same model only"
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
                f"{quoted(path)} is given twice ({quoted(seen[key])}); each sample "
                "may be counted once: give every file once"
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
                f"{quoted(path)} holds the same statistics as {quoted(seen[key])} "
                "(a copy?); "
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
            raise SurgeryError(
                f"shard {i}/{n} is given twice: {quoted(seen[i])} and "
                f"{quoted(path)}; give each shard once"
            )
        seen[i] = path
    missing = sorted(set(range(n)) - set(seen))
    if missing and not partial:
        raise SurgeryError(
            f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing; add them "
            "or pass --partial to merge what is there"
        )
