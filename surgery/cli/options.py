"""Option values checked right after parsing, before any model or data is read.

A bad value is a usage error (exit 2), reported in one line.
"""

from __future__ import annotations

import re

from surgery.errors import SurgeryError, UsageError
from surgery.validate import (
    check_batch_size,
    check_epsilon,
    check_gpus_per_worker,
    check_max_samples,
    check_max_ulp,
    check_momentum,
    check_verify_samples,
    check_workers,
)

# Each option's one check, shared with the Python API (`surgery.validate`).
CHECKS = {
    "epsilon": check_epsilon,
    "momentum": check_momentum,
    "batch_size": check_batch_size,
    "max_samples": check_max_samples,
    "verify_samples": check_verify_samples,
    "workers": check_workers,
    "max_ulp": check_max_ulp,
    "gpus_per_worker": check_gpus_per_worker,
}


def check_options(args) -> None:
    """Raise UsageError for the first out-of-range option of `args`."""
    for name, check in CHECKS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        try:
            check(value)
        except SurgeryError as e:
            flag = "--" + name.replace("_", "-")
            raise UsageError(flag + str(e).removeprefix(name)) from None
    ray = getattr(args, "ray", None)
    if getattr(args, "gpus_per_worker", None) and ray is None:
        raise UsageError("--gpus-per-worker needs --ray")
    if getattr(args, "shard", None) and ray is not None:
        raise UsageError("--shard and --ray do not mix: Ray splits the data itself")
    _check(args)


def _check(args) -> None:
    if getattr(args, "image_size", None) is not None:
        image_size(args.image_size)
    if getattr(args, "shard", None) is not None:
        from surgery.data.sources import parse_shard

        try:
            parse_shard(args.shard)
        except SurgeryError as e:
            raise UsageError(str(e)) from None


def image_size(text: str | None) -> tuple[int, int] | None:
    """`--image-size HxW` as (height, width), both >= 1."""
    if text is None:
        return None
    match = re.fullmatch(r"(\d+)[x,](\d+)", text.strip())
    if match is None:
        raise UsageError(f"--image-size {text!r}: write it as HxW, e.g. 224x224")
    size = int(match[1]), int(match[2])
    if min(size) < 1 or max(size) > 2**15:
        raise UsageError(
            f"--image-size {text}: height and width must be 1..32768 pixels"
        )
    return size
