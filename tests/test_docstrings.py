"""The API page's docstrings: every parameter documented, every example runs.

The objects are the ones `docs/api.md` renders (`::: surgery....` lines), so
a name added to the page is checked too. The examples are written for the
default TensorFlow backend (on torch the measured BN mean costs a few ulps,
which the `insert_identity_bn` example asserts against), so they run there
only.
"""

import contextlib
import importlib
import inspect
import io
import os
import re
import sys
import tempfile

import keras
import pytest

API_PAGE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "api.md")
# What a verb returns, shown by that verb's example.
RETURNED = {
    "surgery.verbs.convert.Conversion",
    "surgery.verbs.convert.Pass",
    "surgery.pruning.groups.ChannelGroup",
    "surgery.pruning.report.PruneReport",
}


def api_names() -> list[str]:
    with open(API_PAGE) as f:
        return re.findall(r"^::: (surgery\.\S+)$", f.read(), re.M)


def resolve(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def documented(obj) -> list:
    """`obj` and, for a class, its public methods and properties."""
    if not inspect.isclass(obj):
        return [obj]
    members = [obj]
    for key, value in vars(obj).items():
        if key.startswith("_"):
            continue
        if isinstance(value, classmethod | staticmethod):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            members.append(value)
    return members


def args_section(doc: str) -> list[str]:
    match = re.search(r"^Args:\n(.*?)(?=\n\S|\Z)", doc, re.M | re.S)
    if match is None:
        return []
    return re.findall(r"^    (\w+): ", match[1], re.M)


def examples(doc: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", doc, re.S)


def test_the_api_page_lists_every_public_name():
    import surgery

    listed = {name.rpartition(".")[2] for name in api_names()}
    assert set(surgery.__all__) <= listed, set(surgery.__all__) - listed


@pytest.mark.parametrize("name", api_names())
def test_every_parameter_is_documented_with_returns_and_an_example(name):
    obj = resolve(name)
    doc = inspect.getdoc(obj) or ""
    if name not in RETURNED:
        assert examples(doc), f"{name} has no ```python example"
    if inspect.isclass(obj):
        fields = getattr(obj, "__dataclass_fields__", {})
        if fields and "Args:" in doc:  # documented as a constructor
            assert args_section(doc) == list(fields), name
        elif fields:
            attributes = doc.split("Attributes:\n", 1)[1]
            for field in fields:
                assert re.search(rf"^    {field}: ", attributes, re.M), (name, field)
    else:
        params = [p for p in inspect.signature(obj).parameters if p != "self"]
        assert args_section(doc) == params, name
        assert "Returns:" in doc, name
    for member in documented(obj)[1:]:
        assert inspect.getdoc(member), f"{name}: {member} has no docstring"


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the examples are written for the default TensorFlow backend",
)
@pytest.mark.parametrize("name", api_names())
def test_every_example_runs(name, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    blocks = [
        block
        for member in documented(resolve(name))
        for block in examples(inspect.getdoc(member) or "")
    ]
    if "RayEngine" in name:
        pytest.importorskip("ray")
    for block in blocks:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(compile(block, f"<{name} example>", "exec"), {})
            finally:
                _shut_down_ray()


def _shut_down_ray():
    """The RayEngine example starts a local cluster; other tests start their own."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
