"""`--ray [ADDRESS] --workers N --gpus-per-worker G`: a command's pass on Ray.

`--workers` is the data options' flag: decode threads in process, actors
with `--ray`.
"""

from __future__ import annotations

import os

from surgery.errors import SurgeryError


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
        if args.gpus_per_worker:
            raise SurgeryError("--gpus-per-worker needs --ray")
        return None
    from surgery.engines.ray_engine import RayEngine

    if args.workers is not None and args.workers < 1:
        raise SurgeryError(f"--workers must be >= 1, got {args.workers}")
    if args.gpus_per_worker < 0:
        raise SurgeryError(
            f"--gpus-per-worker must be >= 0, got {args.gpus_per_worker}"
        )
    return RayEngine(
        address=args.ray or None,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
    )


def data_for(args, model, open_data):
    """What the Ray actors read: a data file or parquet by path (each actor
    opens it itself), else the opened source (an image folder's file list,
    with its preprocessing)."""
    path = args.data
    if path is not None and (
        path.endswith(".parquet") or os.path.isfile(path.split(":")[0])
    ):
        return path
    return open_data(args, model)
