"""What every `surgery` command shares: loading models and data, writing outputs."""

from __future__ import annotations

import contextlib
import os

import keras

from surgery.atomic import atomic_path
from surgery.errors import SurgeryError, UsageError

MODEL_SUFFIXES = (".keras", ".weights.h5")


def add_model_args(parser, *, name: str = "model") -> None:
    parser.add_argument(
        name,
        nargs="?",
        help="a .keras/.h5 model, a family name (vgg16) with --weights, or "
        "nothing for the embedded default",
    )
    parser.add_argument("--weights", help="weights file for a model family (vgg16)")
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="allow a Lambda layer's stored code (trusted files only)",
    )


def add_data_args(parser, *, required: bool = False) -> None:
    parser.add_argument(
        "--data",
        required=required,
        help="image folder, .npy, .npz[:name], file.h5:/dataset, .zarr or bcolz "
        "directory (default with the embedded model: its images)",
    )
    parser.add_argument(
        "--preprocess",
        help="keras.applications module whose preprocess_input to apply to "
        "images (vgg16, resnet50, ...; default: the family's, else none)",
    )
    parser.add_argument("--image-size", help="HxW for models without a fixed size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-samples", type=int, help="use only the first N")


def add_output_args(parser, suffixes=MODEL_SUFFIXES) -> None:
    parser.add_argument(
        "--out", required=True, help=f"output file ({' or '.join(suffixes)})"
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out")


def load_model(args, name: str = "model") -> keras.Model:
    """The model an invocation names (the embedded default when none)."""
    from surgery import default, modelio

    path = getattr(args, name)
    if path is None:
        if args.weights:
            raise SurgeryError("--weights needs a family name, e.g. `vgg16`")
        return default.load()
    if args.weights:
        if modelio._file_kind(args.weights) == "model":
            raise UsageError(
                f"{args.weights} is a whole model, not {path} weights: pass it as "
                "the model, without a family name and --weights"
            )
        return modelio.load_model(args.weights, family=path, unsafe=args.unsafe)
    if path in modelio.FAMILIES and not os.path.exists(path):
        raise SurgeryError(f"{path} is a model family: pass --weights FILE for it")
    return modelio.load_model(path, unsafe=args.unsafe)


def open_data(args, model, *, shard=None):
    """The --data source for `model`, read batch by batch."""
    from surgery import default, sources

    path = args.data
    if path is None:
        if getattr(args, "model", None) is not None:
            raise SurgeryError("pass --data: the embedded images fit only its model")
        path = default.images_dir()
    preprocess = args.preprocess
    if preprocess is None and getattr(args, "weights", None):
        preprocess = args.model  # a family name is its keras.applications module
    return sources.open_source(
        path,
        model=model,
        image_size=_image_size(args.image_size),
        preprocess=preprocess,
        batch_size=args.batch_size,
        shard=shard,
    )


def check_output(args, suffixes=MODEL_SUFFIXES) -> None:
    """Refuse a bad, existing or unwritable --out (and --plot) before any work.

    An output may never be one of the command's inputs, nor an image inside
    an input folder (it would be read as data next time), even with --force.
    """
    if not args.out.endswith(suffixes):
        raise UsageError(f"--out must end in {' or '.join(suffixes)}, got {args.out}")
    outputs = [("--out", args.out)]
    plot = getattr(args, "plot", None)
    if plot:
        _check_plot(plot)
        outputs.append(("--plot", plot))
    if len(outputs) == 2 and _same_file(args.out, plot):
        raise UsageError("--out and --plot name the same file; give two paths")
    inputs = _input_paths(args)
    for flag, path in outputs:
        for name in inputs:
            if _same_file(path, name) or _read_from(path, name):
                raise UsageError(
                    f"{flag} {path} is an input of this command ({name}); "
                    "write the output to another path"
                )
        if os.path.lexists(path) and not args.force:
            raise SurgeryError(f"{path} exists; pass --force to overwrite it")
        if os.path.isdir(path):
            raise SurgeryError(f"{flag} {path} is a folder; give a file name")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise SurgeryError(
                f"{flag} folder {folder} does not exist; create it first"
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SurgeryError(
                f"{flag} folder {folder} is not writable; choose another folder"
            )


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _check_plot(path):
    import importlib.util

    if not path.lower().endswith(PLOT_SUFFIXES):
        raise UsageError(f"--plot must end in {', '.join(PLOT_SUFFIXES)}, got {path}")
    if importlib.util.find_spec("matplotlib") is None:
        raise SurgeryError("--plot needs matplotlib: pip install 'surgery[plot]'")


def _input_paths(args) -> list[str]:
    """The files and folders a command reads, as given on its command line."""
    from surgery.sources import _split_key

    names = []
    for attr in ("model", "a", "b", "weights", "stats"):
        value = getattr(args, attr, None)
        if isinstance(value, str):
            names.append(value)
    names += list(getattr(args, "files", None) or [])
    data = getattr(args, "data", None)
    if data:
        names.append(_split_key(data)[0])
    return [name for name in names if os.path.exists(name)]


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _read_from(path: str, folder: str) -> bool:
    """Whether `path` would be read as an image of the input `folder`."""
    from surgery.sources import IMAGE_SUFFIXES

    if not os.path.isdir(folder) or not path.lower().endswith(IMAGE_SUFFIXES):
        return False
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    root = os.path.realpath(folder)
    return os.path.commonpath([parent, root]) == root


def save_model(model: keras.Model, out: str, *, force: bool = False) -> None:
    """Save a whole model (.keras) or its weights (.weights.h5) atomically.

    Without `force` the file is created exclusively: if another run wrote
    `out` meanwhile, its file is kept and this run fails.
    """
    weights_only = out.endswith(".weights.h5")
    with atomic_path(
        out,
        suffix=".weights.h5" if weights_only else ".keras",
        overwrite=force,
        capture_tempfiles=True,
    ) as tmp:
        if weights_only:
            model.save_weights(tmp)
        else:
            model.save(tmp)


def save_outputs(args, model: keras.Model, stats) -> None:
    """Write --out and, when asked, --plot: both, or neither if one fails."""
    with staged_plot(args, stats):
        save_model(model, args.out, force=args.force)


@contextlib.contextmanager
def staged_plot(args, stats):
    """Render --plot to a temporary file, moved into place after the block."""
    plot = getattr(args, "plot", None)
    if not plot:
        yield
        return
    from surgery import report

    with atomic_path(plot, overwrite=args.force) as tmp:
        report.plot_report(stats, tmp)
        yield


def verbosity(args) -> int:
    """Progress bars in text mode; none when the output is JSON."""
    return 1 if args.format == "text" else 0


def echo(args, *lines: str) -> None:
    if args.format == "text":
        for line in lines:
            print(line)


def _image_size(text):
    from surgery.cli.options import image_size

    return image_size(text)
