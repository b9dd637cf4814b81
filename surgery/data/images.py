"""Image folders as batches: decoded, resized and preprocessed ahead of the model.

A folder is read flat or with class sub-folders, in the order
`image_dataset_from_directory` and `flow_from_directory` use, so cached
features line up with the labels `folder_labels` gives.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable

import keras
import numpy as np
import PIL.Image

from surgery.data.prefetch import Prefetcher, default_workers
from surgery.data.shards import check_shard, shard_range
from surgery.errors import SurgeryError, first_line, quoted
from surgery.validate import check_workers

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff")


def open_image_folder(
    folder: str,
    *,
    model: keras.Model | None = None,
    image_size: tuple[int, int] | None = None,
    preprocess: Callable | str | None = None,
    batch_size: int = 32,
    shard: tuple[int, int] | None = None,
    workers: int | None = None,
) -> ImageFolder:
    """The images under `folder` at the model's input size and channels."""
    size, channels = _image_shape(model, image_size)
    return ImageFolder(
        folder,
        size,
        channels,
        _preprocess_fn(preprocess),
        batch_size,
        check_shard(shard),
        workers=workers,
    )


class ImageFolder(keras.utils.PyDataset):
    """Images under a folder (recursively, sorted), resized and stacked.

    Sorted sub-folders then sorted file names: the order
    `image_dataset_from_directory` and `flow_from_directory` use, so cached
    features line up with their labels. `workers` threads decode the images
    of the next batches while the model runs on this one (see
    `surgery.data.prefetch`); the order stays the same.
    """

    def __init__(
        self, folder, size, channels, preprocess, batch_size, shard=None, workers=None
    ):
        super().__init__()
        workers = check_workers(workers) or default_workers()
        self.files = list_images(folder)
        if not self.files:
            raise SurgeryError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) under {quoted(folder)}; "
                "point --data at the folder that holds them"
            )
        start, stop = shard_range(len(self.files), shard)
        self.files = self.files[start:stop]
        self.folder, self.rows, self.labels = folder, (start, stop), None
        self.size, self.preprocess, self.batch_size = size, preprocess, batch_size
        self.color_mode = {1: "grayscale", 3: "rgb", 4: "rgba"}[channels]
        self.decoder = Prefetcher(self._load, self._batch_files, len(self), workers)

    @property
    def num_samples(self) -> int:
        return len(self.files)

    def __len__(self):
        return math.ceil(len(self.files) / self.batch_size)

    def __getitem__(self, i):
        batch = np.stack(self.decoder.get(i))
        if self.preprocess is not None:
            batch = self.preprocess(batch.astype(np.float32, copy=False))
        if self.labels is None:
            return batch
        return batch, self.labels[i * self.batch_size : (i + 1) * self.batch_size]

    def keep_labels(self) -> None:
        """Serve each batch with its class indices, `(x, y)`, as Keras reads
        a folder of class sub-folders; a flat folder stays without labels."""
        try:
            labels, _ = folder_labels(self.folder)
        except SurgeryError:
            return
        self.labels = labels[slice(*self.rows)]

    def on_epoch_end(self):
        self.decoder.close()

    def _batch_files(self, i):
        return self.files[i * self.batch_size : (i + 1) * self.batch_size]

    def _load(self, path):
        try:
            with PIL.Image.open(path) as image:
                if _sixteen_bit(image, path):
                    return _sixteen_bit_pixels(image, self.size, self.color_mode)
                return _eight_bit_pixels(image, self.size, self.color_mode)
        except (OSError, PIL.Image.DecompressionBombError) as e:
            raise SurgeryError(
                f"cannot read image {quoted(path)}: {_image_error(e)}"
            ) from None


PIL_MODES = {"grayscale": "L", "rgb": "RGB", "rgba": "RGBA"}


def _eight_bit_pixels(image, size, color_mode) -> np.ndarray:
    """`image` as `uint8` pixels at `size`, in `color_mode`'s channels.

    The pixels `keras.utils.load_img(..., interpolation="bilinear")` gives,
    from the same steps (convert the mode, then resize bilinearly), kept in
    `uint8`: a batch is a quarter of its float32 size to stack and hand to the
    backend, which converts it to the model's input dtype exactly.
    """
    mode = PIL_MODES[color_mode]
    if image.mode != mode:
        image = image.convert(mode)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), PIL.Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _sixteen_bit(image, path) -> bool:
    """Whether `image` has 16-bit gray pixels (refused if deeper, with no scale).

    Keras' `load_img` would clip them to 255 for an RGB model, and keep
    0..65535 for a grayscale one, neither on the 0..255 scale of the
    folder's other images.
    """
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        return True
    if image.mode in ("I", "F"):
        raise SurgeryError(
            f"cannot read image {quoted(path)}: its pixels are 32-bit "
            f"{'integers' if image.mode == 'I' else 'floats'}, with no known "
            "0..255 scale; save it with 8 or 16 bits per channel"
        )
    return False


def _sixteen_bit_pixels(image, size, color_mode) -> np.ndarray:
    """A 16-bit grayscale image at the 0..255 scale of 8-bit ones (v / 257),
    resized bilinearly as `load_img` resizes, in `color_mode`'s channels
    (float32: the scaled values are not integers)."""
    gray = PIL.Image.fromarray(np.asarray(image, dtype=np.float32) / 257)
    if size is not None and gray.size != (size[1], size[0]):
        gray = gray.resize((size[1], size[0]), PIL.Image.BILINEAR)
    pixels = np.asarray(gray, dtype=np.float32)[..., None]
    if color_mode == "grayscale":
        return pixels
    rgb = np.repeat(pixels, 3, axis=-1)
    if color_mode == "rgb":
        return rgb
    return np.concatenate([rgb, np.full_like(pixels, 255)], axis=-1)


def list_images(folder: str) -> list[str]:
    """Image files under `folder`, sub-folders in sorted order, then names.

    Symbolic links are followed, but each folder and each file is visited
    once (a link to `.` or a loop adds nothing), and only regular files are
    listed: a FIFO or device named `x.png` would block or never end.
    """
    found, seen_dirs, seen_files = [], set(), set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        here = _file_id(root)
        if here is None or here in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(here)
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(root, name)
            ident = _file_id(path, regular=True)
            if ident is not None and ident not in seen_files:
                seen_files.add(ident)
                found.append(path)
    return found


def _file_id(path, regular=False):
    """(device, inode) of what `path` points to; None if absent or irregular."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # a dangling link
    if regular and not stat.S_ISREG(st.st_mode):
        return None
    return st.st_dev, st.st_ino


def _image_error(e: Exception) -> str:
    if isinstance(e, PIL.Image.DecompressionBombError):
        return "it has too many pixels (a decompression bomb?); resize it first"
    if isinstance(e, PIL.UnidentifiedImageError):
        return "not a readable image (corrupt, or not an image); remove it"
    return first_line(e)


def folder_labels(folder: str) -> tuple[np.ndarray, list[str]]:
    """Class index of each image of an image folder, and the class names.

    The images are listed in the order `open_source` reads them (sorted
    sub-folders, then sorted names), so the labels line up with the batches
    and with features cached from the folder (`cache_features`), ready for
    `open_features(path, labels=...)`. A class is a top-level sub-folder, and
    its index is its position in sorted order, as
    `image_dataset_from_directory` and `flow_from_directory` number classes.

    Args:
        folder: An image folder laid out as `<folder>/<class>/.../<image>`.

    Returns:
        A `(labels, names)` pair: an int64 array of one class index per image,
        and the class names in index order.

    Raises:
        SurgeryError: an image lies directly in `folder`, outside any class
            sub-folder.

    Example:

    ```python
    from surgery import default
    from surgery.sources import folder_labels

    labels, names = folder_labels(default.images_dir())
    print(labels.shape, labels[:3], names[:3])  # (200,) [0 0 0] ['0', '1', '2']
    ```
    """
    files = list_images(folder)
    classes = [os.path.relpath(f, folder).split(os.sep)[0] for f in files]
    if any(
        c == os.path.relpath(f, folder) for c, f in zip(classes, files, strict=True)
    ):
        raise SurgeryError(
            f"{quoted(folder)} has images outside class sub-folders; put each image in "
            "<folder>/<class>/ to get labels"
        )
    names = sorted(set(classes))
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[c] for c in classes], dtype="int64"), names


def _image_shape(model, image_size):
    shape = None if model is None else model.inputs[0].shape
    if shape is not None and len(shape) != 4:
        raise SurgeryError(
            f"an image folder feeds 4-D image inputs, but the model takes {shape}"
        )
    size = image_size or (None if shape is None else tuple(shape[1:3]))
    if size is None or None in size:
        raise SurgeryError(
            "cannot tell the image size: the model does not fix it; pass "
            "image_size=(height, width) (CLI: --image-size HxW)"
        )
    channels = 3 if shape is None or shape[-1] is None else int(shape[-1])
    if channels not in (1, 3, 4):
        raise SurgeryError(
            f"the model's input has {channels} channels; image folders give "
            "1 (grayscale), 3 (RGB) or 4 (RGBA)"
        )
    return tuple(int(s) for s in size), channels


def _preprocess_fn(preprocess):
    if preprocess is None or callable(preprocess):
        return preprocess
    if preprocess == "none":
        return None
    module = getattr(keras.applications, preprocess, None)
    fn = getattr(module, "preprocess_input", None)
    if fn is None:
        raise SurgeryError(
            f"unknown preprocess {preprocess!r}: name a keras.applications "
            "module (vgg16, resnet50, mobilenet_v2, ...) or 'none'"
        )
    return fn
