"""What kind of model file a path is, decided from its name and contents."""

import os
import zipfile

import h5py

from surgery.errors import SurgeryError, quoted
from surgery.files.h5 import open_h5
from surgery.validate import check_not_special

HDF5_SUFFIXES = (".h5", ".hdf5")


def file_kind(path: str) -> str:
    """Returns "model", "legacy-weights" or "keras-weights" for `path`."""
    check_not_special(path, "model")
    if not os.path.exists(path):
        raise SurgeryError(f"{quoted(path)} does not exist")
    if os.path.isdir(path):
        raise SurgeryError(
            f"{quoted(path)} is a directory; expected a .keras or .h5 file"
        )
    if path.endswith(".keras"):
        if not zipfile.is_zipfile(path):
            raise SurgeryError(
                f"{quoted(path)} is not a valid .keras file (not a zip archive); "
                "is it corrupt or misnamed?"
            )
        return "model"
    if not path.endswith(HDF5_SUFFIXES):
        raise SurgeryError(
            f"{quoted(path)}: unknown file type; expected .keras, .h5, .hdf5 or .weights.h5"
        )
    with open_h5(path) as f:
        return _hdf5_kind(path, f)


def _hdf5_kind(path, f):
    if "model_config" in f.attrs:
        return "model"
    if "layer_names" in f.attrs or "layer_names0" in f.attrs:
        return "legacy-weights"
    is_keras3 = "layers" in f and "vars" in f
    if is_keras3 and path.endswith(".weights.h5"):
        return "keras-weights"
    if is_keras3:
        raise SurgeryError(
            f"{quoted(path)} looks like a Keras 3 weights file; rename it to end in .weights.h5"
        )
    attributes = [k for k in f if isinstance(f[k], h5py.Group) and "vars" in f[k]]
    if "vars" in f and attributes:
        raise SurgeryError(
            f"{quoted(path)} holds the weights of a subclassed Keras 3 model (attributes "
            f"{', '.join(attributes[:4])}{', ...' if len(attributes) > 4 else ''}), "
            "which only its class can read: pass module:function (returning the "
            "built model) or an architecture .keras/.json, with --weights "
            f"{os.path.basename(path)}"
        )
    raise SurgeryError(
        f"{quoted(path)} is an HDF5 file but neither a Keras model nor a Keras "
        "weights file (no model_config, layer_names or layers group)"
    )
