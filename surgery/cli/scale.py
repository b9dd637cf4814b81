"""`--ray [ADDRESS] --workers N --gpus-per-worker G`: a command's pass on Ray.

`--workers` is the data options' flag: decode threads in process, actors
with `--ray`. Their values are checked with the other options
(`surgery.cli.options`); the data is the same `Inputs` for both engines.
"""

from __future__ import annotations


def add_ray_args(parser) -> None:
    group = parser.add_argument_group("Ray (pip install 'surgery[ray]')")
    group.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run the statistics pass on a Ray cluster: ADDRESS (auto, "
        "host:6379, ray://host:10001), else RAY_ADDRESS, else a local one",
    )
    group.add_argument(
        "--gpus-per-worker", type=float, default=0, help="GPUs per actor (with --ray)"
    )


def engine(args):
    """The `RayEngine` the flags ask for, or None for the in-process pass."""
    if args.ray is None:
        return None
    from surgery.engines.ray_engine import RayEngine

    return RayEngine(
        address=args.ray or None,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
    )
