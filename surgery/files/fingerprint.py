"""Fingerprints: what a file on disk records of the model and data that made it.

`model_fingerprint` digests a model's weights (statistics files record it);
`architecture_fingerprint` its layers and their configuration;
`describe_source` says in words where data came from; `sample_layout` gives
the per-sample shape and dtype of each input; `RowDigests` digests chosen
samples of a stream of batches, so that the first and the last rows a feature
cache committed can be recomputed cheaply from the data when it resumes.

Digests are of values, dtypes and shapes in order, never of names Keras
generates (`dense_3`), which differ between sessions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import numpy as np

WINDOW = 8  # samples in the head and the tail digests of a data stream
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # in reprs: differs between runs


def model_fingerprint(model) -> str:
    """A digest of a model's weights: values, dtypes and shapes, in order.

    Not of variable paths, which hold auto-generated layer names that differ
    between sessions. Statistics files and feature caches record it.
    """
    import keras

    digest = hashlib.blake2b(digest_size=16)
    for w in model.weights:
        array = np.ascontiguousarray(keras.ops.convert_to_numpy(w.value))
        digest.update(f"{array.dtype}:{array.shape};".encode())
        digest.update(array.data)
    return digest.hexdigest()


def architecture_fingerprint(model) -> str:
    """A digest of a model's layers in order: their kinds and configuration.

    Each layer's own name is left out (Keras generates them), so the same
    architecture built twice has the same digest; a model split at another
    layer, or with another activation or width, has another. The model's
    input and output shapes and dtypes are included.
    """
    digest = hashlib.blake2b(digest_size=16)
    for tensors in (model.inputs, model.outputs):
        for t in tensors:
            digest.update(f"{tuple(t.shape)}:{t.dtype};".encode())
    _digest_layers(model, digest)
    return digest.hexdigest()


def _digest_layers(model, digest) -> None:
    for layer in model.layers:
        digest.update(f"<{type(layer).__module__}.{type(layer).__name__}".encode())
        if hasattr(layer, "layers"):  # a nested model: its layers, not its graph
            _digest_layers(layer, digest)
        else:
            try:
                config = dict(layer.get_config())
            except Exception:  # noqa: BLE001 - a custom layer's config may fail
                config = {}
            config.pop("name", None)
            text = json.dumps(config, sort_keys=True, default=str)
            digest.update(_ADDRESS.sub("", text).encode())
        digest.update(b">")


def describe_source(data: Any) -> str:
    """Where `data` comes from, in a few words: a path, or its kind and shape."""
    if isinstance(data, (str, os.PathLike)):
        return os.path.abspath(os.fspath(data))
    shape = getattr(data, "shape", None)
    kind = type(data).__name__
    if shape is not None:
        return f"{kind} of shape {tuple(shape)}, {getattr(data, 'dtype', '?')}"
    return kind


def sample_layout(x: Any) -> list:
    """Per-sample shape and dtype of each input of a batch, as JSON lists."""
    from keras import tree

    return [[list(a.shape[1:]), str(np.dtype(a.dtype))] for a in _arrays(x, tree)]


def as_recorded(layout: list, recorded: list) -> list:
    """`layout` (this data's `sample_layout`) with each input's dtype replaced
    by the one `recorded` for it, where the samples convert to it exactly
    (integers into a float that holds every one of them).

    Image folders are read as `uint8` pixels; caches written before that
    recorded the same pixels as float32. Comparing layouts and digesting
    samples (`RowDigests(dtypes=...)`) in the recorded dtype keeps those
    caches valid; any other difference in dtype is left for the layout check
    to refuse.
    """
    if len(layout) != len(recorded):
        return layout
    converted = []
    for (shape, dtype), (_, then) in zip(layout, recorded, strict=True):
        now, want = np.dtype(dtype), np.dtype(then)
        exact = now.kind in "iu" and want.kind == "f" and np.can_cast(now, want)
        converted.append([shape, then if exact else dtype])
    return converted


def _arrays(x, tree) -> list:
    arrays = []
    for a in tree.flatten(x):
        try:
            arrays.append(np.asarray(a))
        except Exception:  # noqa: BLE001 - a backend tensor numpy cannot take
            import keras

            arrays.append(keras.ops.convert_to_numpy(a))
    return arrays


class RowDigests:
    """Digests of chosen samples of a stream of batches, by sample index.

    `add(x, start)` hashes, of the batch `x` whose first sample is number
    `start`, only the samples a digest may be asked for: the first `WINDOW`
    of the stream, the last `WINDOW` up to the end of the batch, and the
    last `WINDOW` before `mark` (the rows committed by an earlier run; set
    it to 0 once they are checked).
    `digest(stop)` digests the first and the last `WINDOW` samples before
    sample `stop` (fewer when the stream is shorter). With `dtypes` (one
    per input), each hashed sample is converted to them first (see
    `as_recorded`); None hashes samples as they come.
    """

    def __init__(self, mark: int = 0, dtypes: list | None = None):
        self.mark = mark
        self.dtypes = dtypes
        self.samples: dict[int, bytes] = {}

    def add(self, x: Any, start: int) -> None:
        from keras import tree

        arrays = None
        stop = start + len(tree.flatten(x)[0])
        wanted = [(0, WINDOW), (stop - WINDOW, stop)]
        if self.mark:
            wanted.append((self.mark - WINDOW, self.mark))
        for lo, hi in wanted:
            for i in range(max(lo, start), min(hi, stop)):
                if i in self.samples:
                    continue
                if arrays is None:
                    arrays = _arrays(x, tree)
                self.samples[i] = _sample_digest(arrays, i - start, self.dtypes)
        for i in list(self.samples):
            if WINDOW <= i < stop - WINDOW and not self.mark - WINDOW <= i < self.mark:
                del self.samples[i]

    def digest(self, stop: int) -> dict:
        """`{"rows", "head", "tail"}`: the digests of the samples before `stop`."""
        return {
            "rows": stop,
            "head": self._span(0, min(WINDOW, stop)),
            "tail": self._span(max(0, stop - WINDOW), stop),
        }

    def _span(self, lo: int, hi: int) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for i in range(lo, hi):
            digest.update(self.samples[i])
        return digest.hexdigest()


def _sample_digest(arrays: list, i: int, dtypes: list | None) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for k, a in enumerate(arrays):
        row = np.ascontiguousarray(a[i], dtype=None if dtypes is None else dtypes[k])
        digest.update(f"{row.dtype}:{row.shape};".encode())
        digest.update(row.tobytes())
    return digest.digest()
