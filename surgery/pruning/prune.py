"""`prune_channels`: remove channels by a criterion, and report what it did."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import tree

from surgery.data.batches import first_batch
from surgery.errors import SurgeryError
from surgery.graph.rewrite import rewrite
from surgery.graph.spots import layer_paths, locate
from surgery.pruning import criteria
from surgery.pruning.cost import model_cost
from surgery.pruning.delete import removal_edits
from surgery.pruning.flow import trace_channels
from surgery.pruning.groups import ChannelGroup, groups_of
from surgery.pruning.report import GroupChange, PruneReport
from surgery.verbs.recalibrate import recalibrate_bn
from surgery.verbs.verify import compare

REAL_ARITHMETIC = (
    "removing dead or constant channels is exact in real arithmetic (their value "
    "moves into the next layer's bias); in floating point the next layer sums "
    "fewer terms in another order, so the outputs may differ in their last "
    "bits: 'outputs' gives what was measured"
)


def prune_channels(
    model: keras.Model,
    amount: float | int | None = None,
    criterion: str = "dead",
    data: Any = None,
    layers: list[str] | str | None = None,
    recalibrate: bool = True,
    *,
    batch_size: int | None = None,
    steps: int | None = None,
    max_samples: int | None = None,
    verbose: int | str = "auto",
    engine: Any = None,
) -> tuple[keras.Model, PruneReport]:
    """A model with fewer channels, picked by `criterion`, and a report.

    Channels are removed a whole group at a time (see
    `surgery.channel_groups`): a channel of a residual stream goes from
    every branch that adds into it, a concatenated channel from the layer
    that made it. Groups whose channels reach a model output or a layer that
    channel pruning cannot follow are left as they are, and every group
    keeps at least one channel.

    Criteria:
    - `"dead"`: channels that are 0 on every sample of `data`, wherever a
      Dense or convolution reads them (a ReLU unit that never fires). They
      contribute exact zeros, so removing them keeps the function.
    - `"constant"`: channels with variance 0 over `data` where they are
      read (measured in float64, as `activation_stats` does); their value
      times the reading layer's weights moves into its bias. A convolution
      that pads its input sees zeros, not the constant, at the border, so
      there only a zero channel goes. Both are exact in real arithmetic; the
      report says what float arithmetic made of it.
    - `"l1"`, `"l2"`: the smallest norms of the channels' kernel slices,
      summed over the group's producers.
    - `"bn_scale"`: the smallest |gamma| of the BatchNormalizations the
      channels pass (network slimming); groups without one are not pruned.
    - `"apoz"`: the largest average percentage of zeros where the channels
      are read, over `data` (measured in the same streaming pass).

    Args:
        model: A Functional or Sequential `keras.Model` (a subclassed one
            goes through `surgery.functional` first). It is not modified.
        amount: For `"l1"`, `"l2"`, `"bn_scale"` and `"apoz"`: a fraction
            in (0, 1) of each group's channels to remove (rounded down), or
            a count per group (an int of at least 1). Must be None for
            `"dead"` and `"constant"`, which remove every such channel.
        criterion: One of `"dead"` (the default), `"constant"`, `"l1"`,
            `"l2"`, `"bn_scale"`, `"apoz"`.
        data: The inputs to measure on, in any form `activation_stats`
            takes: needed by `"dead"`, `"constant"` and `"apoz"`; with any
            criterion it re-estimates BatchNormalization statistics (see
            `recalibrate`) and measures the report's output difference and,
            when batches carry labels, the accuracy before and after.
        layers: Prune only the groups these layers (by path) produce
            channels for. Defaults to `None`: every group.
        recalibrate: With `data`, re-estimate every BatchNormalization's
            moving statistics afterwards (`surgery.recalibrate_bn`), since
            pruning by a ranking criterion shifts them. Not done for `"dead"`
            and `"constant"`, which keep what every BN sees.
        batch_size: Samples per batch of `data` (default 32).
        steps: Stop each pass after this many batches (default: all).
        max_samples: Stop each pass after this many samples (default: all).
        verbose: `"auto"` (the default) or 1: progress bars; 2: one line
            per pass; 0: silent.
        engine: Where the statistics pass runs: `None`/`"local"` or
            `"ray"`/a `surgery.RayEngine`, as in `activation_stats`.

    Returns:
        `(new_model, report)`: the pruned model (same kind, same layer
        names) and a `surgery.pruning.report.PruneReport`: channels removed
        per group, parameters and FLOPs before and after, and with data the
        output difference and accuracy.

    Raises:
        SurgeryError: `criterion` is unknown; `amount` is missing, out of
            range or given to `"dead"`/`"constant"`; `data` is missing for a
            criterion that measures; `layers` names no layer; the model is
            subclassed; or the data is unreadable, empty or holds NaN/inf.

    Example:

    ```python
    import keras
    import numpy as np
    import surgery

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(32, activation="relu", name="fc1"),
        keras.layers.Dense(4, name="fc2"),
    ])
    x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    new, report = surgery.prune_channels(model, 0.25, "l1", data=x, verbose=0)
    print(new.get_layer("fc1").units, report.params_after < report.params_before)
    # 24 True
    ```
    """
    _check_arguments(criterion, amount, data)
    stream = dict(batch_size=batch_size, steps=steps, max_samples=max_samples)
    flow = trace_channels(model)
    groups = _chosen(model, groups_of(flow), layers)
    notes: list[str] = []
    if criterion in criteria.CONSTANT:
        removed, shifts = _constant(
            model,
            flow,
            groups,
            criterion,
            data,
            notes,
            engine=engine,
            verbose=verbose,
            **stream,
        )
    else:
        removed = _ranked(
            model,
            flow,
            groups,
            criterion,
            amount,
            data,
            notes,
            engine=engine,
            verbose=verbose,
            **stream,
        )
        shifts = {}
    new = rewrite(model, removal_edits(flow, removed, shifts))
    recalibrated = False
    bns = layer_paths(new, keras.layers.BatchNormalization)
    if data is not None and recalibrate and criterion in criteria.RANKED and bns:
        new = recalibrate_bn(new, data, engine=engine, verbose=verbose, **stream)
        recalibrated = True
    if criterion in criteria.CONSTANT and removed:
        notes.append(REAL_ARITHMETIC)  # dropped below if the outputs are identical
    return new, _report(
        model,
        new,
        criterion,
        amount,
        groups,
        removed,
        data,
        recalibrated,
        notes,
        verbose,
        stream,
    )


def _check_arguments(criterion, amount, data) -> None:
    if criterion not in criteria.CRITERIA:
        raise SurgeryError(
            f"unknown criterion {criterion!r}; use one of: "
            f"{', '.join(criteria.CRITERIA)}"
        )
    if criterion in criteria.CONSTANT:
        if amount is not None:
            raise SurgeryError(
                f"criterion '{criterion}' removes every such channel and takes "
                "no amount; leave amount out, or pick a ranking criterion "
                "(l1, l2, bn_scale, apoz)"
            )
    elif (
        isinstance(amount, bool)
        or not isinstance(amount, (int, float))
        or (isinstance(amount, float) and not 0 < amount < 1)
        or (isinstance(amount, int) and amount < 1)
    ):
        raise SurgeryError(
            f"criterion '{criterion}' needs an amount: a fraction in (0, 1) of "
            f"each group's channels, or a count of at least 1; got {amount!r}"
        )
    if data is None and criterion in ("dead", "constant", "apoz"):
        raise SurgeryError(
            f"criterion '{criterion}' measures the channels over data; pass "
            "data (the CLI: --data)"
        )


def _chosen(model, groups: list[ChannelGroup], layers) -> list[ChannelGroup]:
    """The groups pruning may touch: removable, and produced by `layers`.

    Each name in `layers` must make channels that can go; a name that only
    passes channels on (a BatchNormalization) is told which layers make them.
    """
    if layers is None:
        return [g for g in groups if g.fixed is None]
    names = [layers] if isinstance(layers, str) else list(layers)
    for name in names:
        locate(model, name)  # a wrong name fails here, with close names
        made = [g for g in groups if name in g.producers]
        if made and all(g.fixed for g in made):
            raise SurgeryError(
                f"the channels of layer '{name}' cannot be removed "
                f"({made[0].fixed}); leave it out of the layers to prune"
            )
        if not made:
            passing = [g for g in groups if name in g.layers and not g.fixed]
            makers = " or ".join(passing[0].producers) if passing else None
            raise SurgeryError(
                f"layer '{name}' makes no channels of its own; "
                + (
                    f"name the layer that makes the channels it uses: {makers}"
                    if makers
                    else "name a layer that makes channels (a Dense or "
                    "convolution; channel_groups lists them as producers)"
                )
            )
    return [g for g in groups if g.fixed is None and set(g.producers) & set(names)]


def _constant(model, flow, groups, criterion, data, notes, engine, **stream):
    """The constant channel classes to remove, and the bias shifts they need."""
    candidates = [
        int(r)
        for g in groups
        if g.mixed is None
        for r, ok in zip(g.roots.tolist(), g.removable.tolist(), strict=True)
        if ok
    ]
    mixed = [g for g in groups if g.mixed is not None]
    if mixed:
        notes.append(
            f"{len(mixed)} group(s) pass a layer that mixes channels "
            f"(first: '{mixed[0].mixed}'), where removing a constant channel "
            "changes the others: not pruned"
        )
    readers = criteria.readers_of(flow, candidates)
    if not readers:
        return set(), {}
    measured = criteria.measure(model, readers, data, False, engine=engine, **stream)
    constant = criteria.constant_roots(flow, measured, candidates, readers)
    removed = set()
    for root, zero in constant.items():
        if criterion == "dead" and not zero:
            continue
        uses = criteria.readers_of(flow, [root])
        if all(criteria.foldable(use, zero) for use in uses):
            removed.add(root)
    removed = _keep_one(groups, removed, notes)
    return removed, criteria.constant_shifts(flow, measured, removed, readers)


def _ranked(model, flow, groups, criterion, amount, data, notes, engine, **stream):
    measured = None
    if criterion == "apoz":
        roots = [int(r) for g in groups for r in g.roots.tolist()]
        readers = criteria.readers_of(flow, roots)
        measured = criteria.measure(model, readers, data, True, engine=engine, **stream)
    removed: set[int] = set()
    unscored = []
    for group in groups:
        score = criteria.scores(flow, group, criterion, measured)
        if score is None:
            unscored.append(group)
            continue
        count = math.floor(amount * group.size) if isinstance(amount, float) else amount
        count = min(count, group.size - 1, int(group.removable.sum()))
        order = np.argsort(np.where(group.removable, score, np.inf), kind="stable")
        removed.update(int(group.roots[k]) for k in order[:count])
    if unscored:
        notes.append(
            f"{len(unscored)} group(s) could not be scored by '{criterion}' "
            f"(first: {' + '.join(unscored[0].producers)}): not pruned"
        )
    return removed


def _keep_one(groups, removed: set[int], notes: list[str]) -> set[int]:
    """Leave every group at least one channel (the first, if all would go)."""
    for group in groups:
        roots = group.roots.tolist()
        if all(r in removed for r in roots):
            removed.discard(roots[0])
            notes.append(
                f"every channel of {' + '.join(group.producers)} qualified; "
                "one is kept so that the layer stays"
            )
    return removed


def _report(
    model,
    new,
    criterion,
    amount,
    groups,
    removed,
    data,
    recalibrated,
    notes,
    verbose,
    stream,
) -> PruneReport:
    changes = []
    for group in groups:
        gone = sum(int(r) in removed for r in group.roots.tolist())
        if gone:
            changes.append(GroupChange(group.producers, group.size, group.size - gone))
    difference = accuracy = shapes = None
    if data is not None:
        difference, accuracy = compare(
            model, new, data, labels=True, verbose=verbose, **stream
        )
        if any(None in t.shape[1:] for t in model.inputs):  # a free image size
            x = first_batch(model, data, stream.get("batch_size"))
            shapes = [tuple(t.shape[1:]) for t in tree.flatten(x)]
    if difference is not None and difference.identical and REAL_ARITHMETIC in notes:
        notes.remove(REAL_ARITHMETIC)
    before, after = model_cost(model, shapes), model_cost(new, shapes)
    return PruneReport(
        criterion,
        amount,
        changes,
        before.params,
        after.params,
        before.flops,
        after.flops,
        difference,
        accuracy[0] if accuracy else None,
        accuracy[1] if accuracy else None,
        recalibrated,
        notes,
    )
