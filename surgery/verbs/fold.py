"""`fold_bn`: BatchNormalization folded into the Dense or convolution before it.

At inference a BN right after a linear layer is a per-channel affine map,
`y = x * s + (beta - mean * s)` with `s = gamma / sqrt(var + eps)`, and so is
the linear layer, so the pair is one layer with kernel `W * s` and bias
`(b - mean) * s + beta`. The folded model computes the same function with one
layer fewer per BN and no BN left to drift when the model is deployed.

A BN that does not sit directly on such a layer's output (an activation in
between, the layer shared or its output used elsewhere, another axis) is
folded forward into the Dense or convolution that consumes it where that is
exact, looking through layers that are the identity at inference (Dropout
and its kinds, GaussianNoise, ActivityRegularization, ...), which stay.
Folding repeats until nothing changes, so a chain such as
Conv -> BN -> BN folds completely. The rest cannot be folded; `foldable`
says which and why, and `fold_bn` leaves them in place.

Which BNs fold where is `surgery.graph.sites`' job, the new weights
`surgery.numerics.folding`'s, and the rebuild `surgery.graph.rewrite`'s.
"""

from __future__ import annotations

import warnings

import keras

from surgery.errors import SurgeryError
from surgery.graph.edits import Remove, Replace, SetWeights
from surgery.graph.rewrite import rewrite
from surgery.graph.sites import BnSite, bn_sites, select
from surgery.numerics.folding import (
    affine,
    cast_weights,
    fold_backward,
    fold_forward,
    host,
)


def foldable(model: keras.Model) -> dict[str, str]:
    """Every BatchNormalization layer's path mapped to how it folds, or why not.

    The dry run of `fold_bn`: nothing is changed. Use it to see which BNs
    `fold_bn` will fold and why the others stay (an activation between the
    layer and its BN, a shared layer, an output used elsewhere, another axis,
    a model input, ...).

    Args:
        model: The Functional or Sequential `keras.Model` to inspect, nested
            models included. A subclassed model has no graph to read: trace it
            with `surgery.functional` first.

    Returns:
        A dict from each BN's path, in graph order (`"resnet50/conv1_bn"` for
        a BN in a nested model), to `"ok"` when it folds into the layer
        before it, `"ok: forward into Conv2D 'x'"` when it folds into the
        layer after it (`"ok: forward into Dense 'fc2' (through Dropout
        'dropout')"` past layers that are the identity at inference), either
        with `" (pass 2)"` (or a later pass) when it folds once the BNs next
        to it have folded; anything else is the reason the BN stays.

    Raises:
        SurgeryError: the model has no BatchNormalization layer, or it is
            subclassed or a Sequential model without an input shape.

    Example:

    ```python
    import keras
    import surgery

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, outputs)
    for path, how in surgery.foldable(model).items():
        print(path, "->", how)
    # bn1 -> ok
    # bn2 -> it follows ReLU 'relu', not a Dense or convolution layer; ...
    ```
    """
    return fold_report(model)[1]


def fold_bn(model: keras.Model, layers: list[str] | str | None = None) -> keras.Model:
    """A new model with BatchNormalization folded into the layer before it.

    At inference a BN right after a Dense or convolution layer is a per-channel
    affine map, so the pair is one layer with kernel `W * s` and bias
    `(b - mean) * s + beta`, where `s = gamma / sqrt(var + eps)`: the folded
    model computes the same function with one layer fewer per BN and no BN
    left to drift when deployed. A BN that does not sit directly on such a
    layer's output is folded forward into the Dense or convolution that
    consumes it where that is exact, looking through layers that are the
    identity at inference (Dropout and its kinds, GaussianNoise,
    GaussianDropout, AlphaDropout, ActivityRegularization, Identity, a linear
    Activation), which stay in the new model; folding repeats until nothing
    changes, so a chain such as Conv -> BN -> BN folds completely. BNs that
    cannot be folded are left in place and listed in a warning;
    `foldable(model)` gives the same list with the reasons.

    The scale is taken as the backend's BN computes it (`rsqrt(var + eps) *
    gamma` in the layer's dtype), the rest in float64 on the host and cast to
    the variables' dtype once, so the folded model reproduces the BN model's
    own float32 arithmetic as closely as a single rounding allows, and a BN
    that is an exact identity folds to no change at all. A producer without a
    bias gets one. The input model is not modified and shares no variables
    with the result; a Sequential model stays Sequential.

    Args:
        model: The Functional or Sequential `keras.Model` whose BNs to fold,
            nested models included. A subclassed model has no graph to
            rewrite: trace it with `surgery.functional` first.
        layers: Name(s) of the BN layers to fold, by path for BNs in nested
            models (`"resnet50/conv1_bn"`); a string is one name. Each must be
            foldable. Defaults to `None`: every foldable BN.

    Returns:
        A new, uncompiled `keras.Model` without the folded BNs, the layers
        they were folded into carrying the folded weights.

    Raises:
        SurgeryError: the model has no BatchNormalization layer; `layers` is
            empty, names a layer that is not a BN or does not exist (the
            message suggests close names), or names a BN that cannot be
            folded (the message says why); folding gives non-finite weights
            in the layer's dtype; or the model is subclassed or a Sequential
            model without an input shape.

    Example:

    ```python
    import keras
    import numpy as np
    import surgery
    from surgery.synthetic import pretrained_like

    model = pretrained_like(keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(name="relu"),
    ]))
    folded = surgery.fold_bn(model)
    print([layer.name for layer in folded.layers])  # ['conv', 'relu']
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32")
    print(surgery.verify(model, folded, x, verbose=0).max_abs_diff < 1e-5)  # True
    ```
    """
    new, _, left = fold_report(model, layers)
    if layers is not None and left:
        raise SurgeryError(f"cannot fold '{left[0].path}': {left[0].reason}")
    if left:
        listed = "; ".join(f"'{s.path}' ({s.reason})" for s in left)
        warnings.warn(
            f"fold_bn left {len(left)} BatchNormalization layer(s) in place: {listed}",
            stacklevel=2,
        )
    return new


def fold_report(model, layers=None) -> tuple[keras.Model, dict[str, str], list]:
    """Folds to a fixed point: `(new model, foldable report, sites left)`.

    Each pass folds every foldable BN whose neighbour no other BN of the pass
    folds into, so a layer gets one BN per pass; the next pass sees the
    result. The model is always rebuilt, so the result shares nothing with it.
    """
    order = [site.path for site in bn_sites(model)]
    chosen = {site.path for site in select(model, bn_sites(model), layers)}
    report, current, passes = {}, model, 0
    while True:
        sites = [site for site in bn_sites(current) if site.path in chosen]
        batch = _one_pass(sites)
        if not batch and current is not model:
            break
        passes += 1
        for site in batch:
            report[site.path] = site.reason + (
                f" (pass {passes})" if passes > 1 else ""
            )
        current = rewrite(
            current, [edit for site in batch for edit in fold_edits(site)]
        )
        if not batch:
            break
    left = [site for site in sites if site.path not in report]
    report.update({site.path: site.reason for site in left})
    return current, {path: report[path] for path in order if path in report}, left


def _one_pass(sites) -> list[BnSite]:
    """The foldable sites of one pass: each neighbour layer used by one BN."""
    touched, batch = set(), []
    for site in sites:
        if not site.folds:
            continue
        ids = {id(site.layer), id(site.target)}
        if ids & touched:
            continue
        touched |= ids
        batch.append(site)
    return batch


def fold_edits(site: BnSite) -> list:
    """The edits that fold one site: its BN removed, its neighbour refolded.

    The neighbour is replaced by a copy with a bias (a producer without one
    gets one) holding the folded weights.
    """
    target = site.target
    scale, shift = affine(site.layer)
    weights = [host(w) for w in target.get_weights()]
    fold = fold_backward if site.backward else fold_forward
    with_bias = target.__class__.from_config({**target.get_config(), "use_bias": True})
    folded = cast_weights(fold(target, weights, scale, shift), with_bias)
    path = "/".join((*site.scope, target.name))
    return [Remove(site.path), Replace(path, with_bias), SetWeights(path, folded)]
