"""`surgery` command line: convert a model to its identity-BN version.

Exit codes: 0 ok, 1 failure (a one-line message; --debug for the traceback),
2 usage error (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from surgery.errors import SurgeryError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = args.run(args)
    except (SurgeryError, OSError) as e:
        if args.debug:
            raise
        print(f"surgery: error: {e}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(result))
    return 0


def _parser():
    parser = argparse.ArgumentParser(
        prog="surgery", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    sub = parser.add_subparsers(required=True)

    convert = sub.add_parser("convert", help="insert identity BN and save the model")
    convert.add_argument(
        "model",
        nargs="?",
        help="a .keras/.h5 model, a family "
        "name (vgg16) with --weights, or nothing for the embedded default",
    )
    convert.add_argument("--weights", help="weights file for a model family")
    convert.add_argument(
        "--data",
        help="image folder or .npy file (default: the embedded default's images)",
    )
    convert.add_argument("--after", action="append", help="layer to follow with BN")
    convert.add_argument("--before", action="append", help="layer to precede with BN")
    convert.add_argument("--out", required=True, help="output .keras file")
    convert.add_argument("--force", action="store_true", help="overwrite --out")
    convert.add_argument("--unsafe", action="store_true", help="allow Lambda code")
    convert.add_argument("--batch-size", type=int, default=32)
    convert.add_argument("--max-samples", type=int)
    convert.set_defaults(run=_convert)

    verify = sub.add_parser("verify", help="compare two models' outputs on data")
    verify.add_argument("a")
    verify.add_argument("b")
    verify.add_argument("--data", required=True)
    verify.add_argument("--unsafe", action="store_true")
    verify.set_defaults(run=_verify)
    return parser


def _convert(args):
    import surgery
    from surgery import default, modelio

    if args.model is None:
        model = default.load()
    elif args.weights:
        model = modelio.load_model(args.weights, family=args.model, unsafe=args.unsafe)
    else:
        model = modelio.load_model(args.model, unsafe=args.unsafe)
    if os.path.exists(args.out) and not args.force:
        raise SurgeryError(f"{args.out} exists; pass --force to overwrite it")
    if not args.out.endswith(".keras"):
        raise SurgeryError(f"--out must end in .keras, got {args.out}")
    after = args.after or (None if args.before else ["fc1", "fc2"])
    data = load_data(args.data or default.images_dir(), model)
    new = surgery.insert_identity_bn(
        model,
        after=after,
        before=args.before,
        data=data,
        max_samples=args.max_samples,
        verbose=1 if args.format == "text" else 0,
    )
    report = surgery.verify(model, new, data, verbose=0)  # datasets re-iterate
    _save_atomically(new, args.out)
    if args.format == "text":
        print(
            f"wrote {args.out}: BN {', '.join(after or [])} {', '.join(args.before or [])}".strip()
        )
        print(report)
    return {"out": args.out, **report.as_dict()}


def _verify(args):
    import surgery
    from surgery import modelio

    a = modelio.load_model(args.a, unsafe=args.unsafe)
    b = modelio.load_model(args.b, unsafe=args.unsafe)
    report = surgery.verify(a, b, load_data(args.data, a), verbose=0)
    if args.format == "text":
        print(report)
    return report.as_dict()


def load_data(path: str, model):
    """An image folder (class sub-folders or flat) or a memory-mapped .npy."""
    if path.endswith(".npy"):
        return np.load(path, mmap_mode="r")
    if not os.path.isdir(path):
        raise SurgeryError(f"--data {path}: not an image folder or .npy file")
    import keras

    height, width = model.inputs[0].shape[1:3]
    if height is None or width is None:
        raise SurgeryError("the model has no fixed image size; pass --data as .npy")
    return keras.utils.image_dataset_from_directory(
        path, labels=None, image_size=(height, width), shuffle=False, verbose=False
    )


def _save_atomically(model, out):
    folder = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(suffix=".keras", dir=folder)
    os.close(fd)
    try:
        model.save(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


if __name__ == "__main__":
    sys.exit(main())
