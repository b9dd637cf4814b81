"""`surgery stats` and `merge`: activation statistics, sharded over jobs."""

from __future__ import annotations

from surgery.cli import scale
from surgery.cli.common import (
    add_data_args,
    add_model_args,
    echo,
    load_model,
    open_data,
    verbosity,
)
from surgery.cli.outputs import check_output, staged_plot


def add_commands(sub) -> None:
    stats = sub.add_parser(
        "stats",
        help="per-unit activation statistics of layers over data, to .npz",
        description="One streaming pass; `--shard i/N` reads the i-th of N "
        "slices so jobs can split a big data set (join them with `merge`).",
    )
    add_model_args(stats)
    add_data_args(stats, ray=True)
    stats.add_argument(
        "--layers", nargs="+", required=True, help="layers whose outputs to measure"
    )
    stats.add_argument("--before", nargs="+", help="layers whose inputs to measure")
    stats.add_argument("--shard", help="i/N: measure only the i-th of N slices")
    stats.add_argument("--out", required=True, help="output .npz")
    stats.add_argument("--force", action="store_true", help="overwrite --out")
    stats.add_argument("--plot", help="write per-unit histograms to this .png")
    scale.add_ray_args(stats)
    stats.set_defaults(run=run_stats)

    merge = sub.add_parser(
        "merge", help="merge the .npz statistics of shards exactly (Chan's formula)"
    )
    merge.add_argument("files", nargs="+", help="shard .npz files")
    merge.add_argument("--out", required=True, help="output .npz")
    merge.add_argument("--force", action="store_true", help="overwrite --out")
    merge.add_argument(
        "--partial", action="store_true", help="merge even if shards are missing"
    )
    merge.add_argument("--plot", help="write per-unit histograms to this .png")
    merge.set_defaults(run=run_merge)


def run_stats(args) -> dict:
    import surgery
    from surgery.data.sources import parse_shard
    from surgery.files.fingerprint import model_fingerprint
    from surgery.files.statsfile import save_stats

    check_output(args, suffixes=(".npz",))
    shard = parse_shard(args.shard) if args.shard else None
    model = load_model(args)
    engine = scale.engine(args)
    data = open_data(args, model, shard=shard)
    stats = surgery.activation_stats(
        model,
        args.layers,
        data,
        before=args.before,
        batch_size=None if engine is None else args.batch_size,
        max_samples=args.max_samples,
        verbose=verbosity(args),
        engine=engine,
    )
    meta = {"model": model.name, "weights": model_fingerprint(model)}
    meta["data"] = args.data
    if shard is not None:
        meta["shard"] = list(shard)
    with staged_plot(args, stats):
        save_stats(args.out, stats, overwrite=args.force, **meta)
    return _finish(args, stats)


def run_merge(args) -> dict:
    from surgery.files.statsfile import merge_stats, save_stats

    check_output(args, suffixes=(".npz",))
    stats, header = merge_stats(args.files, partial=args.partial)
    meta = {k: v for k, v in header.items() if k not in ("format", "version", "taps")}
    with staged_plot(args, stats):
        save_stats(args.out, stats, overwrite=args.force, **meta)
    return _finish(args, stats)


def _finish(args, stats) -> dict:
    from surgery.verbs import stats_report as report

    rows = report.tap_report(stats)
    echo(args, report.format_report(rows), f"wrote {args.out}")
    return {"out": args.out, "taps": rows}
