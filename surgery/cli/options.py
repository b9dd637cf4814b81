"""Option values checked right after parsing, before any model or data is read.

A bad value is a usage error (exit 2), reported in one line.
"""

from __future__ import annotations

import re

from surgery.errors import SurgeryError, UsageError
from surgery.validate import check_epsilon, check_momentum


def check_options(args) -> None:
    """Raise UsageError for the first out-of-range option of `args`."""
    try:
        _check(args)
    except UsageError:
        raise
    except SurgeryError as e:
        raise UsageError(f"--{e}") from None


def _check(args) -> None:
    if getattr(args, "epsilon", None) is not None:
        check_epsilon(args.epsilon)
    if getattr(args, "momentum", None) is not None:
        check_momentum(args.momentum)
    for flag in ("batch_size", "max_samples"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    max_ulp = getattr(args, "max_ulp", None)
    if max_ulp is not None and max_ulp < 0:
        raise UsageError(f"--max-ulp must be >= 0, got {max_ulp}")
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
