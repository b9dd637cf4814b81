"""Layer names in a model's graph, by scope, and new names that clash with none."""

from __future__ import annotations

from surgery.graph.spots import graph_of, is_graph_model


def names_by_scope(model, scope=()) -> dict:
    names = {scope: set()}
    for op in graph_of(model).operations:
        names[scope].add(op.name)
        if is_graph_model(op):
            names.update(names_by_scope(op, scope + (op.name,)))
    return names


def unique_name(name: str, taken: set) -> str:
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    taken.add(candidate)
    return candidate
