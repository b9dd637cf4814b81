"""Read-only HDF5 access shared by the model loaders: opening, name lists, legacy layers.

`surgery.files.models` (legacy weights read by layer name) and
`surgery.files.legacy` (Keras 1/2 files, weights read by position) read the
same classic layout: a `layer_names` attribute (or `layer_names0`,
`layer_names1`, ... when too long for one attribute), one group per layer
with a `weight_names` attribute and one dataset per name.
"""

import contextlib
from collections.abc import Iterator

import h5py
import keras
import numpy as np

from surgery.errors import SurgeryError, first_line


@contextlib.contextmanager
def open_h5(path: str) -> Iterator[h5py.File]:
    """Opens `path` read-only, turning a corrupt file into a SurgeryError."""
    if not h5py.is_hdf5(path):
        raise SurgeryError(f"{path} is not an HDF5 file; is it corrupt or misnamed?")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SurgeryError(
            f"{path} could not be opened as HDF5 ({first_line(e)}); "
            "is it truncated or corrupt?"
        ) from None
    with f:
        try:
            yield f
        except OSError as e:
            raise SurgeryError(
                f"could not read {path} ({first_line(e)}); is it corrupt?"
            ) from None


def text(value) -> str:
    """An HDF5 attribute value (bytes or str) as a str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def name_list(attrs, key: str) -> list[str]:
    """Reads a list of names stored as `key` or split over `key0`, `key1`..."""
    if key in attrs:
        chunks = [attrs[key]]
    else:
        chunks = []
        while f"{key}{len(chunks)}" in attrs:
            chunks.append(attrs[f"{key}{len(chunks)}"])
    return [text(name) for chunk in chunks for name in np.ravel(chunk)]


def legacy_weight_datasets(path: str, f: h5py.Group) -> dict[str, list[h5py.Dataset]]:
    """Maps each saved layer that has weights to its datasets, in order."""
    saved = {}
    for name in name_list(f.attrs, "layer_names"):
        if name not in f:
            raise SurgeryError(f"{path} lists layer {name!r} but has no group for it")
        group = f[name]
        weight_names = name_list(group.attrs, "weight_names")
        missing = [w for w in weight_names if w not in group]
        if missing:
            raise SurgeryError(
                f"{path}: layer {name!r} lists weight {missing[0]!r} "
                "but does not hold it"
            )
        if weight_names:
            saved[name] = [group[w] for w in weight_names]
    return saved


def weighted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers a legacy weights file holds arrays for: those with weights."""
    return [layer for layer in model.layers if layer.weights]
