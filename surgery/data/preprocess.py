"""`--preprocess` specs: how image pixels (0..255, RGB) become model inputs.

Accepted, besides a `keras.applications` module name (`vgg16`, `resnet50`):

- `module:function`: the user's own function of a float32 batch.
- `caffe`, `tf`, `torch`: Keras' ImageNet modes (`caffe`: RGB to BGR, minus
  the BGR ImageNet means, as VGG16 and ResNet50 were trained).
- arithmetic, applied in this order to each float32 batch:
  `bgr` (reverse the channels), `mean=M` (subtract), `std=S` (divide),
  `scale=A` (multiply), `offset=B` (add). Values are numbers or fractions
  (`1/127.5`); `mean` and `std` take one value or one per channel
  (`mean=103.939,116.779,123.68`). mtcnn's `(x - 127.5) / 128` is
  `mean=127.5,std=128`; `x / 127.5 - 1` is `scale=1/127.5,offset=-1`.
"""

from __future__ import annotations

import re

import numpy as np

from surgery.errors import SurgeryError
from surgery.files import pyref

_MODES = ("caffe", "tf", "torch")
_KEYS = ("mean", "std", "scale", "offset")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def resolve(spec):
    """A callable for `spec`, or `spec` itself (None, callables, module names)."""
    if spec is None or callable(spec) or not isinstance(spec, str):
        return spec
    if pyref.is_reference(spec):
        fn = pyref.resolve(spec, "--preprocess")
        if not callable(fn):
            raise SurgeryError(f"--preprocess {spec!r} is not a function")
        return fn
    if spec in _MODES:
        return _keras_mode(spec)
    if "=" in spec or spec == "bgr":
        return Arithmetic.parse(spec)
    return spec  # a keras.applications module name, checked where it is used


def _keras_mode(mode):
    from keras.applications import imagenet_utils

    def preprocess(batch):
        return imagenet_utils.preprocess_input(batch, mode=mode)

    preprocess.__name__ = f"imagenet_{mode}"
    return preprocess


class Arithmetic:
    """`bgr`, `mean`, `std`, `scale`, `offset` applied in float32, in that order."""

    def __init__(self, bgr=False, mean=None, std=None, scale=None, offset=None):
        self.bgr = bgr
        self.steps = [
            (np.subtract, mean),
            (np.divide, std),
            (np.multiply, scale),
            (np.add, offset),
        ]

    @classmethod
    def parse(cls, spec: str) -> Arithmetic:
        values: dict[str, list[float]] = {}
        flags, key = set(), None
        for token in (t.strip() for t in spec.split(",")):
            name, sep, value = token.partition("=")
            if sep:
                key = name.strip()
                if key not in _KEYS:
                    raise _bad(spec, f"unknown key {key!r}")
                if key in values:
                    raise _bad(spec, f"{key} given twice")
                values[key] = [_number(spec, value)]
            elif token == "bgr":
                flags.add(token)
            elif key in ("mean", "std") and token:
                values[key].append(_number(spec, token))
            else:
                raise _bad(spec, f"unexpected {token!r}")
        for key in ("scale", "offset"):
            if len(values.get(key, ())) > 1:
                raise _bad(spec, f"{key} takes one value")
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in values.items()}
        return cls(bgr="bgr" in flags, **arrays)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.asarray(batch, dtype=np.float32)
        if self.bgr:
            x = x[..., ::-1]
        for op, value in self.steps:
            if value is not None:
                if value.size not in (1, x.shape[-1]):
                    raise SurgeryError(
                        f"--preprocess gives {value.size} values for images with "
                        f"{x.shape[-1]} channels; give 1 or {x.shape[-1]}"
                    )
                x = op(x, value, dtype=np.float32)
        return x


def _number(spec, text) -> float:
    parts = text.strip().split("/")
    if len(parts) > 2 or not all(_NUMBER.fullmatch(p.strip()) for p in parts):
        raise _bad(spec, f"{text!r} is not a number or fraction")
    value = float(parts[0])
    return value / float(parts[1]) if len(parts) == 2 else value


def _bad(spec, why) -> SurgeryError:
    return SurgeryError(
        f"--preprocess {spec!r}: {why}; write e.g. 'scale=1/127.5,offset=-1', "
        "'mean=103.939,116.779,123.68', 'caffe' or 'module:function'"
    )
