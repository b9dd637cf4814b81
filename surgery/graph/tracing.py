"""`functional`: a subclassed model traced into an equivalent Functional model.

Surgery rewrites graphs, and a subclassed `keras.Model` has none: its
`call()` is Python. Calling `call()` on symbolic `keras.Input`s records every
Keras layer and `keras.ops` operation it runs as a node, so the result is a
Functional model that reuses the very same layer objects (and so the same
weights). Nested subclassed models are traced the same way and become nested
Functional models, so their layers keep paths like `"p_net/conv1"`.

What cannot be recorded fails loudly rather than silently: a raw
`tf.*`/`jnp.*`/`torch.*` call on a symbolic tensor, or Python control flow
(`if`, `while`) on a tensor's value. The error names the first such line of
the model's code. A trace that succeeds is checked against the original on
random inputs, compiled, with `np.array_equal`.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import os
import re
import sys
import traceback

import keras
import numpy as np
from keras import tree

from surgery.errors import SurgeryError, first_line
from surgery.graph.spots import is_graph_model
from surgery.graph.taps import deep_graphs


def is_subclassed(model) -> bool:
    """A `keras.Model` whose graph is Python code rather than a Functional graph."""
    return isinstance(model, keras.Model) and not is_graph_model(model)


def functional(
    model: keras.Model,
    input_shape: tuple | list | dict | None = None,
    *,
    check: bool = True,
    seed: int = 0,
) -> keras.Model:
    """An equivalent Functional model built from a subclassed model's `call`.

    Surgery rewrites graphs, and a subclassed `keras.Model` has none: its
    `call()` is Python. Calling `call()` on symbolic `keras.Input`s records
    every Keras layer and `keras.ops` operation it runs, so the result is a
    Functional model that reuses the very same layer objects (and so the same
    weights), ready for `insert_identity_bn`, `fold_bn` and the rest. Nested
    subclassed models are traced the same way and become nested Functional
    models, so their layers keep paths like `"p_net/conv1"`. What cannot be
    recorded (a raw `tf.*`/`jnp.*`/`torch.*` call on a symbolic tensor,
    Python control flow on a tensor's value) fails with the first such line
    of the model's code.

    Args:
        model: A subclassed `keras.Model`, built (called once on a batch,
            `model.build(shape)`, or `model.build()` when its `build` has a
            default shape, as mtcnn's networks do) unless `input_shape` is
            given. A Functional or Sequential model is returned as it is.
        input_shape: The input shape without the batch dimension, e.g.
            `(32, 32, 3)`, or a list or dict of them for several inputs;
            `None` for a free dimension, e.g. `(None, None, 3)` for a fully
            convolutional model (the check then runs it on 32x32 inputs, or
            the first of 64, 128, 256 it accepts). Defaults to `None`: the
            shape the model was built with.
        check: Run both models (compiled, `predict_on_batch`) on two random
            batches of two samples and raise unless the outputs are
            bit-identical. Defaults to `True`; `False` skips it.
        seed: Seed of those random inputs. Defaults to `0`.

    Returns:
        A Functional `keras.Model` named like `model` whose layers are the
        model's own layer objects; nested subclassed models become nested
        Functional models. `model` itself when it is not subclassed.

    Raises:
        SurgeryError: `input_shape` is not given and the model was not built
            on one input shape; `input_shape` holds something other than
            positive sizes and `None`; `call` runs something that cannot be
            traced (the error names the first such line), or cannot run with
            the free dimensions given; or, with `check`, the traced model
            computes something else, or runs on none of the sizes tried for
            its free dimensions.

    Example:

    ```python
    import keras
    import numpy as np
    import surgery


    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.fc1 = keras.layers.Dense(16, activation="relu", name="fc1")
            self.fc2 = keras.layers.Dense(4, name="fc2")

        def call(self, x):
            return self.fc2(self.fc1(x))


    net = Net()
    traced = surgery.functional(net, input_shape=(8,))
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    new = surgery.insert_identity_bn(traced, after="fc1", data=x, verbose=0)
    print([layer.name for layer in new.layers])
    # ['input_layer', 'fc1', 'fc1_bn', 'fc2']
    ```
    """
    if not is_subclassed(model):
        return model
    new = _trace(model, input_shape, scope=model.name)
    if check:
        _check_equal(model, new, seed)
    return new


def _trace(model, input_shape, scope):
    shapes = _input_shapes(model, input_shape, scope)
    inputs = tree.map_shape_structure(lambda s: keras.Input(shape=s), shapes)
    with _nested_traced(model, scope), deep_graphs():
        try:
            outputs = model.call(inputs)
        except SurgeryError:
            raise
        except Exception as e:  # anything Keras refuses to record
            if _has_free_dims(shapes):
                raise _free_dims_refused(model, scope, shapes, e) from None
            raise _untraceable(model, scope, e) from None
        return keras.Model(inputs, outputs, name=model.name)


def _input_shapes(model, input_shape, scope):
    if input_shape is not None:
        return _given_shapes(model, scope, input_shape)
    built = _build_shapes(model)
    if len(built) != 1:
        raise SurgeryError(
            f"subclassed model '{scope}' ({type(model).__name__}) does not say its "
            "input shape (it was not built with one); pass input_shape=(...) "
            "without the batch dimension, e.g. input_shape=(224, 224, 3) "
            "(on the command line: --input-shape 224,224,3)"
        )
    shapes = next(iter(built.values()))
    return tree.map_shape_structure(lambda s: tuple(s)[1:], _as_shape_tree(shapes))


def _build_shapes(model) -> dict:
    """The shapes `model.build` was given, or its signature's defaults: mtcnn
    calls `build()` on `build(self, input_shape=(None, 48, 48, 3))`, and Keras
    records only the arguments passed."""
    built = dict(getattr(model, "_build_shapes_dict", None) or {})
    if built:
        return built
    try:
        parameters = inspect.signature(model.build).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if _is_shape_tree(p.default)}


def _is_shape_tree(value) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(map(_is_shape_tree, value.values()))
    nested = isinstance(value, (list, tuple)) and bool(value)
    return nested and (_is_shape(value) or all(map(_is_shape_tree, value)))


def _given_shapes(model, scope, value):
    """`input_shape` as an `_as_shape_tree`, every dimension checked."""
    if isinstance(value, dict) and value:
        return {k: _given_shapes(model, scope, v) for k, v in value.items()}
    nested = isinstance(value, (list, tuple)) and value
    if nested and all(isinstance(v, (list, tuple, dict)) for v in value):
        return [_given_shapes(model, scope, v) for v in value]
    if nested and all(d is None or _is_size(d) for d in value):
        return tuple(value)
    raise SurgeryError(
        f"input_shape {value!r} of '{scope}' ({type(model).__name__}): give "
        "each dimension as a positive int or None (a free dimension), without "
        "the batch dimension, e.g. (None, None, 3)"
    )


def _is_size(value) -> bool:
    return (
        isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and value > 0
    )


def _has_free_dims(shapes) -> bool:
    return any(d is None for shape in _shape_list(shapes) for d in shape)


def _shape_list(shapes) -> list[tuple]:
    """The shapes of an `_as_shape_tree` (tuples are shapes, lists nest)."""
    if isinstance(shapes, dict):
        return [s for value in shapes.values() for s in _shape_list(value)]
    if isinstance(shapes, list):
        return [s for value in shapes for s in _shape_list(value)]
    return [shapes]


def _free_dims_refused(model, scope, shapes, error) -> SurgeryError:
    return SurgeryError(
        f"cannot trace subclassed model '{scope}' ({type(model).__name__}) with "
        f"free dimensions (None) in its input shape {_shape_text(shapes)}: "
        f"{_why(error)}; {_give_sizes(model, shapes)}"
    )


def _give_sizes(model, shapes) -> str:
    """What to pass instead of free dimensions: the built shape, else 224s."""
    built = _build_shapes(model)
    if len(built) == 1:
        example = _as_shape_tree(next(iter(built.values())))
        example = tree.map_shape_structure(lambda s: tuple(s)[1:], example)
    else:
        example = _fixed(shapes, 224)
    if _has_free_dims(example):
        example = _fixed(example, 224)
    text = _shape_text(example)
    flag = f" (--input-shape {text.strip('()')})" if isinstance(example, tuple) else ""
    return f"give every dimension a size, e.g. input_shape={text}{flag}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _why(error) -> str:
    """Keras' message in one line, past its "Exception encountered" preamble."""
    lines = [_ANSI.sub("", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    if len(lines) > 1 and lines[0].startswith("Exception encountered when calling"):
        return lines[1]
    return first_line(error)


def _shape_text(shapes) -> str:
    return str(shapes).replace(" ", "")


def _fixed(shapes, size):
    """`shapes` with every free dimension set to `size`."""
    return tree.map_shape_structure(
        lambda s: tuple(size if d is None else d for d in s), shapes
    )


def _as_shape_tree(shapes):
    """Tuples for shapes, so `map_shape_structure` sees them as leaves."""
    if isinstance(shapes, dict):
        return {k: _as_shape_tree(v) for k, v in shapes.items()}
    if isinstance(shapes, (list, tuple)) and shapes and not _is_shape(shapes):
        return [_as_shape_tree(s) for s in shapes]
    return tuple(shapes)


def _is_shape(value) -> bool:
    return all(d is None or isinstance(d, (int, np.integer)) for d in value)


@contextlib.contextmanager
def _nested_traced(model, scope):
    """Swaps each nested subclassed model attribute for its traced version."""
    swapped, traced = [], {}

    def trace(value):
        if not is_subclassed(value) or value is model:
            return value
        if id(value) not in traced:  # a model used twice is traced once
            traced[id(value)] = _trace(value, None, f"{scope}/{value.name}")
        return traced[id(value)]

    for name, value in list(vars(model).items()):
        if isinstance(value, (list, tuple)) and any(map(is_subclassed, value)):
            replacement = [trace(item) for item in value]  # e.g. self.blocks = [...]
        elif isinstance(value, dict) and any(map(is_subclassed, value.values())):
            replacement = {key: trace(item) for key, item in value.items()}
        elif is_subclassed(value) and value is not model:
            replacement = trace(value)
        else:
            continue
        object.__setattr__(model, name, replacement)
        swapped.append((name, value))
    try:
        yield
    finally:
        for name, value in swapped:
            object.__setattr__(model, name, value)


_FRAMEWORKS = ("keras", "numpy", "tensorflow", "jax", "torch", "optree", "surgery")


def _is_library(filename: str) -> bool:
    """Keras, the backends, NumPy, surgery or the standard library: not user code."""
    path = os.path.abspath(filename)
    frameworks = [
        sys.modules[name].__file__
        for name in _FRAMEWORKS
        if getattr(sys.modules.get(name), "__file__", None)
    ]
    if path.startswith(tuple(os.path.dirname(f) + os.sep for f in frameworks)):
        return True
    stdlib = os.path.dirname(os.path.abspath(contextlib.__file__)) + os.sep
    packages = "site-packages" in path or "dist-packages" in path
    return path.startswith(stdlib) and not packages


def _untraceable(model, scope, error) -> SurgeryError:
    """One line naming the first line of the model's code Keras could not record."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [f for f in frames if not _is_library(f.filename)]
    where = ""
    if own:
        frame = own[-1]
        code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        where = f" at {os.path.basename(frame.filename)}:{frame.lineno} `{code}`"
    if isinstance(error, TypeError) and "as a boolean" in str(error):
        why = "Python control flow on a tensor's value"
        fix = "use keras.ops.cond/where or keep such logic out of call()"
    else:
        why = first_line(error).rstrip(".")
        fix = "use keras.layers or keras.ops there"
    return SurgeryError(
        f"cannot trace subclassed model '{scope}' ({type(model).__name__}) into a "
        f"Functional model{where}: {why}; {fix}, or build it as "
        "keras.Model(inputs, outputs)"
    )


# Sizes tried, in turn, for free (None) input dimensions when checking a trace.
_FREE_SIZES = (32, 64, 128, 256)


def _check_equal(model, new, seed):
    rng = np.random.default_rng(seed)
    for _ in range(2):
        x, expected = _reference_run(model, new, rng)
        got = tree.flatten(new.predict_on_batch(x))
        same = len(expected) == len(got) and all(
            np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
            for a, b in zip(expected, got, strict=True)
        )
        if not same:
            raise SurgeryError(
                f"the Functional trace of '{model.name}' ({type(model).__name__}) "
                "computes something else than its call(); does call() depend on "
                "Python state or randomness? Build it as keras.Model(inputs, outputs)"
            )


def _reference_run(model, new, rng):
    """A random batch for `new`'s inputs and `model`'s outputs on it.

    Free dimensions get the first of `_FREE_SIZES` the model runs on.
    """
    free = any(None in t.shape[1:] for t in tree.flatten(new._inputs_struct))
    last = None
    for size in _FREE_SIZES if free else (None,):
        x = tree.map_structure(
            lambda t, size=size: rng.standard_normal(
                (2, *(size if d is None else d for d in t.shape[1:]))
            ).astype(t.dtype),
            new._inputs_struct,
        )
        try:
            return x, tree.flatten(model.predict_on_batch(x))
        except Exception as e:  # noqa: BLE001 - too small for it: try a larger size
            if not free:
                raise
            last = e
    shapes = [tuple(t.shape[1:]) for t in tree.flatten(new._inputs_struct)]
    shapes = shapes[0] if len(shapes) == 1 else shapes
    raise SurgeryError(
        f"cannot check the trace of '{model.name}' ({type(model).__name__}): it "
        f"runs on no size tried ({', '.join(map(str, _FREE_SIZES))}) for the free "
        f"dimensions of its input shape {_shape_text(shapes)} ({_why(last)}); "
        f"{_give_sizes(model, shapes)}"
    )
