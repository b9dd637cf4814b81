"""Data for the Ray pass: batch numbers, or the user's rows.

A path, arrays or a `PyDataset` become a list of batch numbers (with how
many samples of each to take), read by the actors themselves so that batch i
holds the samples the in-process pass puts in batch i. A `ray.data.Dataset`
or a parquet path stays a dataset of samples, batched by Ray.
"""

from __future__ import annotations

import math
import os

import keras
import numpy as np

from surgery.engines.ray_actor import BATCH, TAKE, SourceSpec
from surgery.errors import SurgeryError


def ray_dataset(ray, data, model, batch_size, steps, max_samples):
    """What the actors measure, how they read it, its samples and batches.

    What they measure is a `ray.data.Dataset` of samples (batches: None) or
    the list of batch numbers, one `{BATCH: [i], TAKE: [n]}` row each.
    """
    if isinstance(data, ray.data.Dataset):
        return _row_dataset(data, model, batch_size, steps, max_samples)
    if isinstance(data, str | os.PathLike) and _is_parquet(os.fspath(data)):
        ds = ray.data.read_parquet(os.fspath(data))
        return _row_dataset(ds, model, batch_size, steps, max_samples)
    source, opened = _source_spec(ray, data, model, batch_size)
    size = getattr(opened, "batch_size", None) or batch_size
    n_batches = len(opened)
    n_samples = getattr(opened, "num_samples", None)
    if steps is not None:
        n_batches = min(n_batches, steps)
    if n_samples is None:
        if max_samples is not None:
            raise SurgeryError(
                "max_samples needs a source that knows its size; use steps=..."
            )
        takes = [np.iinfo(np.int64).max] * n_batches
    else:
        n_samples = min(int(n_samples), n_batches * size)
        if max_samples is not None:
            n_samples = min(n_samples, max_samples)
            n_batches = min(n_batches, math.ceil(n_samples / size))
        takes = [min(size, n_samples - i * size) for i in range(n_batches)]
    items = [{BATCH: np.array([i]), TAKE: np.array([t])} for i, t in enumerate(takes)]
    return items, source, n_samples, n_batches


def _row_dataset(ds, model, batch_size, steps, max_samples):
    if steps is not None:
        ds = ds.limit(steps * batch_size)
    if max_samples is not None:
        ds = ds.limit(max_samples)
    names = [t.name for t in model.inputs]
    columns = _input_columns(ds.schema().names, names)
    return (
        ds,
        SourceSpec(batch_size, columns=columns, input_names=tuple(names)),
        ds._meta_count(),
        None,
    )


def _input_columns(columns: list[str], inputs: list[str]) -> tuple[str, ...]:
    """The dataset columns that feed the model's inputs."""
    if all(name in columns for name in inputs):
        return tuple(inputs)
    candidates = [c for c in columns if c not in ("path", "label", "labels", "y")]
    if len(inputs) == 1 and len(candidates) == 1:
        return (candidates[0],)
    raise SurgeryError(
        f"cannot tell which columns of the dataset {columns} feed the model "
        f"inputs {inputs}; name the columns after the inputs (ds.rename_columns)"
    )


def _source_spec(ray, data, model, batch_size):
    """How actors read `data`, and `data` opened here to validate and count it.

    A path is opened by every actor itself (it must be on storage all nodes
    see); arrays and `PyDataset`s (such as `surgery.data.sources.open_source`
    gives, with its preprocessing) travel through the object store.
    """
    from surgery.data.sources import ArrayRows, is_source, open_source

    if isinstance(data, str | os.PathLike):
        opened = open_source(os.fspath(data), model=model, batch_size=batch_size)
        return SourceSpec(batch_size, path=os.fspath(data)), opened
    if isinstance(data, keras.utils.PyDataset):
        return SourceSpec(batch_size, dataset=[ray.put(data)]), data
    if isinstance(data, tuple) and _is_array(data[0]):
        data = data[0]  # (x, y): labels are not needed
    leaves = keras.tree.flatten(data) if isinstance(data, list | dict) else [data]
    if leaves and all(_is_array(a) for a in leaves) and not is_source(data):
        arrays = keras.tree.map_structure(np.asarray, data)
        opened = ArrayRows(arrays, batch_size)
        return SourceSpec(batch_size, dataset=[ray.put(opened)]), opened
    raise SurgeryError(
        "engine='ray' reads a ray.data.Dataset, numpy arrays, a PyDataset or a "
        "path (image folder, .npy, .npz, .h5, .zarr, .parquet), not "
        f"{type(data).__name__}; convert the data to one of these"
    )


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray)


def _is_parquet(path: str) -> bool:
    if path.endswith(".parquet"):
        return True
    return os.path.isdir(path) and any(
        name.endswith(".parquet") for name in os.listdir(path)
    )
