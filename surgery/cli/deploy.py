"""`surgery fold` and `recalibrate`: BN folded away, or re-estimated exactly."""

from __future__ import annotations

from surgery.cli import scale
from surgery.cli.common import (
    add_data_args,
    add_model_args,
    add_output_args,
    check_output,
    echo,
    load_model,
    open_data,
    save_model,
    verbosity,
)


def add_commands(sub) -> None:
    fold = sub.add_parser(
        "fold", help="fold BatchNormalization into the preceding Dense/Conv layer"
    )
    add_model_args(fold)
    fold.add_argument("--layers", nargs="+", help="BN layers to fold (default: all)")
    add_data_args(fold)
    add_output_args(fold)
    fold.set_defaults(run=run_fold)

    recalibrate = sub.add_parser(
        "recalibrate", help="recompute BN moving statistics exactly over data"
    )
    add_model_args(recalibrate)
    add_data_args(recalibrate)
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
    import warnings

    import surgery

    model = load_model(args)
    check_output(args)
    reasons = surgery.foldable(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the kept BNs are reported below
        folded = surgery.fold_bn(model, args.layers)
    remaining = _bn_names(folded)
    kept = {path: reasons[path] for path in reasons if path in remaining}
    result = {"out": args.out, "folded": sorted(set(reasons) - remaining)}
    result["kept"] = kept
    lines = [f"kept {path}: {reason}" for path, reason in kept.items()]
    if args.data is not None:
        check = surgery.verify(
            model,
            folded,
            open_data(args, model),
            max_samples=args.max_samples,
            verbose=verbosity(args),
        )
        result.update(check.as_dict())
        lines.append(f"outputs vs the BN model: {check}")
    save_model(folded, args.out)
    n = len(result["folded"])
    echo(args, *lines, f"wrote {args.out}: folded {n} BN, kept {len(kept)}")
    return result


def run_recalibrate(args) -> dict:
    import surgery

    model = load_model(args)
    check_output(args)
    engine = scale.engine(args)
    new = surgery.recalibrate_bn(
        model,
        open_data(args, model)
        if engine is None
        else scale.data_for(args, model, open_data),
        args.layers,
        mode=args.mode,
        batch_size=None if engine is None else args.batch_size,
        max_samples=args.max_samples,
        verbose=verbosity(args),
        engine=engine,
    )
    save_model(new, args.out)
    echo(args, f"wrote {args.out}: {args.mode} BN statistics")
    return {"out": args.out, "mode": args.mode}


def _bn_names(model) -> set[str]:
    import keras

    from surgery.spots import walk_layers

    return {
        path
        for path, op in walk_layers(model)
        if isinstance(op, keras.layers.BatchNormalization)
    }
