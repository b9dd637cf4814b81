"""Shards: the i-th of n contiguous slices of a data set, as `--shard i/N`.

Jobs that each read one shard measure statistics that merge into those of
the whole data set.
"""

from __future__ import annotations

import re

from surgery.errors import SurgeryError


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/n"` (0-based i) as a checked `(i, n)` pair."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if match is None:
        raise SurgeryError(f"--shard {text!r}: write it as i/N, e.g. 0/4")
    return check_shard((int(match[1]), int(match[2])))


def check_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    """`shard` as given, or a one-line error when it is no i-th of N."""
    if shard is None:
        return None
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise SurgeryError(f"shard {i}/{n}: need 0 <= i < N (shards count from 0)")
    return i, n


def shard_range(rows: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """The rows `[start, stop)` of `shard` in `rows` rows (all without one)."""
    if shard is None:
        return 0, rows
    i, n = shard
    return i * rows // n, (i + 1) * rows // n
