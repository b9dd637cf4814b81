"""Option values checked right after parsing, before any model or data is read.

A bad value is a usage error (exit 2), reported in one line. A command's
own checks of how its options fit together (`set_defaults(check=...)`) run
here too. `--import` modules are imported here, before any model loads, and
`--input-shape` (defined here with `--import`) is checked again against a
Functional model.
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


def add_trace_args(parser) -> None:
    """`--input-shape` and `--import`, for any command that reads a model.

    Args:
        parser: the `argparse` parser of a command that reads models.
    """
    parser.add_argument(
        "--input-shape",
        metavar="H,W,C",
        help="input shape of a subclassed model, without the batch dimension, "
        "to trace it with (None for a free dimension: None,None,3); default: "
        "the shape it was built with",
    )
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="import this Python module before any model loads, e.g. the one "
        "whose @keras.saving.register_keras_serializable classes a model uses "
        "(repeatable; from the current folder or PYTHONPATH)",
    )


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
    own = getattr(args, "check", None)  # a command's checks of its own options
    if own is not None:
        own(args)
    _check(args)


def _check(args) -> None:
    if getattr(args, "image_size", None) is not None:
        image_size(args.image_size)
    input_shape(getattr(args, "input_shape", None))
    imports = getattr(args, "imports", None) or []
    if imports:
        from surgery.files import pyref
        from surgery.runtime.quiet import import_keras_quietly

        import_keras_quietly()  # first, were the user's modules to import it
        for name in imports:
            pyref.import_module(name, "--import")
    if getattr(args, "shard", None) is not None:
        from surgery.data.shards import parse_shard

        try:
            parse_shard(args.shard)
        except SurgeryError as e:
            raise UsageError(str(e)) from None


def input_shape(text: str | None) -> tuple[int | None, ...] | None:
    """`--input-shape H,W,C` as a shape without the batch dimension.

    Args:
        text: the option's value: positive sizes and `None` (a free
            dimension), comma-separated, e.g. `48,48,3` or `None,None,3`;
            or `None` when the option is not given.

    Returns:
        The shape as a tuple, e.g. `(None, None, 3)`, or `None` for `None`.

    Raises:
        UsageError: `text` is not such a list.
    """
    if text is None:
        return None
    parts = [part.strip() for part in text.strip().strip("()").split(",")]
    if parts and not parts[-1]:
        parts.pop()  # "48,48,3," or "(8,)"
    shape = []
    for part in parts:
        if part.lower() == "none":
            shape.append(None)
        elif part.isdigit() and 0 < int(part) <= 2**31:
            shape.append(int(part))
        else:
            raise UsageError(
                f"--input-shape {text!r}: write the shape without the batch "
                "dimension as sizes or None (free), e.g. 224,224,3 or None,None,3"
            )
    if not shape:
        raise UsageError(
            f"--input-shape {text!r}: give at least one dimension, e.g. 224,224,3"
        )
    return tuple(shape)


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


def check_graph_shape(model, text: str | None) -> None:
    """Refuse an `--input-shape` that a Functional model does not have.

    Args:
        model: a loaded Functional or Sequential model.
        text: the `--input-shape` value, or `None` when not given.

    Raises:
        SurgeryError: `text` names another shape than the model's own.
    """
    shape = input_shape(text)
    if shape is None:
        return
    try:
        own = model.input_shape
    except (AttributeError, ValueError):  # not built: no inputs of its own yet
        own = None
    if isinstance(own, tuple) and tuple(own[1:]) == shape:
        return
    has = (
        f"input shape {_shape_text(own[1:])}"
        if isinstance(own, tuple)
        else ("inputs of its own")
    )
    raise SurgeryError(
        f"--input-shape {text} is for subclassed models, and model "
        f"'{model.name}' is a Functional model with {has}; drop --input-shape"
    )


def _shape_text(shape) -> str:
    return ",".join(map(str, shape))
