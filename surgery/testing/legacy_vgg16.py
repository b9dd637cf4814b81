"""A writer of legacy VGG16 weights files, for tests and demos.

The real `vgg16_weights_tf_dim_ordering_tf_kernels.h5` files cannot be
downloaded here, so tests and the VGG16 example write their layout with
random weights and load it through `surgery.files.models.load_model`.
"""

import h5py
import numpy as np

from surgery.errors import SurgeryError
from surgery.files.atomic import atomic_path

VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
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
    for block, (filters, convs) in enumerate(VGG16_BLOCKS, start=1):
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
