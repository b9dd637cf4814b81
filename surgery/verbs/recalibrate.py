"""`recalibrate_bn`: BatchNormalization moving statistics recomputed from data.

A BN's moving mean and variance are an exponential average of mini-batch
statistics, taken while the weights before it were still changing; after
fine-tuning, pruning, quantization or on new data they no longer describe the
activations the layer sees at inference. This module replaces them with
population statistics over a data set, measured with the same float64
streaming reduction and exact Chan merge as `activation_stats`, so memory does
not grow with the data and the result does not depend on batch size.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import numpy as np
from keras import backend

from surgery.engines.choose import as_engine
from surgery.errors import SurgeryError
from surgery.graph.rewrite import copy_model
from surgery.graph.sites import BnSite, bn_sites, select
from surgery.graph.spots import calls_in_order, graph_of, is_graph_model
from surgery.graph.tap_models import TapPlan
from surgery.graph.taps import flatten_inputs
from surgery.numerics.moments import Moments

MODES = ("auto", "exact", "precise")
MAX_EXACT_LEVELS = 64  # "auto" reads the data once per level up to this


def recalibrate_bn(
    model: keras.Model,
    data: Any,
    layers: list[str] | str | None = None,
    *,
    mode: str = "auto",
    batch_size: int | None = None,
    steps: int | None = None,
    max_samples: int | None = None,
    verbose: int | str = "auto",
    return_report: bool = False,
    engine: Any = None,
) -> keras.Model | tuple[keras.Model, Recalibration]:
    """A copy of `model` whose BN moving statistics are population statistics.

    A BN's moving mean and variance are an exponential average of mini-batch
    statistics, taken while the weights before it were still changing; after
    fine-tuning, pruning, quantization or on new data they no longer describe
    the activations the layer sees at inference. This recomputes
    `moving_mean` and `moving_variance` (the population variance, divided by
    N) of every BatchNormalization layer, or of those named in `layers`, over
    `data`, with the same float64 streaming reduction and exact merge as
    `activation_stats`: memory does not grow with the data. gamma, beta and
    every other BN are left as they are. Units that are dead on the data
    (variance 0) are counted per BN and warned about. The input model is not
    modified and shares no variables with the result.

    Args:
        model: The Functional or Sequential `keras.Model` whose BNs to
            recalibrate, nested models included. A subclassed model has no
            graph to tap: trace it with `surgery.functional` first.
        data: The model inputs: anything `model.predict` accepts as `x`
            (NumPy arrays, a list or dict of them for several inputs, a
            `tf.data.Dataset`, a `keras.utils.PyDataset`, a generator), or a
            path or on-disk array that `surgery.sources.open_source` opens
            (image folder, `.npy`, `.npz`, `.h5`, zarr, bcolz). Labels in
            `(x, y)` or `(x, y, sample_weight)` batches are ignored. It is
            read one batch at a time, never whole. In `"exact"` mode it is
            read once per BN level and must give the same samples each time.
        layers: Name(s) of the BN layers to recalibrate, by path for BNs in
            nested models (`"resnet50/conv1_bn"`); a string is one name.
            Defaults to `None`: every BN.
        mode: How the BNs are measured. `"exact"`: the statistics the
            recalibrated model will see at inference. BNs are measured level
            by level, each with every recalibrated BN before it already
            updated and in inference mode; BNs whose upstream BNs are done
            share one pass, so the data is read once per level (the largest
            number of recalibrated BNs on one path). The result does not
            depend on batch size or sample order. `"precise"`: one pass, the
            earlier recalibrated BNs normalising by the statistics of the
            current batch, as in training and in PreciseBN. A BN with no
            recalibrated BN before it gets the same result as in `"exact"`;
            deeper BNs see inputs that depend on how the batches were made
            up, so shuffle the data and use batches like the training ones.
            `"auto"` (the default): `"exact"` when the BNs form at most 64
            levels (`MAX_EXACT_LEVELS`), which covers ResNet50 (49),
            MobileNetV2 (52) and EfficientNetB0 (49); `"precise"` beyond
            (DenseNet121 has 121), with a warning.
        batch_size: Samples per batch for arrays, paths and on-disk arrays.
            Defaults to `None`: 32, as in `model.predict`. Datasets,
            generators and `PyDataset`s keep their own batches.
        steps: Stop after this many batches. Defaults to `None`: every batch
            the data gives.
        max_samples: Stop after this many samples, cutting the last batch
            short; at least 1. Defaults to `None`: every sample the data
            gives.
        verbose: `"auto"` (the default) or 1: a Keras progress bar; 2: one
            line when the pass ends; 0: silent.
        return_report: Also return what was done: the mode used and, per BN,
            how far its mean and variance moved. Defaults to `False`: return
            the model alone.
        engine: Where the pass over the data runs. `None` (the default) or
            `"local"`: in this process. `"ray"`, or a `surgery.RayEngine`
            saying which cluster and how many workers: in a pool of Ray
            actors (needs `pip install 'surgery[ray]'`). Here each pass is
            measured on Ray.

    Returns:
        A new, uncompiled `keras.Model` with the recalibrated statistics; with
        `return_report=True` a `(model, report)` pair whose `report` is a
        `Recalibration` (`.mode`, `.samples`, `.changes`: one `BnChange` per
        BN; `.table()` formats them).

    Raises:
        SurgeryError: `mode` is not one of the values above; the model has no
            BatchNormalization layer; `layers` is empty, names a layer that is
            not a BN or does not exist (the message suggests close names); the
            model is subclassed or a Sequential model without an input shape;
            the data is missing, unreadable, empty, does not fit the model's
            inputs, or it or an activation holds NaN or inf; in `"exact"`
            mode, the data gives another number of samples on a later pass,
            or a shared BN feeds its own input; the statistics do not fit a
            BN's variable dtype; `max_samples` is below 1; or `engine` is not
            one of the values above.

    Example:

    ```python
    import keras
    import numpy as np
    import surgery

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, name="fc"),
        keras.layers.BatchNormalization(name="bn"),
    ])
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(512, 8)).astype("float32")
    new, report = surgery.recalibrate_bn(model, x, verbose=0, return_report=True)
    mean = np.mean(model.get_layer("fc")(x), axis=0)
    print(report.mode, np.allclose(new.get_layer("bn").moving_mean, mean, atol=1e-4))
    # exact True
    print(report.table())
    ```
    """
    if mode not in MODES:
        raise SurgeryError(f"mode must be 'auto', 'exact' or 'precise', got {mode!r}")
    engine = as_engine(engine)
    names = [site.path for site in select(model, bn_sites(model), layers)]
    new = copy_model(model)
    sites = _unique(select(new, bn_sites(new), names))
    if mode == "auto":
        mode = _auto_mode(new, sites)
    measure = _exact if mode == "exact" else _precise
    stream = dict(batch_size=batch_size, steps=steps, max_samples=max_samples)
    with engine.session(new, data, verbose=verbose, **stream) as session:
        changes, samples = measure(session, sites)
    report = Recalibration(mode, samples, changes)
    report.warn_dead()
    return (new, report) if return_report else new


def _auto_mode(model, sites) -> str:
    levels = max(bn_levels(model, {id(site.layer) for site in sites}).values())
    if levels <= MAX_EXACT_LEVELS:
        return "exact"
    warnings.warn(
        f"{levels} BN levels would need {levels} passes over the data in "
        "mode='exact'; using mode='precise' (one pass). Pass mode='exact' to "
        "insist.",
        stacklevel=3,
    )
    return "precise"


def _exact(session, sites: list[BnSite]) -> tuple[list[BnChange], int]:
    """Measure and store level by level, one pass over the data per level.

    Each level's new statistics reach the session before the next pass.
    """
    levels = bn_levels(session.model, {id(site.layer) for site in sites})
    samples, changes = None, {}
    order = sorted(set(levels.values()))
    for passes, level in enumerate(order, start=1):
        group = [site for site in sites if levels[id(site.layer)] == level]
        plan = TapPlan.bn_inputs([site.path for site in group])
        moments, n = session.moments(plan)
        if samples is not None and n != samples:
            raise SurgeryError(
                f"data gave {samples} samples on the first pass but {n} on pass "
                f"{passes}; mode='exact' reads it once per BN level ({len(order)}): "
                "pass arrays, a tf.data.Dataset or a PyDataset, or use mode='precise'"
            )
        samples = n
        changes.update(zip(map(id, group), _store(group, moments), strict=True))
        if passes < len(order):
            session.update({site.path: site.layer for site in group})
    return [changes[id(site)] for site in sites], samples


def _precise(session, sites: list[BnSite]) -> tuple[list[BnChange], int]:
    """One pass, the recalibrated BNs normalising by batch statistics."""
    plan = TapPlan.bn_inputs([site.path for site in sites], batch_stats=True)
    moments, n = session.moments(plan)
    return _store(sites, moments), n


def bn_levels(model, targets: set[int]) -> dict[int, int]:
    """Level of each target BN: the most target BNs on a path to it, itself included.

    A shared BN takes the highest level of its call sites, and what follows
    every call site waits for it, hence the repeat until nothing changes.
    """
    levels: dict[int, int] = {}
    for _ in range(len(targets) + 1):
        before = dict(levels)
        _walk_levels(model, None, targets, levels)
        if levels == before:
            return levels
    raise SurgeryError(
        "a shared BatchNormalization layer feeds its own input, so no order "
        "measures it exactly; use mode='precise'"
    )


def _walk_levels(model, input_levels, targets, levels) -> list[int]:
    graph = graph_of(model)
    input_levels = input_levels or [0] * len(graph.inputs)
    level = {id(t): v for t, v in zip(graph.inputs, input_levels, strict=True)}
    for node in calls_in_order(graph):
        op = node.operation
        if is_graph_model(op):
            args, _ = node.arguments.fill_in(level)
            inner = [v or 0 for v in flatten_inputs(op, args[0])]
            outs = _walk_levels(op, inner, targets, levels)
        else:
            upstream = max((level.get(id(t), 0) for t in node.input_tensors), default=0)
            if id(op) in targets:
                levels[id(op)] = max(levels.get(id(op), 0), upstream + 1)
                upstream = levels[id(op)]
            outs = [upstream] * len(node.outputs)
        for tensor, v in zip(node.outputs, outs, strict=True):
            level[id(tensor)] = v
    return [level.get(id(t), 0) for t in graph.outputs]


def _unique(sites: list[BnSite]) -> list[BnSite]:
    """One site per layer (a BN shared by two nested models appears twice)."""
    first: dict[int, BnSite] = {}
    for site in sites:
        first.setdefault(id(site.layer), site)
    return list(first.values())


def _store(sites: list[BnSite], moments: list[Moments]) -> list[BnChange]:
    changes = []
    for site, m in zip(sites, moments, strict=True):
        bn = site.layer
        old = bn.moving_mean.numpy(), bn.moving_variance.numpy()
        bn.moving_mean.assign(_cast(m.mean, bn.moving_mean.dtype, site.path))
        bn.moving_variance.assign(_cast(m.var, bn.moving_variance.dtype, site.path))
        changes.append(BnChange.measure(site.path, *old, m.mean, m.var, bn.epsilon))
    return changes


def _cast(values: np.ndarray, dtype, name: str) -> np.ndarray:
    converted = values.astype(backend.standardize_dtype(dtype))
    if not np.all(np.isfinite(converted)):
        raise SurgeryError(
            f"the statistics of '{name}' do not fit its {dtype} variables; "
            "use a float32 policy for this layer"
        )
    return converted


@dataclass(frozen=True)
class BnChange:
    """One BN's statistics before and after recalibration.

    `mean_shift` is the largest change of a unit's mean in units of its old
    standard deviation (`sqrt(old var + eps)`, what the BN divides by);
    `var_ratio_min`/`_max` bound new variance / old variance. `dead` counts
    units whose variance over the data is 0: their scale becomes
    `gamma / sqrt(eps)`.
    """

    path: str
    units: int
    dead: int
    mean_shift: float
    var_ratio_min: float
    var_ratio_max: float

    @classmethod
    def measure(cls, path, old_mean, old_var, new_mean, new_var, epsilon):
        old_mean, old_var, new_mean, new_var = (
            np.asarray(a, dtype=np.float64)
            for a in (old_mean, old_var, new_mean, new_var)
        )
        shift = np.abs(new_mean - old_mean) / np.sqrt(old_var + epsilon)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(old_var > 0, new_var / old_var, np.inf)
        ratio = np.where((old_var == 0) & (new_var == 0), 1.0, ratio)
        return cls(
            path,
            int(new_var.size),
            int(np.count_nonzero(new_var == 0)),
            float(shift.max(initial=0.0)),
            float(ratio.min(initial=np.inf)),
            float(ratio.max(initial=0.0)),
        )


@dataclass(frozen=True)
class Recalibration:
    """The mode `recalibrate_bn` used (auto resolved) and one row per BN."""

    mode: str
    samples: int
    changes: list[BnChange] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def warn_dead(self, stacklevel: int = 3) -> None:
        dead = [c for c in self.changes if c.dead]
        if dead:
            listed = ", ".join(f"'{c.path}' {c.dead} of {c.units}" for c in dead)
            warnings.warn(
                f"recalibrate_bn: units dead on the data (variance 0, so their "
                f"scale becomes gamma/sqrt(eps)): {listed}; check that the data "
                "covers what the model sees",
                stacklevel=stacklevel,
            )

    def table(self) -> str:
        rows = [("BN", "units", "dead", "max |d mean|/std", "new/old var")]
        for c in self.changes:
            ratio = f"{c.var_ratio_min:.3g} .. {c.var_ratio_max:.3g}"
            rows.append(
                (c.path, str(c.units), str(c.dead), f"{c.mean_shift:.3g}", ratio)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        )
