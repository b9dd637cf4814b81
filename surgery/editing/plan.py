"""Layer surgery as rewrite edits: the user's names resolved, new layers named.

`plan` turns what a user asks of `surgery.edit` (layers to delete, insert,
replace and deepen) into the edits of `surgery.graph.edits`, and says what
is left to do once the rewrite has built the new layers: identity weights
for the deepened ones, the old weights copied into the replacements. Layers
are named by path (`"outer/inner/fc"`); `"name:k"` picks the k-th call of a
shared layer for delete, replace and deepen, while a spot to insert at reads
as in `insert_identity_bn` (`"name:k"` is output k of a multi-output layer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from surgery.editing.identity_layers import identity_copy
from surgery.errors import SurgeryError
from surgery.graph.edits import InsertAfter, Remove, Replace, call_order, insert_at
from surgery.graph.naming import names_by_scope, unique_name
from surgery.graph.spots import find_spots, locate, nodes_in, split_index


@dataclass
class Plan:
    """The edits to rewrite with, then `finish()` once the new model is built."""

    edits: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    steps: list[Callable[[], None]] = field(default_factory=list)

    def finish(self) -> None:
        for step in self.steps:
            step()


@dataclass(frozen=True)
class Site:
    """A layer the user named, and the calls of it an edit applies to."""

    spec: str
    path: str
    call: int | None
    scope: tuple[str, ...]
    graph: Any
    layer: keras.layers.Layer
    nodes: tuple

    @property
    def key(self) -> tuple:
        return self.scope, id(self.layer)


def plan(
    model: keras.Model,
    *,
    delete: Sequence[str] | str | None = None,
    insert_after: Mapping[str, Any] | None = None,
    insert_before: Mapping[str, Any] | None = None,
    replace: Mapping[str, keras.layers.Layer] | None = None,
    deepen: Sequence[str] | str | None = None,
    copy_weights: bool = True,
) -> Plan:
    """The edits for one rebuild of `model`, or one `SurgeryError`."""
    delete, deepen = _names("delete", delete), _names("deepen", deepen)
    insert_after = _mapping("insert_after", insert_after)
    insert_before = _mapping("insert_before", insert_before)
    replace = _mapping("replace", replace)
    if not (delete or insert_after or insert_before or replace or deepen):
        raise SurgeryError(
            "no edits: name layers in delete=, insert_after=, insert_before=, "
            "replace= or deepen="
        )
    if not isinstance(copy_weights, bool):
        raise SurgeryError(f"copy_weights must be True or False, got {copy_weights!r}")
    out, taken = Plan(), names_by_scope(model)
    claims: dict[tuple, str] = {}
    given: dict[int, str] = {}  # id(layer given) -> where, to refuse it twice
    for spec, by in replace.items():
        site = _claim(claims, _site(model, spec), "replace")
        _adopt(by, site.scope, taken, given, f"replace '{spec}'", free=_freed(site))
        out.edits.append(Replace(site.path, by, site.call))
        if copy_weights:
            out.steps.append(lambda site=site, by=by: _copy_weights(site, by))
    for spec in delete:
        site = _claim(claims, _site(model, spec), "delete")
        out.edits.append(Remove(site.path, site.call))
        companions = _cast_companions(site)
        out.edits.extend(companions)
        if not companions:
            out.notes.extend(_dtype_change(site))
    for spec in deepen:
        site = _claim(claims, _site(model, spec), "deepen")
        name = unique_name(
            f"{site.layer.name}_deep", taken.setdefault(site.scope, set())
        )
        copy = identity_copy(site.layer, name, spec)
        out.edits.append(InsertAfter(site.path, copy.layer, call=site.call))
        out.steps.append(lambda copy=copy: copy.layer.set_weights(copy.weights))
        out.notes.extend([copy.note] if copy.note else [])
    for side, mapping in (("after", insert_after), ("before", insert_before)):
        for spec, layers in mapping.items():
            spot = find_spots(model, **{side: spec})[0]
            if side == "after" and (spot.scope, id(spot.layer)) in claims:
                claimed = claims[(spot.scope, id(spot.layer))]
                if claimed.startswith("delete"):
                    raise SurgeryError(
                        f"insert_after '{spec}' and {claimed} name the same layer; "
                        "insert after the layer that feeds it instead"
                    )
            where = f"insert_{side} '{spec}'"
            made = _inserted(layers, spot.scope, taken, given, where)
            out.edits.append(insert_at(spot, made))
    return out


def _site(model, spec: str) -> Site:
    path, call = split_index(spec)  # k counts calls here
    scope, graph, layer = locate(model, path, spec)
    calls = call_order(graph, layer)
    if call is not None and call >= len(calls):
        raise SurgeryError(
            f"'{spec}': '{path}' is called {len(calls)} time(s) in its model; "
            f"name one call as '{path}:0' ... '{path}:{len(calls) - 1}', or all "
            f"as '{path}'"
        )
    nodes = tuple(calls if call is None else [calls[call]])
    return Site(spec, path, call, tuple(scope), graph, layer, nodes)


def _claim(claims: dict, site: Site, verb: str) -> Site:
    """Refuse two of delete/replace/deepen on one layer: which would win?"""
    here = f"{verb} '{site.spec}'"
    if site.key in claims:
        raise SurgeryError(
            f"{here} and {claims[site.key]} name the same layer; keep one of them"
        )
    claims[site.key] = here
    return site


def _names(what: str, names) -> list[str]:
    if names is None:
        return []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise SurgeryError(
            f"{what} must be a layer name or a list of them, got {names!r}"
        )
    return list(names)


def _mapping(what: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SurgeryError(
            f"{what} must be a dict from layer names to layers, got "
            f"{type(value).__name__}"
        )
    return dict(value)


def _freed(site: Site) -> str | None:
    """The name a replacement may take over: the old one's, if no call keeps it."""
    every_call = len(site.nodes) == len(call_order(site.graph, site.layer))
    return site.layer.name if every_call else None


def _adopt(layer, scope, taken, given, where, free=None) -> None:
    """Check a layer the user gave, and rename it if its name is taken."""
    if not isinstance(layer, keras.layers.Layer):
        raise SurgeryError(f"{where}: {layer!r} is not a Keras layer")
    if id(layer) in given:
        raise SurgeryError(
            f"{where}: layer '{layer.name}' is already given for {given[id(layer)]}; "
            "pass a new layer for each place (or a function that makes one)"
        )
    given[id(layer)] = where
    names = taken.setdefault(scope, set())
    if layer.name != free:
        layer.name = unique_name(layer.name, names)


def _inserted(layers, scope, taken, given, where):
    """The layers to insert, named; a function of the spot's shape made lazy."""
    if isinstance(layers, keras.layers.Layer) or (
        isinstance(layers, Sequence) and not isinstance(layers, str)
    ):
        group = [layers] if isinstance(layers, keras.layers.Layer) else list(layers)
        if not group:
            raise SurgeryError(f"{where}: no layers to insert")
        for layer in group:
            _adopt(layer, scope, taken, given, where)
        return layers
    if not callable(layers):
        raise SurgeryError(
            f"{where}: give a Keras layer, a list of layers, or a function of "
            f"the input shape that returns one; got {type(layers).__name__}"
        )

    def make(tensor):
        made = layers(tuple(tensor.shape))
        group = [made] if isinstance(made, keras.layers.Layer) else made
        if not isinstance(group, Sequence) or not group:
            raise SurgeryError(
                f"{where}: the function returned {made!r}, not a Keras layer"
            )
        for layer in group:
            _adopt(layer, scope, taken, given, where)
        return made

    return make


def _cast_companions(site: Site) -> list[Remove]:
    """The float32 `Identity` that `insert_identity_bn` put after a float64 BN.

    It casts the BN's float64 output back to float32 and is its only
    consumer; without the BN it has nothing to cast, so it goes too.
    """
    if not isinstance(site.layer, keras.layers.BatchNormalization):
        return []
    own = nodes_in(site.graph)
    removals = []
    for node in site.nodes:
        output = node.outputs[0]
        if any(t is output for t in site.graph.outputs):
            continue
        users = [n for n in own if any(t is output for t in n.input_tensors)]
        if len(users) != 1:
            continue
        cast = users[0].operation
        is_cast = type(cast) is keras.layers.Identity and cast.name.startswith(
            f"{site.layer.name}_cast"
        )
        if is_cast:
            call = call_order(site.graph, cast).index(users[0])
            path = "/".join((*site.scope, cast.name))
            removals.append(Remove(path, call))
    return removals


def _dtype_change(site: Site) -> list[str]:
    """A note when the layer deleted cast its input to another dtype."""
    node = site.nodes[0]
    before, after = node.input_tensors[0].dtype, node.outputs[0].dtype
    if before == after:
        return []
    return [
        f"delete '{site.spec}': the layer cast {before} to {after}; its "
        f"consumers now get {before}"
    ]


def _copy_weights(site: Site, by: keras.layers.Layer) -> None:
    """Give the replacement the old layer's weights, if their shapes fit."""
    old = [tuple(w.shape) for w in site.layer.weights]
    new = [tuple(w.shape) for w in by.weights]
    if old != new:
        raise SurgeryError(
            f"replace '{site.spec}': its weights have shapes {old} and the new "
            f"layer's {new}; pass copy_weights=False to keep the new layer's own"
        )
    values = [np.asarray(keras.ops.convert_to_numpy(w)) for w in site.layer.weights]
    by.set_weights(values)
