"""What every `surgery` command shares: loading models and data, writing outputs."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from surgery.cli.options import add_trace_args
from surgery.errors import SurgeryError, UsageError
from surgery.files import pyref

if TYPE_CHECKING:  # the backend loads after parsing: --help answers without it
    import keras

MODEL_SUFFIXES = (".keras", ".weights.h5")
_ARCHITECTURES = (".keras", ".json")


def add_model_args(parser, *, name: str = "model") -> None:
    parser.add_argument(
        name,
        nargs="?",
        help="a .keras/.h5 model, a family name (vgg16) with --weights, "
        "module:function returning a keras.Model (subclassed ones are traced "
        "into Functional models), or nothing for the embedded default",
    )
    parser.add_argument(
        "--weights",
        help="weights file: for a model family (vgg16), or a .weights.h5 for "
        "the architecture in MODEL (.keras, .json or module:function)",
    )
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="allow a Lambda layer's stored code (trusted files only)",
    )
    parser.add_argument(
        "--by-order",
        action="store_true",
        help="match a legacy weights file's layers to the family's by position "
        "(Keras 1 names like convolution2d_1; th kernels are converted)",
    )
    add_trace_args(parser)


def add_data_args(parser, *, required: bool = False, ray: bool = False) -> None:
    """The data options: `--data`, `--preprocess`, `--image-size`,
    `--batch-size`, `--max-samples` and `--workers`.

    Args:
        parser: the `argparse` parser of a command that reads data.
        required: whether `--data` must be given (no embedded images default).
        ray: whether the command also takes `--ray` (`scale.add_ray_args`),
            where `--workers` is the size of the pool of actors; the help
            mentions `--ray` only then.
    """
    parser.add_argument(
        "--data",
        required=required,
        help="image folder, .npy, .npz[:name], file.h5:/dataset, .zarr or bcolz "
        "directory"
        + ("" if required else " (default with the embedded model: its images)"),
    )
    parser.add_argument(
        "--preprocess",
        help="how to preprocess images: a keras.applications module (vgg16, "
        "resnet50, ...), caffe/tf/torch, 'scale=1/127.5,offset=-1', "
        "'mean=103.939,116.779,123.68[,std=...]' (bgr flips channels), or "
        "module:function (default: the family's, else none)",
    )
    parser.add_argument("--image-size", help="HxW for models without a fixed size")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="samples per batch for image folders and arrays (default: 32)",
    )
    parser.add_argument("--max-samples", type=int, help="use only the first N")
    workers = (
        "threads decoding image folders (default: one per available core, plus one)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help=workers + ("; with --ray, actors in the pool" if ray else ""),
    )


def add_output_args(parser, suffixes=MODEL_SUFFIXES) -> None:
    """`--out` (a file with one of `suffixes`) and `--force` (overwrite it).

    Args:
        parser: the `argparse` parser of a command that writes a file.
        suffixes: the endings `--out` may have, named in its help.
    """
    parser.add_argument(
        "--out", required=True, help=f"output file ({' or '.join(suffixes)})"
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out")


def load_model(args, name: str = "model") -> keras.Model:
    """The model an invocation names (the embedded default when none).

    A subclassed model (from `module:function`, or a `.keras` file of a
    registered class) is traced into a Functional one, and the user is told.
    """
    from surgery import default
    from surgery.files import models as modelio

    path = getattr(args, name)
    if path is None:
        if args.weights:
            raise SurgeryError(
                "--weights needs the model they belong to: a family name "
                "(vgg16), an architecture .json/.keras, or module:function"
            )
        return as_graph(args, default.load())
    if args.weights and (pyref.is_reference(path) or path.endswith(_ARCHITECTURES)):
        architecture = path
        if pyref.is_reference(path):
            architecture = _built(args, _python_model(path))
        model = modelio.load_with_architecture(
            architecture, args.weights, unsafe=args.unsafe
        )
    elif pyref.is_reference(path):
        model = _python_model(path)
    elif args.weights:
        if modelio.file_kind(args.weights) == "model":
            raise UsageError(
                f"{args.weights} is a whole model, not {path} weights: pass it as "
                "the model, without a family name and --weights"
            )
        model = modelio.load_model(
            args.weights,
            family=path,
            unsafe=args.unsafe,
            by_order=getattr(args, "by_order", False),
        )
    elif path in modelio.FAMILIES and not os.path.exists(path):
        raise SurgeryError(f"{path} is a model family: pass --weights FILE for it")
    else:
        model = modelio.load_model(path, unsafe=args.unsafe)
    return as_graph(args, model)


def as_graph(args, model: keras.Model) -> keras.Model:
    """`model`, traced into a Functional model first when it is subclassed
    (with `--input-shape` when given, else the shape it was built with).

    Args:
        args: the parsed command line (`input_shape`, `format`; the note is
            appended to `args.notes`).
        model: the loaded model.

    Returns:
        `model` itself when it is Functional or Sequential, else its trace.

    Raises:
        SurgeryError: `--input-shape` names another shape than a Functional
            model's own, or the subclassed model cannot be traced.
    """
    from surgery.cli.options import check_graph_shape, input_shape
    from surgery.graph.tracing import functional, is_subclassed

    text = getattr(args, "input_shape", None)
    shape = input_shape(text)
    if not is_subclassed(model):
        check_graph_shape(model, text)
        return model
    traced = functional(model, input_shape=shape)
    note = (
        f"traced subclassed model '{model.name}' ({type(model).__name__}) into a "
        f"Functional model of {len(traced.layers)} layers (outputs bit-identical)"
    )
    args.notes = [*getattr(args, "notes", []), note]  # JSON output lists them
    echo(args, note)
    return traced


def _built(args, model: keras.Model) -> keras.Model:
    """`model`; if subclassed without weights yet, traced once to build them."""
    from surgery.cli.options import input_shape
    from surgery.graph.tracing import functional, is_subclassed

    if is_subclassed(model) and not model.weights:
        functional(model, input_shape=input_shape(args.input_shape), check=False)
        model.built = True  # every layer is: a .weights.h5 now loads into it
    return model


def _python_model(reference):
    import keras

    value = pyref.resolve(reference, "model")
    if callable(value) and not isinstance(value, keras.Model):
        value = value()
    if not isinstance(value, keras.Model):
        raise SurgeryError(
            f"model {reference!r} is a {type(value).__name__}, not a keras.Model "
            "(or a function returning one)"
        )
    return value


def open_data(args, model, *, shard=None):
    """The --data for `model`, opened once: every engine and pass reads it."""
    from surgery import default
    from surgery.data import preprocess
    from surgery.data.inputs import open_inputs

    path = args.data
    if path is None:
        if getattr(args, "model", None) is not None:
            raise SurgeryError("pass --data: the embedded images fit only its model")
        path = default.images_dir()
    spec = args.preprocess
    if spec is None and getattr(args, "weights", None):
        spec = args.model  # a family name is its keras.applications module
    return open_inputs(
        path,
        model=model,
        image_size=_image_size(args.image_size),
        preprocess=preprocess.resolve(spec),
        batch_size=args.batch_size,
        shard=shard,
        workers=args.workers,
    )


def compare_on_data(args, model, new, versus: str) -> tuple[dict, str]:
    """`verify` of `new` against `model` on --data: its fields and its line."""
    import surgery

    check = surgery.verify(
        model,
        new,
        open_data(args, model),
        max_samples=args.max_samples,
        verbose=verbosity(args),
    )
    return check.as_dict(), f"outputs vs {versus}: {check}"


def verbosity(args) -> int:
    """Progress bars in text mode; none when the output is JSON."""
    return 1 if args.format == "text" else 0


def echo(args, *lines: str) -> None:
    if args.format == "text":
        from surgery.runtime.progress import close_line

        close_line()
        for line in lines:
            print(line)


def _image_size(text):
    from surgery.cli.options import image_size

    return image_size(text)
