"""Data for the Ray pass: batch numbers, or the user's rows.

The data is opened once by `surgery.data.inputs.open_inputs`, as in process.
A path, arrays or a `PyDataset` become a list of batch numbers (with how
many samples of each to take), read by the actors themselves so that batch i
holds the samples the in-process pass puts in batch i: a file the `Inputs`
can reopen by path is reopened by each actor, anything else travels through
the object store. A `ray.data.Dataset` or parquet rows stay a dataset of
samples, batched by Ray.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from surgery.data.arrays import ArrayRows
from surgery.data.inputs import open_inputs
from surgery.engines.ray_actor import BATCH, TAKE, SourceSpec
from surgery.errors import SurgeryError
from surgery.validate import check_not_empty


def ray_dataset(ray, data, model, batch_size, steps, max_samples):
    """What the actors measure, how they read it, its samples and batches.

    What they measure is a `ray.data.Dataset` of samples (batches: None) or
    the list of batch numbers, one `{BATCH: [i], TAKE: [n]}` row each.
    """
    if isinstance(data, ray.data.Dataset):
        return _row_dataset(data, model, batch_size, steps, max_samples)
    inputs = open_inputs(data, model=model, batch_size=batch_size)
    if inputs.parquet:
        ds = ray.data.read_parquet(inputs.path)
        return _row_dataset(ds, model, batch_size, steps, max_samples)
    source, opened = _source_spec(ray, inputs, batch_size)
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
    check_not_empty(len(items))
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


def _source_spec(ray, inputs, batch_size):
    """How actors read the opened `inputs`, and what to count batches in.

    A path `inputs` can reopen is opened by every actor itself (it must be on
    storage all nodes see); arrays and `PyDataset`s (such as an image folder,
    with its preprocessing) travel through the object store.
    """
    data = inputs.data
    if inputs.path is not None:
        size = inputs.batch_size or batch_size
        return SourceSpec(size, path=inputs.path), data
    if isinstance(data, keras.utils.PyDataset) and _travels(data):
        return SourceSpec(batch_size, dataset=[ray.put(data)]), data
    leaves = keras.tree.flatten(data) if isinstance(data, list | dict) else [data]
    if leaves and all(isinstance(a, np.ndarray) for a in leaves):
        arrays = keras.tree.map_structure(np.asarray, data)
        opened = ArrayRows(arrays, batch_size)
        return SourceSpec(batch_size, dataset=[ray.put(opened)]), opened
    raise SurgeryError(
        "engine='ray' reads a ray.data.Dataset, numpy arrays, a PyDataset or a "
        "path (image folder, .npy, .npz, .h5, .zarr, .parquet), not "
        f"{type(data).__name__}; convert the data to one of these"
    )


def _travels(data) -> bool:
    """Whether the object store can carry `data`: not open h5py, zarr or
    bcolz arrays, which only a path lets an actor reopen."""
    if not isinstance(data, ArrayRows):
        return True
    return all(isinstance(a, np.ndarray) for a in keras.tree.flatten(data.arrays))
