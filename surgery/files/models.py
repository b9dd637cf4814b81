"""Load the models and weights files a Keras user brings to a conversion.

Three kinds of file are accepted:

- a whole model: `.keras`, or a legacy `.h5` with a `model_config` attribute.
  Keras rebuilds it; a `Lambda` layer's pickled bytecode is refused unless the
  caller says the file is trusted (`unsafe=True`, `--unsafe` on the command
  line).
- a legacy weights file, such as the classic
  `vgg16_weights_tf_dim_ordering_tf_kernels.h5` (and its `_notop` variant).
  It holds weights only, so the architecture comes from `family`. The file is
  read here with h5py, layer by layer and by NAME, with every shape checked,
  rather than through Keras' legacy loader, which matches layers by position
  and whose behaviour has shifted between versions.
- a Keras 3 `.weights.h5` file, also with `family`. Its keys are object paths,
  not layer names, so Keras' own loader reads it.

Every file is opened read-only; nothing is ever written next to it.
"""

import contextlib
import dataclasses
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable

import h5py
import keras
import numpy as np

from surgery.errors import SurgeryError, first_line
from surgery.files import legacy
from surgery.files.atomic import atomic_path
from surgery.graph.walk import deep_graphs


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one architecture from a weights-only file.

    Attributes:
        constructor: a `keras.applications` style constructor accepting
            `weights=None` and `include_top`.
        top_layers: names of the weighted layers that exist only with
            `include_top=True`; a legacy file holding any of them is a
            "with top" file, otherwise a `_notop` one.
    """

    constructor: Callable[..., keras.Model]
    top_layers: tuple[str, ...]


# To add a family, map its name to its constructor and top layers, e.g.
# "vgg19": Family(keras.applications.VGG19, ("fc1", "fc2", "predictions")).
# Families whose legacy files name layers differently from Keras 3 (ResNet50:
# `bn_conv1` vs `conv1_bn`) also need a name map before they can go here.
FAMILIES = {
    "vgg16": Family(keras.applications.VGG16, ("fc1", "fc2", "predictions")),
}

_HDF5_SUFFIXES = (".h5", ".hdf5")


def load_model(
    path: str,
    *,
    family: str | None = None,
    unsafe: bool = False,
    by_order: bool = False,
) -> keras.Model:
    """Loads a model, or builds `family` and loads a weights file into it.

    The files a Keras user brings to a conversion, Keras 1 and 2 ones
    included, loaded safely: every file is opened read-only, a legacy weights
    file is matched to the architecture layer by layer and by name with every
    shape checked (not by position, as Keras' legacy loader does), and a
    `Lambda` layer's pickled code is refused unless the caller trusts the
    file.

    Args:
        path: The file: a `.keras` model, a legacy whole-model `.h5` (Keras
            1 or 2, with a `model_config` attribute), a legacy weights `.h5`
            (layout of `vgg16_weights_tf_dim_ordering_tf_kernels.h5`) or a
            Keras 3 `.weights.h5`. A `.weights.h5` with a `.json`
            architecture of the same stem beside it (`net.weights.h5` and
            `net.json`, as `surgery` writes them) loads without `family`.
        family: The architecture of a weights-only file, one of `FAMILIES`
            (`"vgg16"`), built with `weights=None` and with or without its
            top as the file says. Ignored for whole-model files, which
            describe themselves. Defaults to `None`.
        unsafe: Allow deserialising `Lambda` bytecode. Only for trusted files:
            loading such a file runs code stored in it. Defaults to `False`.
        by_order: Match a legacy weights file's layers to the family's by
            position instead of by name (Keras 1 names such as
            `convolution2d_1`); Theano-ordered kernels are converted. Defaults
            to `False`.

    Returns:
        An uncompiled `keras.Model`.

    Raises:
        SurgeryError: the file is missing, a folder, of an unknown kind or
            suffix, corrupt or truncated; it holds weights only and no
            `family` is given, or `family` is unknown; the weights do not fit
            the family (another number of layers, another shape); it holds a
            `Lambda` layer's code and `unsafe` is `False`; or a legacy file
            holds a layer surgery cannot rebuild.

    Example:

    ```python
    import os
    import tempfile

    from surgery import default
    from surgery.modelio import load_model

    model = load_model(default.model_path())  # a .keras file
    folder = tempfile.mkdtemp()
    model.save_weights(os.path.join(folder, "digits.weights.h5"))
    with open(os.path.join(folder, "digits.json"), "w") as f:
        f.write(model.to_json())
    again = load_model(os.path.join(folder, "digits.weights.h5"))  # + digits.json
    print(again.name, len(again.weights) == len(model.weights))  # digits_vgg True
    ```
    """
    path = os.fspath(path)
    spec = _family(family) if family is not None else None
    kind = _file_kind(path)
    if kind == "model":
        return _load_whole_model(path, unsafe)
    if spec is None and kind == "keras-weights" and os.path.exists(sidecar(path)):
        return load_with_architecture(sidecar(path), path, unsafe=unsafe)
    if spec is None:
        raise SurgeryError(
            f"{path} holds weights only, not an architecture; pass --family "
            f"(known: {_known_families()}) to say which model they belong to"
        )
    if kind == "legacy-weights":
        if by_order:
            return legacy.load_weights_by_order(path, family, spec)
        return _load_legacy_weights(path, family, spec)
    return _load_keras_weights(path, family, spec)


def _family(name):
    if name not in FAMILIES:
        raise SurgeryError(
            f"unknown model family {name!r}; known families: {_known_families()}"
        )
    return FAMILIES[name]


def _known_families():
    return ", ".join(FAMILIES)


def _file_kind(path):
    """Returns "model", "legacy-weights" or "keras-weights" for `path`."""
    if not os.path.exists(path):
        raise SurgeryError(f"{path} does not exist")
    if os.path.isdir(path):
        raise SurgeryError(f"{path} is a directory; expected a .keras or .h5 file")
    if path.endswith(".keras"):
        if not zipfile.is_zipfile(path):
            raise SurgeryError(
                f"{path} is not a valid .keras file (not a zip archive); "
                "is it corrupt or misnamed?"
            )
        return "model"
    if not path.endswith(_HDF5_SUFFIXES):
        raise SurgeryError(
            f"{path}: unknown file type; expected .keras, .h5, .hdf5 or .weights.h5"
        )
    with _open_h5(path) as f:
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
            f"{path} looks like a Keras 3 weights file; rename it to end in .weights.h5"
        )
    attributes = [k for k in f if isinstance(f[k], h5py.Group) and "vars" in f[k]]
    if "vars" in f and attributes:
        raise SurgeryError(
            f"{path} holds the weights of a subclassed Keras 3 model (attributes "
            f"{', '.join(attributes[:4])}{', ...' if len(attributes) > 4 else ''}), "
            "which only its class can read: pass module:function (returning the "
            "built model) or an architecture .keras/.json, with --weights "
            f"{os.path.basename(path)}"
        )
    raise SurgeryError(
        f"{path} is an HDF5 file but neither a Keras model nor a Keras "
        "weights file (no model_config, layer_names or layers group)"
    )


@contextlib.contextmanager
def _open_h5(path):
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


# Whole models


def _load_whole_model(path, unsafe):
    config = _model_config(path)
    if not path.endswith(".keras") and _is_legacy(path, config):
        return legacy.load(path, unsafe=unsafe)
    if not unsafe and _has_lambda_code(config):
        raise _lambda_refused(path)
    try:
        with deep_graphs():
            return keras.models.load_model(path, safe_mode=not unsafe, compile=False)
    except ValueError as e:
        # Keras' own guard, in case the scan above misses a new encoding.
        if "safe_mode=False" in str(e):
            raise _lambda_refused(path) from None
        raise SurgeryError(f"could not load {path}: {first_line(e)}") from None
    except (TypeError, KeyError, OSError, zipfile.BadZipFile) as e:
        raise SurgeryError(f"could not load {path}: {first_line(e)}") from None


def _is_legacy(path, config):
    """A Keras 1/2 file that `surgery.files.legacy` rebuilds (Keras 3 cannot load it)."""
    with _open_h5(path) as f:
        return legacy.is_legacy(f.attrs, config)


def _lambda_refused(path):
    return SurgeryError(
        f"{path} contains a Lambda layer with pickled Python code, which "
        "could run anything; pass --unsafe (unsafe=True) only if you trust "
        "the file"
    )


def _model_config(path):
    """Returns the decoded model config stored in a whole-model file."""
    try:
        if path.endswith(".keras"):
            with zipfile.ZipFile(path) as archive:
                text = archive.read("config.json")
        else:
            with _open_h5(path) as f:
                text = f.attrs["model_config"]
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except (KeyError, ValueError, zipfile.BadZipFile) as e:
        raise SurgeryError(
            f"{path} has no readable model config ({first_line(e)}); is it corrupt?"
        ) from None


def _has_lambda_code(config):
    """Whether a config holds Python bytecode (Keras 3 or Keras 2 encoding)."""
    if isinstance(config, list):
        return any(_has_lambda_code(item) for item in config)
    if not isinstance(config, dict):
        return False
    if config.get("class_name") == "__lambda__":
        return True
    if config.get("class_name") == "Lambda":
        inner = config.get("config", {})
        if isinstance(inner.get("function"), list):  # Keras 2: marshalled code
            return True
    return any(_has_lambda_code(value) for value in config.values())


# Legacy weights files, read by layer name


def _load_legacy_weights(path, family_name, family):
    with _open_h5(path) as f:
        saved = _legacy_weight_datasets(path, f)
        include_top = any(name in saved for name in family.top_layers)
        model = family.constructor(weights=None, include_top=include_top)
        where = f"{path} ({family_name}, include_top={include_top})"
        _check_legacy_weights(model, saved, where)
        for layer in _weighted_layers(model):
            layer.set_weights([dataset[()] for dataset in saved[layer.name]])
    return model


def _legacy_weight_datasets(path, f):
    """Maps each saved layer that has weights to its datasets, in order."""
    saved = {}
    for name in _name_list(f.attrs, "layer_names"):
        if name not in f:
            raise SurgeryError(f"{path} lists layer {name!r} but has no group for it")
        group = f[name]
        weight_names = _name_list(group.attrs, "weight_names")
        missing = [w for w in weight_names if w not in group]
        if missing:
            raise SurgeryError(
                f"{path}: layer {name!r} lists weight {missing[0]!r} "
                "but does not hold it"
            )
        if weight_names:
            saved[name] = [group[w] for w in weight_names]
    return saved


def _name_list(attrs, key):
    """Reads a list of names stored as `key` or split over `key0`, `key1`..."""
    if key in attrs:
        chunks = [attrs[key]]
    else:
        chunks = []
        while f"{key}{len(chunks)}" in attrs:
            chunks.append(attrs[f"{key}{len(chunks)}"])
    return [_as_str(name) for chunk in chunks for name in np.ravel(chunk)]


def _as_str(name):
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def _weighted_layers(model):
    return [layer for layer in model.layers if layer.weights]


def _check_legacy_weights(model, saved, where):
    """Raises unless `saved` fits the model's weighted layers exactly."""
    layers = _weighted_layers(model)
    names = {layer.name for layer in layers}
    extra = [name for name in saved if name not in names]
    if extra:
        raise SurgeryError(
            f"{where} has weights for layer(s) the model lacks: "
            f"{', '.join(extra[:3])}{'...' if len(extra) > 3 else ''}; is it the "
            "right family? If only the names differ, pass --by-order"
        )
    for layer in layers:
        if layer.name not in saved:
            raise SurgeryError(f"{where} has no weights for layer {layer.name!r}")
        _check_layer_weights(layer, saved[layer.name], where)


def _check_layer_weights(layer, datasets, where):
    if len(datasets) != len(layer.weights):
        raise SurgeryError(
            f"{where}: layer {layer.name!r} expects {len(layer.weights)} "
            f"weight arrays, found {len(datasets)}"
        )
    for variable, dataset in zip(layer.weights, datasets, strict=True):
        if tuple(variable.shape) != dataset.shape:
            raise SurgeryError(
                f"{where}: layer {layer.name!r} weight {variable.name!r} "
                f"expected shape {tuple(variable.shape)}, found {dataset.shape}"
            )


# Keras 3 .weights.h5 files, read by Keras


def sidecar(weights_path: str) -> str:
    """The architecture file written beside a `.weights.h5` output."""
    return weights_path[: -len(".weights.h5")] + ".json"


def load_with_architecture(
    architecture, weights: str, *, unsafe: bool = False
) -> keras.Model:
    """A model from a `.keras`/`.json` file or object, with weights from a file.

    Args:
        architecture: a `.keras` or `.json` (`model.to_json()`) path, or a
            built `keras.Model` (e.g. from `module:function`).
        weights: a Keras 3 `.weights.h5` file (or a `.keras` file).
    """
    if isinstance(architecture, keras.Model):
        model = architecture
    elif architecture.endswith(".json"):
        model = _model_from_json(architecture, unsafe)
    else:
        model = load_model(architecture, unsafe=unsafe)
    try:
        model.load_weights(weights)
    except (ValueError, KeyError, OSError) as e:
        raise SurgeryError(
            f"{weights} does not fit the architecture of {architecture}: "
            f"{_summarise_load_error(e)}"
        ) from None
    return model


def _model_from_json(path, unsafe):
    if not os.path.exists(path):
        raise SurgeryError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        config = json.loads(text)
    except ValueError as e:
        raise SurgeryError(f"{path} is not JSON ({first_line(e)})") from None
    if not unsafe and _has_lambda_code(config):
        raise _lambda_refused(path)
    try:
        with deep_graphs():
            return keras.saving.deserialize_keras_object(config, safe_mode=not unsafe)
    except (ValueError, TypeError, KeyError) as e:
        raise SurgeryError(
            f"could not build a model from {path}: {first_line(e)}"
        ) from None


def _load_keras_weights(path, family_name, family):
    with _open_h5(path) as f:
        count = _count_datasets(f["layers"])
    model = _model_with_weight_count(path, family_name, family, count)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Skipping nested container")
            model.load_weights(path)
    except ValueError as e:
        raise SurgeryError(
            f"{path} does not fit {family_name}: {_summarise_load_error(e)}"
        ) from None
    return model


def _count_datasets(group):
    found = []
    group.visititems(
        lambda _, item: found.append(1) if isinstance(item, h5py.Dataset) else None
    )
    return len(found)


def _model_with_weight_count(path, family_name, family, count):
    """Builds the variant (without, then with top) holding `count` arrays.

    Keras ignores weights in the file that the model lacks, so a with-top
    file would load into a notop model silently; counting prevents that.
    """
    counts = []
    for include_top in (False, True):
        model = family.constructor(weights=None, include_top=include_top)
        if len(model.weights) == count:
            return model
        counts.append(f"{len(model.weights)} (include_top={include_top})")
    raise SurgeryError(
        f"{path} holds {count} weight arrays but {family_name} has "
        f"{' or '.join(counts)}; is it the right family?"
    )


_SHAPE_ERROR = re.compile(
    r"variable\.shape=(\(.*?\)), Received: value\.shape=(\(.*?\))"
    r".*?Target variable: <Variable path=([^,]+)",
    re.DOTALL,
)
_COUNT_ERROR = re.compile(
    r"Layer '([^']+)' expected (\d+) variables, but received (\d+)"
)


def _summarise_load_error(error):
    """Turns Keras' multi-line load error into one line."""
    text = str(error)
    if match := _SHAPE_ERROR.search(text):
        expected, found, variable = match.groups()
        return f"weight {variable!r} expected shape {expected}, found {found}"
    if match := _COUNT_ERROR.search(text):
        layer, expected, found = match.groups()
        return f"layer {layer!r} expects {expected} weight arrays, found {found}"
    return first_line(error)


# Test and demo helper: a legacy VGG16 weights file


_VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
_VGG16_TOP = ((4096, "fc1"), (4096, "fc2"), (1000, "predictions"))


def write_legacy_vgg16_weights(
    path: str,
    *,
    include_top: bool = True,
    seed: int = 0,
    input_shape: tuple[int | None, int | None, int] | None = None,
    split_names: bool = False,
) -> None:
    """Writes random VGG16 weights in the classic legacy HDF5 layout.

    For tests and demos: the real `vgg16_weights_tf_dim_ordering_tf_kernels`
    files cannot be downloaded here. The layout is theirs: root attribute
    `layer_names` (bytes; every layer, weightless ones included; no
    `keras_version` or `backend`), one group per layer with attribute
    `weight_names` such as `block1_conv1_W_1:0`, `block1_conv1_b_1:0` and one
    float32 dataset per name. Values are seeded normals at Glorot scale, so
    activations neither explode nor vanish.

    Args:
        path: file to write, replaced atomically (temporary name + rename).
        include_top: also write `flatten`, `fc1`, `fc2` and `predictions`
            (~550 MB at 224x224) like the full file; else the `_notop` one.
        seed: seed of the random values.
        input_shape: `(height, width, channels)`; fixes `fc1`'s input size
            with the top. Defaults to `(224, 224, 3)`.
        split_names: store the names as `layer_names0`, `layer_names1`, as
            Keras does when the list is too long for one attribute.
    """
    specs = _vgg16_layer_specs(include_top, input_shape or (224, 224, 3))
    rng = np.random.default_rng(seed)
    with atomic_path(path, suffix=".h5.tmp", prefix=".vgg16-") as tmp:
        with h5py.File(tmp, "w") as f:
            _write_legacy_layers(f, specs, rng, split_names)


def _vgg16_layer_specs(include_top, input_shape):
    """Returns `(layer name, [weight shapes])` for every VGG16 layer in order."""
    height, width, channels = input_shape
    specs = [("input_1", [])]
    for block, (filters, convs) in enumerate(_VGG16_BLOCKS, start=1):
        for conv in range(1, convs + 1):
            specs.append(
                (f"block{block}_conv{conv}", [(3, 3, channels, filters), (filters,)])
            )
            channels = filters
        specs.append((f"block{block}_pool", []))
    if not include_top:
        return specs
    if height is None or width is None:
        raise SurgeryError(
            "include_top=True needs a fixed input height and width, "
            f"got input_shape={input_shape}"
        )
    units = (height // 32) * (width // 32) * channels
    specs.append(("flatten", []))
    for next_units, name in _VGG16_TOP:
        specs.append((name, [(units, next_units), (next_units,)]))
        units = next_units
    return specs


def _write_legacy_layers(f, specs, rng, split_names):
    names = np.array([name.encode("utf-8") for name, _ in specs], dtype="S")
    if split_names:
        for i, chunk in enumerate(np.array_split(names, 2)):
            f.attrs[f"layer_names{i}"] = chunk
    else:
        f.attrs["layer_names"] = names
    for name, shapes in specs:
        group = f.create_group(name)
        weight_names = [f"{name}_{kind}_1:0" for kind in "Wb"[: len(shapes)]]
        # Like the real file: weightless layers get an empty (float) list.
        group.attrs["weight_names"] = (
            np.array([w.encode("utf-8") for w in weight_names], dtype="S")
            if weight_names
            else []
        )
        for weight_name, shape in zip(weight_names, shapes, strict=True):
            group.create_dataset(weight_name, data=_random_weight(rng, shape))


def _random_weight(rng, shape):
    if len(shape) == 1:  # bias
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
    receptive = int(np.prod(shape[:-2]))
    fan_in, fan_out = receptive * shape[-2], receptive * shape[-1]
    scale = np.float32(np.sqrt(2.0 / (fan_in + fan_out)))
    return rng.standard_normal(shape, dtype=np.float32) * scale
