"""`surgery convert`, `insert` and `verify`: make and check identity-BN models."""

from __future__ import annotations

from surgery.cli import scale
from surgery.cli.common import (
    add_data_args,
    add_model_args,
    add_output_args,
    echo,
    load_model,
    open_data,
    verbosity,
)
from surgery.cli.outputs import check_output, save_model, save_outputs
from surgery.errors import SurgeryError

# Where BN goes when no spot is named, per family (None: the embedded default).
DEFAULT_AFTER = {None: ("fc1", "fc2"), "vgg16": ("fc1", "fc2")}


def add_commands(sub) -> None:
    convert = sub.add_parser(
        "convert",
        help="measure activations, insert identity BN, verify and save",
        description="Insert BatchNormalization that leaves the outputs "
        "bit-identical. Default insertion points: after fc1 and fc2.",
    )
    add_model_args(convert)
    add_data_args(convert, ray=True)
    _add_spot_args(convert)
    convert.add_argument(
        "--conv",
        action="store_true",
        help="also insert BN after every conv layer (a shortcut for --after "
        "Conv1D,Conv2D,...)",
    )
    convert.add_argument(
        "--verify-samples",
        type=int,
        help="verify on the first N samples only (default: all)",
    )
    add_output_args(convert)
    convert.add_argument("--plot", help="write per-unit histograms to this .png")
    _add_max_ulp_arg(convert, "write the model")
    _add_mode_arg(convert)
    scale.add_ray_args(convert)
    convert.set_defaults(run=run_convert)

    insert = sub.add_parser(
        "insert", help="insert identity BN from a statistics file (no data pass)"
    )
    add_model_args(insert)
    insert.add_argument("--stats", required=True, help=".npz from `surgery stats`")
    _add_spot_args(insert, default="every tap in --stats")
    add_output_args(insert)
    insert.set_defaults(run=run_insert)

    verify = sub.add_parser(
        "verify",
        help="compare two models' outputs on data",
        description="Compare model B's outputs with reference model A's on "
        "--data, batch by batch. A is read as every command reads its model "
        "(a file, a family with --weights, module:function, or nothing for the "
        "embedded default); B is a model file, e.g. the one convert wrote (a "
        ".weights.h5 with its .json beside it).",
    )
    add_model_args(verify, name="a")
    _set_help(
        verify,
        a="reference model A: a .keras/.h5 model, a family name (vgg16) with "
        "--weights, module:function returning a keras.Model, or nothing for "
        "the embedded default",
        weights="weights file of A: for a model family (vgg16), or a "
        ".weights.h5 for the architecture A names (.keras, .json or "
        "module:function)",
        by_order="match A's legacy weights file's layers to the family's by "
        "position (Keras 1 names like convolution2d_1; th kernels are converted)",
    )
    verify.add_argument(
        "b",
        help="model B to check against A: a .keras/.h5 model file, or a "
        ".weights.h5 with its .json beside it (as convert writes them)",
    )
    add_data_args(verify, required=True)
    _add_max_ulp_arg(verify, "pass")
    _add_mode_arg(verify)
    verify.set_defaults(run=run_verify)


def _set_help(parser, **texts) -> None:
    """Replace the help of `parser`'s arguments, by destination."""
    for action in parser._actions:
        if action.dest in texts:
            action.help = texts[action.dest]


def _add_max_ulp_arg(parser, action: str) -> None:
    parser.add_argument(
        "--max-ulp",
        type=int,
        default=0,
        help=f"{action} when no output is more than this many ulps off "
        "(default 0: bit-identical)",
    )


def within_ulp(check, max_ulp: int) -> bool:
    """Identical, or every output within `max_ulp` ulps and none NaN/inf apart."""
    return check.within(max_ulp)


def _add_mode_arg(parser) -> None:
    parser.add_argument(
        "--mode",
        choices=["auto", "eager", "graph", "xla"],
        default="auto",
        help="how the models run when compared: eager, compiled (graph), "
        "compiled with XLA, or auto: as predict runs on this machine",
    )


def _add_spot_args(parser, default="fc1 and fc2 for vgg16") -> None:
    parser.add_argument(
        "--after",
        action="append",
        help="layers or layer types to follow with BN, comma-separated "
        f"(fc1,fc2 or Conv2D,Dense; default: {default})",
    )
    parser.add_argument("--before", action="append", help="layer to precede with BN")
    parser.add_argument(
        "--epsilon",
        type=float,
        default=1e-3,
        help="the new BN layers' epsilon, > 0; the identity is exact for any "
        "value (default: 1e-3, Keras' default)",
    )
    parser.add_argument(
        "--momentum",
        type=float,
        default=0.99,
        help="the new BN layers' momentum, in [0, 1]; it matters only once the "
        "model is trained (default: 0.99, Keras' default)",
    )
    parser.add_argument(
        "--zero-mean",
        action="store_true",
        help="moving mean and beta 0: bit-identical on the torch backend too",
    )


def run_convert(args) -> dict:
    import surgery
    from surgery.graph.spots import CONV_LAYERS, layer_paths
    from surgery.verbs import stats_report as reports

    check_output(args)
    model = load_model(args)
    after = expand_spots(model, args.after)
    if args.conv:
        after += [p for p in layer_paths(model, CONV_LAYERS) if p not in after]
    if not after and not args.before:
        after = default_after(args, model)
    engine = scale.engine(args)
    if engine is None and args.mode == "auto":
        result = surgery.convert(
            model,
            after=after or None,
            before=args.before,
            data=open_data(args, model),
            verify_samples=args.verify_samples,
            epsilon=args.epsilon,
            momentum=args.momentum,
            zero_mean=args.zero_mean,
            max_samples=args.max_samples,
            verbose=verbosity(args),
        )
    else:
        result = _convert_in_three_passes(args, model, after, engine)
    check = result.report
    rows = reports.tap_report(result.stats)
    if not within_ulp(check, args.max_ulp):
        echo(args, reports.format_report(rows), str(check))
        raise SurgeryError(
            f"the BN model's outputs differ from the original's ({check}); "
            f"nothing was written to {args.out}{_torch_hint(args, check)}"
        )
    save_outputs(args, result.model, result.stats)
    passes = [f"pass {i}, {p}" for i, p in enumerate(result.passes, start=1)]
    echo(
        args,
        reports.format_report(rows),
        *passes,
        f"rebuild: {result.rebuild_seconds:.2f} s",
        f"wrote {args.out}",
        str(check),
    )
    return {
        "out": args.out,
        "taps": rows,
        **check.as_dict(),
        "passes": [
            {"name": p.name, "seconds": p.seconds, "samples": p.samples}
            for p in result.passes
        ],
        "rebuild_seconds": result.rebuild_seconds,
        "ok": True,
    }


def _torch_hint(args, check) -> str:
    import keras

    if keras.backend.backend() != "torch" or args.zero_mean:
        return ""
    return (
        "; Keras' torch BN computes (x - mean) * inv + beta, which rounds with "
        "the measured mean: pass --zero-mean for bit-identical outputs, or "
        f"--max-ulp {check.max_ulp_diff} to keep the measured mean"
    )


def _convert_in_three_passes(args, model, after, engine):
    """Statistics (on Ray when asked), insert, then `verify` in `--mode`.

    The fused two-pass path compares in the mode `predict` uses; another
    `--mode`, or a Ray statistics pass, takes this one.
    """
    import time

    import surgery
    from surgery.verbs.convert import Conversion, Pass

    data = open_data(args, model)
    start = time.perf_counter()
    stats = surgery.activation_stats(
        model,
        after or None,
        data,
        before=args.before,
        batch_size=None if engine is None else args.batch_size,
        max_samples=args.max_samples,
        verbose=verbosity(args),
        engine=engine,
    )
    stats_pass = Pass("statistics", time.perf_counter() - start, None)
    start = time.perf_counter()
    new = surgery.insert_identity_bn(
        model,
        after=after or None,
        before=args.before,
        # checked on the first batch in the mode it is verified in
        data=data if engine is None else None,
        stats=stats,
        epsilon=args.epsilon,
        momentum=args.momentum,
        zero_mean=args.zero_mean,
        check=args.mode,
    )
    rebuild = time.perf_counter() - start
    start = time.perf_counter()
    check = surgery.verify(
        model,
        new,
        data,
        max_samples=args.verify_samples or args.max_samples,
        verbose=verbosity(args),
        mode=args.mode,
    )
    verify_pass = Pass(
        f"verification ({check.mode} mode)", time.perf_counter() - start, check.samples
    )
    return Conversion(new, stats, check, (stats_pass, verify_pass), rebuild)


def run_insert(args) -> dict:
    import surgery
    from surgery.files.statsfile import check_stats_model, load_stats

    check_output(args)
    model = load_model(args)
    stats, header = load_stats(args.stats)
    check_stats_model(header, model, args.stats)
    after, before = expand_spots(model, args.after), args.before
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
    save_model(new, args.out, force=args.force)
    spots = [*(after or []), *(f"{name}:input" for name in before or [])]
    echo(args, f"wrote {args.out}: identity BN at {', '.join(spots)}")
    return {"out": args.out, "after": after or [], "before": before or []}


def run_verify(args) -> dict:
    import argparse

    import surgery

    a = load_model(args, "a")
    # --weights and --by-order are A's; B is a model file read on its own
    b_args = argparse.Namespace(**{**vars(args), "weights": None, "by_order": False})
    b = load_model(b_args, "b")
    if getattr(b_args, "notes", None):  # A's notes, then B's
        args.notes = b_args.notes
    args.model = args.a  # the data is for A: no embedded images default
    check = surgery.verify(
        a,
        b,
        open_data(args, a),
        max_samples=args.max_samples,
        verbose=verbosity(args),
        mode=args.mode,
    )
    ok = within_ulp(check, args.max_ulp)
    echo(args, str(check), f"within {args.max_ulp} ulp: {ok}")
    return {**check.as_dict(), "max_ulp": args.max_ulp, "within_ulp": ok, "ok": ok}


def expand_spots(model, specs) -> list[str]:
    """`--after` values: comma-separated layer paths or layer type names.

    A name that is no layer of the model but a `keras.layers` class stands for
    every layer of that type (`Conv2D,Dense`), nested models included.
    """
    import keras

    from surgery.graph.spots import all_paths, layer_paths

    paths = set(all_paths(model))
    found = []
    for spec in specs or []:
        for name in filter(None, (part.strip() for part in spec.split(","))):
            kind = getattr(keras.layers, name, None)
            if name not in paths and isinstance(kind, type):
                matches = layer_paths(model, kind)
                if not matches:
                    raise SurgeryError(
                        f"--after {name}: model '{model.name}' has no {name} layer"
                    )
            else:
                matches = [name]
            found += [m for m in matches if m not in found]
    return found


def default_after(args, model) -> list[str]:
    """The family's default spots, or an error listing the candidates."""
    from surgery.cli.inspect import layer_rows

    family = args.model if args.weights or args.model is None else "a file"
    defaults = DEFAULT_AFTER.get(family, ())
    rows = [row for row in layer_rows(model) if row["insertable"]]
    paths = [row["path"] for row in rows]
    if defaults and all(name in paths for name in defaults):
        return list(defaults)
    listed = ", ".join(f"{r['path']} ({r['type']}, {r['units']})" for r in rows[:8])
    more = f" and {len(rows) - 8} more" if len(rows) > 8 else ""
    raise SurgeryError(
        f"model '{model.name}' has no default insertion points; pass --after "
        f"(names or types, e.g. --after Conv2D,Dense) or --before; candidates: "
        f"{listed + more or 'none'} (see `surgery inspect`)"
    )
