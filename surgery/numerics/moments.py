"""Per-unit mean and variance that merge exactly across batches and shards.

Each batch is reduced on the device in float64 with two passes (mean, then
squared deviations from it); batches are merged on the host with Chan et
al.'s pairwise formula. Both steps avoid the cancellation that ruins
`E[x^2] - E[x]^2` and float32 accumulation when a unit's mean dwarfs its
spread (mean 1e4, std 1e-2), and the merge is associative, so the result does
not depend on batch size, batch order or how the data was sharded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
from keras import backend, ops

from surgery.errors import SurgeryError
from surgery.validate import check_not_empty


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations (M2) of each unit.

    The statistics `activation_stats` returns for each layer, and what
    `insert_identity_bn(stats=...)` builds a BN from. Each unit's values are
    summarised by three numbers that merge exactly (Chan et al.'s pairwise
    formula), so statistics of shards or batches measured separately combine
    into those of the whole data, whatever the split and order. Everything
    is float64.

    Attributes:
        count: How many values each unit saw (samples, times positions for
            convolutions), an int >= 0.
        mean: Each unit's mean, a float64 vector of one value per unit.
        m2: Each unit's sum of squared deviations from its mean, a float64
            vector of the same shape.

    Example:

    ```python
    import numpy as np
    from surgery import Moments

    x = np.random.default_rng(0).normal(size=(100, 3))
    whole = Moments.of(x)
    halves = Moments.of(x[:40]).merge(Moments.of(x[40:]))
    print(whole.count, whole.units)  # 100 3
    print(np.allclose(halves.var, whole.var), np.allclose(whole.var, x.var(0)))
    # True True
    ```
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, units: int) -> Moments:
        """The moments of no data: count 0, zero mean and M2.

        A start value for merging, since merging it into anything changes
        nothing.

        Args:
            units: The number of units.

        Returns:
            A `Moments` with `count == 0` and `units` zeros for `mean` and `m2`.

        Example:

        ```python
        import numpy as np
        from surgery import Moments

        total = Moments.empty(2)
        for batch in np.split(np.arange(12.0).reshape(6, 2), 3):
            total = total.merge(Moments.of(batch))
        print(total.count, total.mean)  # 6 [5. 6.]
        ```
        """
        zeros = np.zeros(units, dtype=np.float64)
        return cls(0, zeros, zeros.copy())

    @classmethod
    def of(cls, x: np.ndarray, axis: int = -1) -> Moments:
        """The moments of an array or backend tensor, computed at once in float64.

        Every axis but `axis` is reduced, so for an activation of shape
        `(batch, height, width, channels)` each channel is one unit counting
        `batch * height * width` values. Meant for arrays in memory; use
        `activation_stats` for a model's activations over a data set.

        Args:
            x: A NumPy array, or a backend tensor (converted to one).
            axis: The axis of the units. Defaults to `-1`, the channels of a
                `channels_last` layer; pass `1` for `channels_first`.

        Returns:
            A `Moments` with one unit per entry of `x` along `axis`.

        Example:

        ```python
        import numpy as np
        from surgery import Moments

        m = Moments.of(np.ones((2, 4, 4, 3)))
        print(m.count, m.mean, m.var)  # 32 [1. 1. 1.] [0. 0. 0.]
        ```
        """
        x = np.asarray(ops.convert_to_numpy(x), dtype=np.float64)
        x = np.moveaxis(x, axis, -1)
        x = x.reshape(-1, x.shape[-1])
        mean = x.mean(axis=0)
        return cls(int(x.shape[0]), mean, ((x - mean) ** 2).sum(axis=0))

    @property
    def units(self) -> int:
        """The number of units (the length of `mean`)."""
        return int(self.mean.shape[0])

    @property
    def var(self) -> np.ndarray:
        """Each unit's population variance, `m2 / count` (zeros when `count` is 0).

        The quantity a BatchNormalization layer keeps as its moving variance.
        """
        if self.count == 0:
            return np.zeros_like(self.m2)
        return self.m2 / self.count

    @property
    def std(self) -> np.ndarray:
        """Each unit's population standard deviation, `sqrt(var)`."""
        return np.sqrt(self.var)

    def merge(self, other: Moments) -> Moments:
        """The moments of both samples together (Chan et al., 1979).

        Exact up to float64 rounding and associative, so shards or batches
        measured separately merge into the moments of all the data in any order.
        Neither operand is changed.

        Args:
            other: The `Moments` of the other sample, with the same units.

        Returns:
            A new `Moments` of both samples (or the non-empty operand itself when
            the other has count 0).

        Raises:
            ValueError: both have a count above 0 but other numbers of units.

        Example:

        ```python
        import numpy as np
        from surgery import Moments

        rng = np.random.default_rng(0)
        a, b = rng.normal(1e4, 1e-2, (50, 2)), rng.normal(1e4, 1e-2, (70, 2))
        merged = Moments.of(a).merge(Moments.of(b))
        print(merged.count, np.allclose(merged.std, np.concatenate([a, b]).std(0)))
        # 120 True
        ```
        """
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        if other.units != self.units:
            raise ValueError(f"cannot merge {self.units} units with {other.units}")
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)


class BatchMoments(keras.Operation):
    """Reduces one activation batch to (count, mean, M2) per unit, in float64.

    Outputs carry a leading axis of length 1 so that they travel through
    `predict_on_batch` like any model output. An `Operation`, not a `Layer`:
    it has no weights, and a tap model calls one per tap on every batch,
    where a layer's call costs about 0.1 ms more (torch, 53 taps of
    ResNet50: 5 ms a batch). A mask on the tapped tensor is ignored, so
    masked steps are counted like the rest.

    Two passes in float64: the mean, then the squared deviations from it.
    The column sums are a product with a ones row, which runs vectorised and
    threaded where TensorFlow's float64 reductions do not; torch has its own
    path (`_torch_moments`).
    """

    def __init__(self, axis: int = -1, name: str | None = None):
        super().__init__(name=name)
        self.axis = axis

    def call(self, x):
        axis = self.axis % len(x.shape)
        if axis != len(x.shape) - 1:
            x = ops.moveaxis(x, axis, -1)
        if backend.backend() == "torch":
            return _torch_moments(x)
        rows = ops.reshape(ops.cast(x, "float64"), (-1, x.shape[-1]))
        count = ops.cast(ops.shape(rows)[0], "float64")
        ones = ops.ones((1, ops.shape(rows)[0]), "float64")
        mean = ops.matmul(ones, rows) / count
        deviations = rows - mean
        m2 = ops.matmul(ones, deviations * deviations)
        return ops.reshape(count, (1,)), mean, m2

    def compute_output_spec(self, x):
        units = x.shape[self.axis]
        return (
            keras.KerasTensor((1,), dtype="float64"),
            keras.KerasTensor((1, units), dtype="float64"),
            keras.KerasTensor((1, units), dtype="float64"),
        )


def _torch_moments(x):
    """`BatchMoments.call` in torch's own operations.

    Keras' torch `matmul` returns float32 for float64 inputs, so the column
    sums are direct. The deviations are squared in place in the one float64
    copy of the batch (three buffers before: 1.23x the bare forward pass of
    VGG16's trunk, 1.08x now), and the count is made in torch: `keras.ops`
    calls on torch cost about 0.2 ms each, against 53 taps of ResNet50 per
    batch.
    """
    import torch

    with torch.no_grad():  # statistics need no gradient; in-place ops need none
        rows = x.reshape(-1, x.shape[-1])
        wide = rows.to(torch.float64, copy=True)  # never the caller's tensor
        mean = wide.sum(dim=0, keepdim=True) / rows.shape[0]
        m2 = wide.sub_(mean).square_().sum(dim=0, keepdim=True)
        count = torch.full((1,), rows.shape[0], dtype=torch.float64, device=x.device)
    return count, mean, m2


def float64_enabled():
    """A context in which the backend computes float64 as float64.

    JAX truncates float64 to float32 unless x64 is on; `jax.enable_x64` turns
    it on for this thread and this block only, never in the user's global
    configuration. The other backends always have float64.
    """
    if backend.backend() == "jax":
        import jax

        return jax.enable_x64(True)
    return contextlib.nullcontext()


def from_batch(count, mean, m2) -> Moments:
    """Host `Moments` from one `BatchMoments` output."""
    return Moments(
        int(round(float(np.asarray(count).reshape(-1)[0]))),
        np.asarray(mean, dtype=np.float64).reshape(-1),
        np.asarray(m2, dtype=np.float64).reshape(-1),
    )


def tap_moments(flat: Sequence, taps: int) -> list[Moments]:
    """Host `Moments` of each tap, from the first `3 * taps` flat outputs of
    a moments model (a `BatchMoments` triple per tap)."""
    return [from_batch(*flat[3 * k : 3 * k + 3]) for k in range(taps)]


def pool(batch: Sequence[Moments], owners: Sequence[int], n: int) -> list:
    """One batch's moments per spot: tap k belongs to spot `owners[k]`.

    A shared layer is tapped once per call site; its taps pool into one
    spot. A spot no tap reached stays None.
    """
    pooled: list = [None] * n
    merge_into(pooled, batch, owners)
    return pooled


def merge_into(totals: list, batch: Sequence[Moments], owners: Sequence[int]) -> None:
    """Merge `batch[k]` into `totals[owners[k]]` (None there: nothing yet).

    The one merge of every pass: per batch in the local pass and the Ray
    actor, across batches in the local pass and the Ray driver.
    """
    for k, moments in enumerate(batch):
        j = owners[k]
        totals[j] = moments if totals[j] is None else totals[j].merge(moments)


class Totals:
    """The running moments of one pass, one per spot, merged batch by batch.

    Batches must arrive in order for the result to be bit-identical however
    the pass was run (the merge is associative only up to float64 rounding).
    `spots` are anything with a `spec` and a `side` (for error messages).
    """

    def __init__(self, spots: Sequence):
        self.spots = list(spots)
        self.moments: list = [None] * len(self.spots)
        self.samples = 0

    def add(
        self, batch: Sequence[Moments], owners: Sequence[int], step: int, samples: int
    ) -> None:
        """Merge batch `step` (its taps' moments, tap k owned by spot
        `owners[k]`) of `samples` samples, after checking it is finite."""
        pooled = pool(batch, owners, len(self.spots))
        for spot, moments in zip(self.spots, pooled, strict=True):
            if moments is not None:
                check_finite(spot, moments, step)
        merge_into(self.moments, pooled, range(len(pooled)))
        self.samples += samples

    def result(self) -> tuple[list[Moments], int]:
        """The moments of each spot and the samples seen; an error if none."""
        counts = [0 if m is None else m.count for m in self.moments]
        check_not_empty(min([self.samples, *counts]))
        return list(self.moments), self.samples


def check_finite(spot, batch: Moments, step: int) -> None:
    """One line naming the spot, unit and batch where a value is not finite."""
    bad = np.flatnonzero(~(np.isfinite(batch.mean) & np.isfinite(batch.m2)))
    if bad.size:
        where = (
            f"layer '{spot.spec}' produced a non-finite activation"
            if spot.side == "after"
            else f"the input of '{spot.spec}' has a non-finite value"
        )
        raise SurgeryError(
            f"{where} in unit {int(bad[0])} (batch {step}); check the data and "
            "the model's weights"
        )
