"""`surgery convert`, `insert` and `verify`: make and check identity-BN models."""

from __future__ import annotations

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
from surgery.errors import SurgeryError
from surgery.spots import CONV_LAYERS, layer_paths

DEFAULT_AFTER = ("fc1", "fc2")


def add_commands(sub) -> None:
    convert = sub.add_parser(
        "convert",
        help="measure activations, insert identity BN, verify and save",
        description="Insert BatchNormalization that leaves the outputs "
        "bit-identical. Default insertion points: after fc1 and fc2.",
    )
    add_model_args(convert)
    add_data_args(convert)
    _add_spot_args(convert)
    convert.add_argument(
        "--conv", action="store_true", help="also insert BN after every conv layer"
    )
    add_output_args(convert)
    convert.add_argument("--plot", help="write per-unit histograms to this .png")
    convert.set_defaults(run=run_convert)

    insert = sub.add_parser(
        "insert", help="insert identity BN from a statistics file (no data pass)"
    )
    add_model_args(insert)
    insert.add_argument("--stats", required=True, help=".npz from `surgery stats`")
    _add_spot_args(insert, default="every tap in --stats")
    add_output_args(insert)
    insert.set_defaults(run=run_insert)

    verify = sub.add_parser("verify", help="compare two models' outputs on data")
    verify.add_argument("a", help="reference model")
    verify.add_argument("b", help="model to check against it")
    verify.add_argument("--unsafe", action="store_true")
    add_data_args(verify, required=True)
    verify.add_argument(
        "--max-ulp",
        type=int,
        default=0,
        help="pass when no output is more than this many ulps off (default 0)",
    )
    verify.set_defaults(run=run_verify, weights=None)


def _add_spot_args(parser, default="fc1 and fc2") -> None:
    parser.add_argument(
        "--after", action="append", help=f"layer to follow with BN (default: {default})"
    )
    parser.add_argument("--before", action="append", help="layer to precede with BN")
    parser.add_argument("--epsilon", type=float, default=1e-3)
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument(
        "--zero-mean",
        action="store_true",
        help="moving mean and beta 0: bit-identical on the torch backend too",
    )


def run_convert(args) -> dict:
    import surgery
    from surgery import report as reports

    model = load_model(args)
    check_output(args)
    after = list(args.after or [])
    if args.conv:
        after += layer_paths(model, CONV_LAYERS)
    if not after and not args.before:
        after = list(DEFAULT_AFTER)
    data = open_data(args, model)
    stats = surgery.activation_stats(
        model,
        after or None,
        data,
        before=args.before,
        max_samples=args.max_samples,
        verbose=verbosity(args),
    )
    new = surgery.insert_identity_bn(
        model,
        after=after or None,
        before=args.before,
        stats=stats,
        epsilon=args.epsilon,
        momentum=args.momentum,
        zero_mean=args.zero_mean,
    )
    check = surgery.verify(
        model, new, data, max_samples=args.max_samples, verbose=verbosity(args)
    )
    save_model(new, args.out)
    rows = reports.tap_report(stats)
    if args.plot:
        reports.plot_report(stats, args.plot)
    echo(args, reports.format_report(rows), f"wrote {args.out}", str(check))
    return {"out": args.out, "taps": rows, **check.as_dict(), "ok": check.identical}


def run_insert(args) -> dict:
    import surgery
    from surgery.statsfile import load_stats

    model = load_model(args)
    check_output(args)
    stats, _ = load_stats(args.stats)
    after, before = args.after, args.before
    if not after and not before:
        after = [k for k in stats if not k.endswith(":input")]
        before = [k[: -len(":input")] for k in stats if k.endswith(":input")]
    new = surgery.insert_identity_bn(
        model,
        after=after or None,
        before=before or None,
        stats=stats,
        epsilon=args.epsilon,
        momentum=args.momentum,
        zero_mean=args.zero_mean,
    )
    save_model(new, args.out)
    spots = [*(after or []), *(f"{name}:input" for name in before or [])]
    echo(args, f"wrote {args.out}: identity BN at {', '.join(spots)}")
    return {"out": args.out, "after": after or [], "before": before or []}


def run_verify(args) -> dict:
    import surgery
    from surgery import modelio

    a = modelio.load_model(args.a, unsafe=args.unsafe)
    b = modelio.load_model(args.b, unsafe=args.unsafe)
    args.model = args.a  # the data is for A: no embedded images default
    check = surgery.verify(
        a, b, open_data(args, a), max_samples=args.max_samples, verbose=verbosity(args)
    )
    if args.max_ulp < 0:
        raise SurgeryError(f"--max-ulp must be >= 0, got {args.max_ulp}")
    ok = check.identical or check.max_ulp_diff <= args.max_ulp
    echo(args, str(check))
    return {**check.as_dict(), "ok": ok}
