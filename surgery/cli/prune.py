"""`surgery prune`: remove channels by a criterion, a coupled group at a time.

One call of `surgery.prune_channels`: `--criterion dead` and `constant`
remove every such channel measured over `--data`; `l1`, `l2`, `bn_scale`
and `apoz` remove `--amount` of each group's channels, lowest score first.
The options are checked against each other before the backend loads
(`check_prune`, run with the other option checks), and `--layers` names
against the model's channel groups before any data is read.
"""

from __future__ import annotations

import re

from surgery.cli.common import (
    add_data_args,
    add_model_args,
    add_output_args,
    echo,
    load_model,
    open_data,
    verbosity,
)
from surgery.cli.outputs import check_output, save_model
from surgery.errors import UsageError

# `surgery.pruning.criteria.CRITERIA`, spelled out: `--help` imports no backend.
CONSTANT = ("dead", "constant")
RANKED = ("l1", "l2", "bn_scale", "apoz")
MEASURED = ("dead", "constant", "apoz")  # the criteria that need data


def add_commands(sub) -> None:
    prune = sub.add_parser(
        "prune",
        help="remove channels (units, filters) by a criterion, each coupled "
        "group at once",
        description="Channels joined by a residual Add, a BatchNormalization "
        "or a Concatenate go together, and channels that reach a model output "
        "stay: surgery inspect, with its groups option, lists the groups. dead "
        "and constant keep the outputs (exact in real arithmetic); the ranking "
        "criteria change them. With --data (and for the embedded default "
        "model, on its images) the new model's outputs are compared with the "
        "original's.",
    )
    add_model_args(prune)
    prune.add_argument(
        "--criterion",
        choices=[*CONSTANT, *RANKED],
        default="dead",
        help="dead (default): channels that are 0 on every sample of --data; "
        "constant: channels with one value over --data (that value moves into the "
        "next layer's bias); l1, l2: the smallest kernel norms; bn_scale: "
        "the smallest BatchNormalization |gamma|; apoz: the most zeros over "
        "--data",
    )
    prune.add_argument(
        "--amount",
        metavar="A",
        help="for l1, l2, bn_scale and apoz: a fraction of each group's "
        "channels (0.3, rounded down) or a count per group (4); every group "
        "keeps at least one channel",
    )
    prune.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="prune only the groups whose channels these layers make "
        "(default: every group)",
    )
    prune.add_argument(
        "--no-recalibrate",
        action="store_true",
        help="with a ranking criterion and --data, keep BatchNormalization "
        "statistics as they were instead of re-estimating them on the data",
    )
    add_data_args(prune)
    add_output_args(prune)
    prune.set_defaults(run=run_prune, check=check_prune)


def check_prune(args) -> None:
    """The usage errors of `prune`'s options, before any model or data loads.

    Raises:
        UsageError: `--amount` is malformed or out of range, given to dead
            or constant, or missing for a ranking criterion; or `--data` is
            missing for a criterion that measures (the embedded default
            model has its images).
    """
    criterion = args.criterion
    if criterion in CONSTANT and args.amount is not None:
        raise UsageError(
            f"--criterion {criterion} removes every such channel and takes no "
            "--amount; drop --amount, or rank channels with --criterion l1, "
            "l2, bn_scale or apoz"
        )
    if criterion in RANKED:
        if args.amount is None:
            raise UsageError(
                f"--criterion {criterion} needs --amount: a fraction of each "
                "group's channels (0.3) or a count per group (4)"
            )
        amount(args.amount)
    if criterion in MEASURED and args.data is None and args.model is not None:
        raise UsageError(
            f"--criterion {criterion} measures the channels over data; pass "
            "--data (an image folder, .npy, .npz, .h5, .zarr)"
        )


def amount(text: str) -> float | int:
    """`--amount` as the API takes it: "0.3" a fraction, "4" a count.

    Raises:
        UsageError: `text` is neither a fraction in (0, 1) nor an integer
            of at least 1.
    """
    value: float | int | None = None
    text = text.strip()
    try:
        value = int(text) if re.fullmatch(r"\+?\d+", text) else float(text)
    except ValueError:
        pass
    if isinstance(value, int) and value >= 1:
        return value
    if isinstance(value, float) and 0 < value < 1:
        return value
    count = isinstance(value, float) and value >= 1 and value.is_integer()
    hint = f"; a count is written without a point: {int(value)}" if count else ""
    raise UsageError(
        f"--amount {text}: give a fraction of each group's channels between 0 "
        f"and 1 (0.3) or a count of at least 1 (4){hint}"
    )


def run_prune(args) -> dict:
    import surgery

    check_output(args)
    model = load_model(args)
    data = None
    if args.data is not None or args.model is None:  # the default has its images
        data = open_data(args, model)
    new, report = surgery.prune_channels(
        model,
        amount(args.amount) if args.criterion in RANKED else None,
        args.criterion,
        data=data,
        layers=args.layers,
        recalibrate=not args.no_recalibrate,
        max_samples=args.max_samples,
        verbose=verbosity(args),
    )
    if report.removed == 0:
        _warn(
            f"no channel qualified by --criterion {args.criterion}; "
            f"{args.out} is the model unchanged"
        )
    save_model(new, args.out, force=args.force)
    echo(args, str(report), f"wrote {args.out}")
    return {"out": args.out, **report.as_dict()}


def _warn(text: str) -> None:
    """One warning line on stderr, after the progress line of the last pass."""
    import sys

    from surgery.runtime.progress import close_line

    close_line()
    print(f"surgery: warning: {text}", file=sys.stderr)
