"""Layer specs on the command line: `ReLU`, `Dense:units=64,activation=gelu`,
or `module:function` (the user's own function returning a fresh layer).

`surgery edit` takes them as `NAME=SPEC` (`--replace fc1=Dense:units=64`).
A spec names a layer class, looked up in `keras.layers` and then in Keras'
registered custom objects, with its constructor's keyword arguments after a
colon. Values are Python literals (`64`, `(3, 3)`, `None`, `'same'`), or
plain strings when they are not (`gelu`, `same`); commas inside brackets,
parentheses or quotes do not split. `X:Y` is a class spec when `Y` holds an
`=` or `X` names a layer class, else a `module:function` reference.

Every call builds a new layer: one spec used twice gives two layers. A
malformed spec is a `UsageError` (exit 2); a reference that does not import,
fails or returns no layer is a `SurgeryError` (exit 1). Both say what is
wrong in one line.
"""

from __future__ import annotations

import ast
import difflib
import inspect

import keras

from surgery.errors import SurgeryError, UsageError, first_line
from surgery.files import pyref

EXAMPLE = "fc1=Dense:units=64,activation=gelu"


def split_assignment(text: str, flag: str) -> tuple[str, str]:
    """`NAME=SPEC` split at its first `=`: the layer name, then the spec.

    `fc1=Dense:units=64` gives `("fc1", "Dense:units=64")`; `flag` (e.g.
    `--replace`) names the option in the error for a missing name or spec.
    """
    name, equals, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not equals or not name or not spec:
        raise UsageError(f"{flag} {text!r}: write NAME=SPEC, e.g. {flag} {EXAMPLE}")
    return name, spec


def parse_layer(spec: str, *, allow_list: bool = False, name: str | None = None):
    """A new keras layer built from `spec`.

    With `allow_list`, a `module:function` may also return a non-empty list
    of layers (what an insertion takes); the list is returned as it is.
    `name` names a class spec's layer unless the spec gives `name=` itself.
    """
    text = spec.strip()
    head, colon, tail = text.partition(":")
    head, tail = head.strip(), tail.strip()
    if not text or (colon and not head):
        raise UsageError(
            f"layer spec {spec!r}: write Class, Class:key=value or module:function"
        )
    if colon and "=" not in tail and find_class(head) is None:
        return _from_reference(spec, allow_list)
    cls = layer_class(head, spec)
    kwargs = parse_kwargs(tail, spec)
    if name is not None:
        kwargs.setdefault("name", name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"layer spec {spec!r}: {_why(cls, kwargs, e)}") from None


def find_class(name: str):
    """The layer class `name` names in keras.layers or the registered custom
    objects (`package>Class`, or `Class` when one package registers it), or None."""
    cls = getattr(keras.layers, name, None)
    if is_layer_class(cls):
        return cls
    cls = keras.saving.get_registered_object(name)
    if is_layer_class(cls):
        return cls
    found = _registered_by_class_name(name)
    return found[0][1] if len(found) == 1 else None


def layer_class(name: str, spec: str):
    """`find_class(name)`, or a one-line UsageError with the close matches."""
    cls = find_class(name)
    if cls is not None:
        return cls
    found = _registered_by_class_name(name)
    if len(found) > 1:
        names = ", ".join(key for key, _ in found)
        raise UsageError(
            f"layer spec {spec!r}: {name} is registered by several packages; "
            f"write one of {names}"
        )
    hint = close_matches(name)
    hint = f"; did you mean {', '.join(hint)}?" if hint else ""
    raise UsageError(
        f"layer spec {spec!r}: no layer class {name!r} in keras.layers or the "
        f"registered custom objects{hint}"
    )


def is_layer_class(value) -> bool:
    return isinstance(value, type) and issubclass(value, keras.layers.Layer)


def close_matches(name: str) -> list[str]:
    """keras.layers class names like `name`, case first (`relu` -> ReLU)."""
    names = [n for n in dir(keras.layers) if is_layer_class(getattr(keras.layers, n))]
    by_lower = {}
    for n in names:
        by_lower.setdefault(n.lower(), []).append(n)
    same_case = by_lower.get(name.lower(), [])
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.7)
    found = same_case + [n for lower in close for n in by_lower[lower]]
    return list(dict.fromkeys(found))[:3]


def _registered_by_class_name(name: str) -> list[tuple[str, type]]:
    return [
        (key, value)
        for key, value in keras.saving.get_custom_objects().items()
        if key.rpartition(">")[2] == name and is_layer_class(value)
    ]


def parse_kwargs(text: str, spec: str) -> dict:
    """`units=64,kernel_size=(3,3),padding=same` as a dict of values."""
    kwargs = {}
    for item in split_top_level(text, spec):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key.isidentifier():
            raise UsageError(f"layer spec {spec!r}: write key=value, got {item!r}")
        if key in kwargs:
            raise UsageError(f"layer spec {spec!r}: {key} given twice")
        if not value:
            raise UsageError(f"layer spec {spec!r}: {key}= has no value")
        kwargs[key] = literal(value)
    return kwargs


def literal(text: str):
    """A Python literal's value (`64`, `(3, 3)`, `None`), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def split_top_level(text: str, spec: str) -> list[str]:
    """`text` split at the commas outside brackets, parentheses and quotes;
    empty items are dropped."""
    closing = {")": "(", "]": "[", "}": "{"}
    items, opened, quote, start, balanced = [], [], None, 0, True
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            opened.append(char)
        elif char in closing:
            if not opened or opened.pop() != closing[char]:
                balanced = False
                break
        elif char == "," and not opened:
            items.append(text[start:i])
            start = i + 1
    if quote or opened or not balanced:
        raise UsageError(f"layer spec {spec!r}: unbalanced brackets or quotes")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _why(cls, kwargs: dict, error: Exception) -> str:
    """What a constructor's TypeError or ValueError means, in one line."""
    name = cls.__name__
    unknown = [key for key in kwargs if key not in accepted_arguments(cls)]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], accepted_arguments(cls), n=1)
        hint = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{name} has no argument {unknown[0]!r}{hint}"
    required = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in kwargs
    ]
    if required and isinstance(error, TypeError):
        return f"{name} needs argument {required[0]!r}, e.g. {name}:{required[0]}=..."
    return f"{name}: {first_line(error)}"


def accepted_arguments(cls) -> list[str]:
    """The keyword arguments `cls(...)` takes by name, up its classes'
    `__init__`s as far as they pass `**kwargs` on (Keras' `Layer` also takes
    `input_dim` and `input_shape`)."""
    names = ["input_dim", "input_shape"] if is_layer_class(cls) else []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = list(inspect.signature(init).parameters.values())
        except (TypeError, ValueError):
            break
        names += [
            p.name
            for p in params[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def _from_reference(spec: str, allow_list: bool):
    text = spec.strip()
    if not pyref.is_reference(text):
        raise UsageError(
            f"layer spec {spec!r}: write Class, Class:key=value or module:function"
        )
    value = pyref.resolve(text, "layer spec")
    if isinstance(value, keras.layers.Layer):
        raise SurgeryError(
            f"layer spec {spec!r} is a layer object, and each use needs a new "
            "layer: name a function (or class) that returns one"
        )
    if not callable(value):
        raise SurgeryError(
            f"layer spec {spec!r} is {_a(value)}, not a function "
            "returning a keras layer"
        )
    try:
        layer = value()
    except Exception as e:  # noqa: BLE001 - the user's code, reported in one line
        raise SurgeryError(
            f"layer spec {spec!r}: calling it failed: "
            f"{type(e).__name__}: {first_line(e)}"
        ) from None
    return _checked(spec, layer, allow_list)


def _checked(spec, value, allow_list):
    if isinstance(value, keras.layers.Layer):
        return value
    if allow_list and isinstance(value, list | tuple) and value:
        layers = list(value)
        if all(isinstance(v, keras.layers.Layer) for v in layers):
            if len({id(v) for v in layers}) == len(layers):
                return layers
            raise SurgeryError(f"layer spec {spec!r} returned one layer twice")
    wanted = "a keras layer or a list of layers" if allow_list else "a keras layer"
    raise SurgeryError(f"layer spec {spec!r} returned {_a(value)}, not {wanted}")


def _a(value) -> str:
    """`a list`, `an int`: the type of `value` with its article."""
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"
