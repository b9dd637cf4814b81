"""Input batches from anything `model.predict` accepts, one at a time.

`model.predict` concatenates every batch's outputs, which is what a
statistics pass must never do. This module reuses Keras' own data adapters
(arrays, memmaps, `tf.data`, `PyDataset`, generators, multi-input lists and
dicts) but hands the batches over one by one, so a pass over the data keeps
only the current batch in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from keras import backend, tree
from keras.src.trainers.data_adapters import get_data_adapter
from keras.utils import Progbar, unpack_x_y_sample_weight

from surgery.data.inputs import is_array_like, open_inputs
from surgery.errors import SurgeryError, first_line, quoted
from surgery.runtime.progress import active, quiet_retracing
from surgery.validate import check_data_array, check_max_samples


class Batches:
    """The model inputs of `data`, batch by batch, labels dropped.

    Args:
        data: what `model.predict` accepts as `x`; `(x, y)` and `(x, y, w)`
            tuples from datasets and generators are fine, labels are ignored.
            Paths and on-disk arrays are opened by `surgery.data.sources`; an
            `Inputs` (`surgery.data.inputs`) is read as it was opened.
        batch_size: samples per batch for array inputs (default 32, as
            `predict`); datasets, generators and `PyDataset`s batch themselves.
        steps: stop after this many batches.
        max_samples: stop after this many samples (the last batch is cut).
        model: the model the data feeds; image folders take its input size.
        labels: yield `(x, y)` pairs instead (`y` is None where the data
            has no labels), e.g. to measure accuracy.
    """

    def __init__(
        self,
        data: Any,
        *,
        batch_size: int | None = None,
        steps: int | None = None,
        max_samples: int | None = None,
        model=None,
        labels: bool = False,
    ):
        check_max_samples(max_samples)
        self.labels = labels
        inputs = open_inputs(data, model=model, batch_size=batch_size, labels=labels)
        if inputs.parquet:
            raise SurgeryError(
                f"{quoted(inputs.path)} is parquet, which only the Ray engine reads; "
                "pass engine='ray' (CLI: --ray), or convert it to .npy"
            )
        data = inputs.data
        self._data = data
        x, y = data, None
        if labels and isinstance(data, tuple) and is_array_like(data[0]):
            x, y = data[0], data[1] if len(data) > 1 else None
            self._data = x
        try:
            self._adapter = get_data_adapter(
                x=x, y=y, batch_size=batch_size, steps_per_epoch=steps, shuffle=False
            )
        except ValueError as e:
            raise SurgeryError(f"cannot read data: {first_line(e)}") from None
        self.steps = steps
        self.max_samples = max_samples
        self._is_tf_dataset = type(self._adapter).__name__ == "TFDatasetAdapter"

    @property
    def num_batches(self) -> int | None:
        """Batches in one pass, or None when the source does not say."""
        n = self._adapter.num_batches
        if self.steps is not None:
            n = self.steps if n is None else min(n, self.steps)
        return n

    @property
    def num_samples(self) -> int | None:
        """Samples in one pass, when the source says (arrays, files)."""
        n = getattr(self._data, "num_samples", None)
        if n is None and is_array_like(tree.flatten(self._data)[0]):
            n = int(tree.flatten(self._data)[0].shape[0])
        if n is None or self.steps is not None:
            return None
        return n if self.max_samples is None else min(n, self.max_samples)

    def __iter__(self) -> Iterator[Any]:
        seen = 0
        self._adapter.on_epoch_begin()
        try:
            for step, data in enumerate(self._raw_iterator()):
                if self.steps is not None and step >= self.steps:
                    break
                x, y, _ = unpack_x_y_sample_weight(data)
                check_batch_values(x)
                n = batch_length(x)
                item = (x, y) if self.labels else x
                if self.max_samples is not None and seen + n >= self.max_samples:
                    keep = self.max_samples - seen
                    if keep > 0:
                        yield tree.map_structure(
                            lambda a, k=keep: a if a is None else a[:k], item
                        )
                    return
                seen += n
                yield item
        finally:
            self._adapter.on_epoch_end()

    def _raw_iterator(self):
        if self._is_tf_dataset and backend.backend() == "tensorflow":
            return iter(self._adapter.get_tf_dataset())
        return self._adapter.get_numpy_iterator()


def first_batch(model, data: Any, batch_size: int | None = None) -> Any:
    """The first batch of `data` as `model` would get it, or None if empty."""
    for x in Batches(data, model=model, batch_size=batch_size, steps=1):
        return x
    return None


def batch_length(x: Any) -> int:
    """Number of samples in one batch of model inputs."""
    first = tree.flatten(x)[0]
    return int(first.shape[0])


def progress(batches: Batches, verbose: int | str = "auto", phase: str = "pass"):
    """Iterate `batches` under a Keras progress bar (none with verbose=0).

    Inside `surgery.runtime.progress.one_bar()` (every CLI command) the pass is a
    phase of the command's one bar instead.
    """
    with quiet_retracing():
        shared = active()
        if shared is not None:
            shared.start(phase, batches.num_batches)
            for x in batches:
                yield x
                shared.step(batch_length(x))
            return
        verbose = 1 if verbose == "auto" else int(verbose)
        bar = Progbar(batches.num_batches, verbose=verbose) if verbose else None
        for step, x in enumerate(batches, start=1):
            yield x
            if bar is not None:
                bar.update(step)
        if bar is not None and batches.num_batches is None:
            bar.update(bar._seen_so_far, finalize=True)


def check_inputs(model, x: Any) -> None:
    """Fail with one line when a batch does not fit the model's inputs."""
    expected = tree.flatten(model.inputs)
    try:
        given = _flatten_like_model(model, x)
    except (ValueError, TypeError, KeyError):
        given = None
    if given is None or len(given) != len(expected):
        names = [input_name(t) for t in expected]
        raise SurgeryError(
            f"data does not match the model inputs {names}: give "
            f"{len(expected)} input array(s) in the model's input structure"
        )
    for tensor, array in zip(expected, given, strict=True):
        want, got = tuple(tensor.shape), tuple(array.shape)
        if not shape_fits(want, got):
            raise SurgeryError(
                f"data has shape {got} but model input '{input_name(tensor)}' expects "
                f"{want} (None = any size); reshape or resize the data"
            )


def input_name(tensor) -> str:
    """A model input's name as the user knows it: its `keras.Input(name=)`,
    else its input layer's name (a traced model's tensors are `keras_tensor_N`)."""
    if not re.fullmatch(r"keras_tensor(_\d+)?", tensor.name):
        return tensor.name
    history = getattr(tensor, "_keras_history", None)
    layer = getattr(history, "operation", None)
    return tensor.name if layer is None else layer.name


def check_batch_values(x: Any) -> None:
    """Refuse a batch that is not numbers, is complex, or is 0-d (one line).

    Arrays are checked as they are opened; this catches what datasets,
    generators and `PyDataset`s yield.
    """
    for leaf in tree.flatten(x):
        shape = getattr(leaf, "shape", None)
        try:
            shape = None if shape is None else tuple(shape)
        except (TypeError, ValueError):  # a tensor of unknown rank
            shape = None
        check_data_array(getattr(leaf, "dtype", None), shape)


def check_finite_inputs(x: Any, step: int) -> None:
    """Refuse NaN or inf in a batch of model inputs.

    Checking the tapped activations is not enough: a fused MatMul+ReLU (TF's
    oneDNN remapper) maps NaN to 0 before any tap sees it.
    """
    for k, array in enumerate(tree.flatten(x)):
        values = np.asarray(array)
        if not np.issubdtype(values.dtype, np.floating) and values.dtype.kind != "V":
            continue
        finite = np.isfinite(values.astype(np.float32, copy=False))
        if not finite.all():
            where = np.unravel_index(int(np.argmin(finite)), values.shape)
            raise SurgeryError(
                f"the data has a non-finite value ({values[where]}) in input "
                f"{k}, batch {step}, at {tuple(int(i) for i in where)}; clean the "
                "data (NaN/inf would poison every statistic)"
            )


def shape_fits(want: tuple, got: tuple) -> bool:
    """Whether shape `got` matches `want`, where None in `want` is any size."""
    return len(want) == len(got) and all(
        w is None or w == g for w, g in zip(want, got, strict=True)
    )


def _flatten_like_model(model, x):
    from surgery.graph.spots import graph_of

    struct = graph_of(model)._inputs_struct
    if isinstance(struct, dict) and isinstance(x, dict):
        return [x[key] for key in struct]
    if isinstance(x, dict):
        return [x[t.name] for t in tree.flatten(struct)]
    if not isinstance(x, list | tuple):
        return [x]
    return tree.flatten(x)
