"""Engines sit below the verbs; one merge serves every pass; a plan resolves anywhere."""

import ast
import pathlib

import keras
import numpy as np
import pytest

import surgery
from surgery.engines.choose import as_engine
from surgery.engines.local import LocalEngine
from surgery.graph.tap_models import TapPlan
from surgery.numerics.moments import Moments, Totals

PACKAGE = pathlib.Path(surgery.__file__).parent
L = keras.layers


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "engines").glob("*.py")), ids=lambda p: p.name
)
def test_no_engine_module_imports_a_verb(path):
    verbs = {m for m in imported_modules(path) if m.startswith("surgery.verbs")}
    assert verbs == set()


def test_totals_pool_a_shared_layers_taps_and_equal_one_reduction():
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 2.0, size=(90, 4))
    y = rng.normal(-1.0, 0.5, size=(90, 3))
    spots = [type("S", (), {"spec": s, "side": "after"})() for s in ("a", "b")]
    totals = Totals(spots)
    for step, rows in enumerate(np.array_split(np.arange(90), 4)):
        half = len(rows) // 2  # spot a is tapped twice: its two call sites
        batch = [
            Moments.of(x[rows[:half]]),
            Moments.of(y[rows]),
            Moments.of(x[rows[half:]]),
        ]
        totals.add(batch, [0, 1, 0], step, len(rows))
    (a, b), samples = totals.result()
    assert samples == 90
    assert (a.count, b.count) == (90, 90)
    np.testing.assert_allclose(a.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.var, x.var(0), rtol=1e-12)
    np.testing.assert_allclose(b.var, y.var(0), rtol=1e-12)


def test_totals_name_the_spot_of_a_non_finite_batch_and_refuse_no_data():
    spot = type("S", (), {"spec": "fc1", "side": "after"})()
    bad = Moments(2, np.array([0.0, np.inf]), np.zeros(2))
    with pytest.raises(surgery.SurgeryError, match=r"'fc1'.*unit 1 \(batch 3\)"):
        Totals([spot]).add([bad], [0], 3, 2)
    with pytest.raises(surgery.SurgeryError, match="data is empty"):
        Totals([spot]).result()


def test_a_plan_resolves_the_same_spots_in_a_copy_of_the_model(tmp_path):
    inp = keras.Input((4,))
    h = L.BatchNormalization(name="bn")(L.Dense(3, name="fc1")(inp))
    model = keras.Model(inp, L.Dense(2, name="fc2")(h))
    plan = TapPlan((("after", "fc1"), ("before", "fc2"), ("bn_input", "bn")))
    model.save(tmp_path / "m.keras")
    copy = keras.models.load_model(tmp_path / "m.keras")
    for m in (model, copy):
        spots = plan.spots(m)
        assert [(s.side, s.spec, s.layer.name) for s in spots] == [
            ("after", "fc1", "fc1"),
            ("before", "fc2", "fc2"),
            ("before", "bn", "bn"),
        ]
    with pytest.raises(surgery.SurgeryError, match="no BatchNormalization layer"):
        TapPlan.bn_inputs(["fc1"]).spots(model)


def test_local_engine_is_the_default_and_named_engines_resolve():
    assert isinstance(as_engine(None), LocalEngine)
    assert isinstance(as_engine("local"), LocalEngine)
    assert isinstance(as_engine("ray"), surgery.RayEngine)
    engine = surgery.RayEngine(workers=3)
    assert as_engine(engine) is engine
    with pytest.raises(surgery.SurgeryError, match="engine must be"):
        as_engine("spark")


def test_the_ray_driver_merges_batches_in_order_and_each_once():
    from surgery.engines.ray_actor import _empty_output, pack
    from surgery.engines.ray_engine import merge_blocks

    rng = np.random.default_rng(4)
    x = rng.normal(1e3, 1e-1, size=(5, 16, 3))  # mean >> spread: order shows
    spot = type("S", (), {"spec": "fc1", "side": "after"})()

    def block(i):
        out = _empty_output(1, [3])
        out["batch"][0], out["samples"][0] = i, 16
        out["moments"][0] = pack([Moments.of(x[i])])
        return out

    in_order = Totals([spot])
    for i in range(5):
        in_order.add([Moments.of(x[i])], [0], i, 16)
    (want,), _ = in_order.result()
    arrivals = [block(i) for i in (3, 1, 0, 1, 4, 2)]  # batch 1 retried: twice
    (got,), samples = merge_blocks(iter(arrivals), [spot], 80, 5, 0)
    assert samples == 80
    assert np.array_equal(got.mean, want.mean) and np.array_equal(got.m2, want.m2)
    with pytest.raises(surgery.SurgeryError, match=r"4 of 5 batches \(missing: \[2\]"):
        merge_blocks(iter(arrivals[:-1]), [spot], 80, 5, 0)
