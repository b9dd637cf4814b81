"""Load the models and weights files a Keras user brings to a conversion.

Three kinds of file are accepted:

- a whole model: `.keras`, or a legacy `.h5` with a `model_config` attribute.
  Keras rebuilds it; a `Lambda` layer's pickled bytecode is refused unless the
  caller says the file is trusted (`unsafe=True`, `--unsafe` on the command
  line).
- a legacy weights file, such as the classic
  `vgg16_weights_tf_dim_ordering_tf_kernels.h5` (and its `_notop` variant).
  It holds weights only, so the architecture comes from `family`. The file is
  read with h5py (`surgery.files.legacy_weights`), layer by layer and by
  NAME, with every shape checked, rather than through Keras' legacy loader,
  which matches layers by position and whose behaviour has shifted between
  versions.
- a Keras 3 `.weights.h5` file, also with `family`. Its keys are object paths,
  not layer names, so Keras' own loader reads it.

Every file is opened read-only; nothing is ever written next to it.
"""

import dataclasses
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable

import h5py
import keras

from surgery.errors import SurgeryError, first_line, quoted
from surgery.files import legacy, legacy_weights, pyref
from surgery.files.file_kinds import file_kind
from surgery.files.h5 import open_h5
from surgery.graph.taps import deep_graphs
from surgery.validate import check_not_special


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
    kind = file_kind(path)
    if kind == "model":
        return _load_whole_model(path, unsafe)
    if spec is None and kind == "keras-weights" and os.path.exists(sidecar(path)):
        return load_with_architecture(sidecar(path), path, unsafe=unsafe)
    if spec is None:
        name = os.path.basename(path)
        raise SurgeryError(
            f"{quoted(path)} holds weights only, not an architecture; name the model "
            f"they belong to and pass the file as its weights: a family "
            f"({_known_families()}): `vgg16 --weights {name}`; an architecture "
            f"file: `net.json --weights {name}` (or .keras); or a function "
            f"returning the model: `mypkg.nets:build --weights {name}` "
            "(in Python: family=...)"
        )
    if kind == "legacy-weights":
        if by_order:
            return legacy_weights.load_by_order(path, family, spec)
        return legacy_weights.load_by_name(path, family, spec)
    return _load_keras_weights(path, family, spec)


def _family(name):
    if name not in FAMILIES:
        raise SurgeryError(
            f"unknown model family {name!r}; known families: {_known_families()}"
        )
    return FAMILIES[name]


def _known_families():
    return ", ".join(FAMILIES)


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
        raise pyref.load_error(f"could not load {quoted(path)}", e) from None
    except (TypeError, KeyError, OSError, zipfile.BadZipFile) as e:
        raise pyref.load_error(f"could not load {quoted(path)}", e) from None


def _is_legacy(path, config):
    """A Keras 1/2 file that `surgery.files.legacy` rebuilds (Keras 3 cannot load it)."""
    with open_h5(path) as f:
        return legacy.is_legacy(f.attrs, config)


def _lambda_refused(path):
    return SurgeryError(
        f"{quoted(path)} contains a Lambda layer with pickled Python code, which "
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
            with open_h5(path) as f:
                text = f.attrs["model_config"]
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except (KeyError, ValueError, zipfile.BadZipFile) as e:
        raise SurgeryError(
            f"{quoted(path)} has no readable model config ({first_line(e)}); is it corrupt?"
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
    check_not_special(weights, "weights")
    try:
        model.load_weights(weights)
    except (ValueError, KeyError, OSError) as e:
        if isinstance(architecture, keras.Model):
            architecture = f"model '{architecture.name}'"
        raise SurgeryError(
            f"{quoted(weights)} does not fit the architecture of {quoted(architecture)}: "
            f"{_summarise_load_error(e)}"
        ) from None
    return model


def _model_from_json(path, unsafe):
    check_not_special(path, "architecture")
    if not os.path.exists(path):
        raise SurgeryError(f"{quoted(path)} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        config = json.loads(text)
    except ValueError as e:
        raise SurgeryError(f"{quoted(path)} is not JSON ({first_line(e)})") from None
    if not unsafe and _has_lambda_code(config):
        raise _lambda_refused(path)
    try:
        with deep_graphs():
            return keras.saving.deserialize_keras_object(config, safe_mode=not unsafe)
    except (ValueError, TypeError, KeyError) as e:
        raise pyref.load_error(
            f"could not build a model from {quoted(path)}", e
        ) from None


def _load_keras_weights(path, family_name, family):
    with open_h5(path) as f:
        count = _count_datasets(f["layers"])
    model = _model_with_weight_count(path, family_name, family, count)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Skipping nested container")
            model.load_weights(path)
    except ValueError as e:
        raise SurgeryError(
            f"{quoted(path)} does not fit {family_name}: {_summarise_load_error(e)}"
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
        f"{quoted(path)} holds {count} weight arrays but {family_name} has "
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
