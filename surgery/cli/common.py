"""What every `surgery` command shares: loading models and data, writing outputs."""

from __future__ import annotations

import os
import re

import keras

from surgery.atomic import atomic_path
from surgery.errors import SurgeryError

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
    parser.add_argument(
        "--workers",
        type=int,
        help="threads decoding image folders (default: every available core)",
    )


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
        workers=args.workers,
    )


def check_output(args, suffixes=MODEL_SUFFIXES) -> None:
    """Refuse a bad or existing --out before any work is done."""
    if not args.out.endswith(suffixes):
        raise SurgeryError(f"--out must end in {' or '.join(suffixes)}, got {args.out}")
    if os.path.exists(args.out) and not args.force:
        raise SurgeryError(f"{args.out} exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise SurgeryError(f"--out folder {folder} does not exist; create it first")


def save_model(model: keras.Model, out: str) -> None:
    """Save a whole model (.keras) or its weights (.weights.h5) atomically."""
    weights_only = out.endswith(".weights.h5")
    with atomic_path(out, suffix=".weights.h5" if weights_only else ".keras") as tmp:
        if weights_only:
            model.save_weights(tmp)
        else:
            model.save(tmp)


def verbosity(args) -> int:
    """Progress bars in text mode; none when the output is JSON."""
    return 1 if args.format == "text" else 0


def echo(args, *lines: str) -> None:
    if args.format == "text":
        for line in lines:
            print(line)


def _image_size(text):
    if text is None:
        return None
    match = re.fullmatch(r"(\d+)[x,](\d+)", text.strip())
    if match is None:
        raise SurgeryError(f"--image-size {text!r}: write it as HxW, e.g. 224x224")
    return int(match[1]), int(match[2])
