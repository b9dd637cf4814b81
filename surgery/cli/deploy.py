"""`surgery fold` and `recalibrate`: BN folded away, or re-estimated exactly."""

from __future__ import annotations

from surgery.cli import scale
from surgery.cli.common import (
    add_data_args,
    add_model_args,
    add_output_args,
    compare_on_data,
    echo,
    load_model,
    open_data,
    verbosity,
)
from surgery.cli.outputs import check_output, save_model


def add_commands(sub) -> None:
    fold = sub.add_parser(
        "fold", help="fold BatchNormalization into the preceding Dense/Conv layer"
    )
    add_model_args(fold)
    fold.add_argument("--layers", nargs="+", help="BN layers to fold (default: all)")
    add_data_args(fold)
    add_output_args(fold)
    fold.add_argument(
        "--write-unchanged",
        action="store_true",
        help="write --out even when no BN can be folded (a copy of the model, "
        "with a warning); without it that is an error and nothing is written",
    )
    fold.set_defaults(run=run_fold)

    recalibrate = sub.add_parser(
        "recalibrate", help="recompute BN moving statistics exactly over data"
    )
    add_model_args(recalibrate)
    add_data_args(recalibrate, ray=True)
    recalibrate.add_argument("--layers", nargs="+", help="BN layers (default: all)")
    recalibrate.add_argument(
        "--mode",
        choices=["auto", "exact", "precise"],
        default="auto",
        help="exact: level by level, inference mode; precise: one pass, "
        "earlier BNs on batch statistics; auto (default): exact up to 64 "
        "BN levels",
    )
    add_output_args(recalibrate)
    scale.add_ray_args(recalibrate)
    recalibrate.set_defaults(run=run_recalibrate)


def run_fold(args) -> dict:
    from surgery.errors import SurgeryError
    from surgery.verbs.fold import fold_report

    check_output(args)
    model = load_model(args)
    folded, reasons, left = fold_report(model, args.layers)
    if args.layers and left:
        raise SurgeryError(f"cannot fold '{left[0].path}': {left[0].reason}")
    remaining = _bn_names(folded)
    kept = {path: reasons[path] for path in reasons if path in remaining}
    if kept and len(kept) == len(reasons):
        _nothing_folded(args, kept)
    result = {"out": args.out, "folded": sorted(set(reasons) - remaining)}
    result["kept"], result["how"] = kept, reasons
    lines = [f"kept {path}: {reason}" for path, reason in kept.items()]
    if args.data is not None:
        fields, line = compare_on_data(args, model, folded, "the BN model")
        result.update(fields)
        lines.append(line)
    save_model(folded, args.out, force=args.force)
    n = len(result["folded"])
    echo(args, *lines, f"wrote {args.out}: folded {n} BN, kept {len(kept)}")
    return result


def _nothing_folded(args, kept) -> None:
    """No BN folds: an error naming why, or with --write-unchanged a warning."""
    import sys

    from surgery.errors import SurgeryError

    shown = "; ".join(f"'{path}': {reason}" for path, reason in list(kept.items())[:2])
    more = f"; and {len(kept) - 2} more" if len(kept) > 2 else ""
    why = f"no BatchNormalization layer folds ({shown}{more})"
    if not args.write_unchanged:
        raise SurgeryError(
            f"{why}; nothing was written to {args.out} (pass --write-unchanged "
            "to write the model unchanged)"
        )
    print(f"surgery: warning: {why}; writing the model unchanged", file=sys.stderr)


def run_recalibrate(args) -> dict:
    import sys
    import warnings

    import surgery

    check_output(args)
    model = load_model(args)
    engine = scale.engine(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new, report = surgery.recalibrate_bn(
            model,
            open_data(args, model),
            args.layers,
            mode=args.mode,
            batch_size=None if engine is None else args.batch_size,
            max_samples=args.max_samples,
            verbose=verbosity(args),
            return_report=True,
            engine=engine,
        )
    save_model(new, args.out, force=args.force)
    used = report.mode if args.mode == report.mode else f"{args.mode}: {report.mode}"
    echo(
        args,
        report.table(),
        f"wrote {args.out}: {used} BN statistics over {report.samples} samples",
    )
    for warning in caught:  # the dead units and the auto mode, as one line each
        if not issubclass(warning.category, UserWarning):
            continue  # libraries' deprecation notices are not the user's business
        print(f"surgery: warning: {warning.message}", file=sys.stderr)
    return {"out": args.out, **report.as_dict()}


def _bn_names(model) -> set[str]:
    import keras

    from surgery.graph.spots import walk_layers

    return {
        path
        for path, op in walk_layers(model)
        if isinstance(op, keras.layers.BatchNormalization)
    }
