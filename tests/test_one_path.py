"""One path per job: one output comparison, one data entry point, one check
per option, made before any model loads."""

import keras
import numpy as np
import pytest
from helpers import run_cli

import surgery
from surgery.verbs import convert as convert_module

BIG = np.finfo(np.float32).max
NEXT_ABOVE_ONE = np.nextafter(np.float32(1), np.float32(2))


def _dense(inputs, name, kernel):
    layer = keras.layers.Dense(1, name=name)
    outputs = layer(inputs)
    layer.set_weights([np.full((1, 1), kernel, "float32"), np.zeros(1, "float32")])
    return outputs


def _big_model() -> keras.Model:
    """fc1 passes x on; `out` scales it so that x = 1 gives float32 max."""
    inputs = keras.Input((1,))
    return keras.Model(inputs, _dense(_dense(inputs, "fc1", 1.0), "out", BIG))


def _overflowing(model: keras.Model) -> keras.Model:
    """`model` times the next float above 1: float32 max becomes inf, the
    other outputs move by at most 1 ulp."""
    return keras.Model(model.inputs, _dense(model.outputs[0], "scale", NEXT_ABOVE_ONE))


@pytest.fixture
def overflow(tmp_path):
    """A model giving float32 max on one row, and a twin giving inf there."""
    x = np.array([[0.5], [0.25], [1.0], [-0.75]], dtype="float32")
    a = _big_model()
    b = _overflowing(a)
    assert np.isfinite(a.predict_on_batch(x)).all()
    assert np.isinf(b.predict_on_batch(x)).sum() == 1
    np.save(tmp_path / "x.npy", x)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    return tmp_path, x, a, b


def test_verify_counts_a_finite_against_inf_output(overflow):
    _, x, a, b = overflow
    report = surgery.verify(a, b, x, batch_size=2, verbose=0)
    assert not report.identical
    assert report.nonfinite_mismatches == 1
    assert report.max_abs_diff == float("inf")
    assert not report.within(1)


def test_cli_verify_max_ulp_1_rejects_an_overflow(overflow, capsys):
    folder, *_ = overflow
    code, result = run_cli(
        capsys,
        "verify",
        folder / "a.keras",
        folder / "b.keras",
        "--data",
        folder / "x.npy",
        "--max-ulp",
        1,
    )
    assert code == 1
    assert result["within_ulp"] is False and result["nonfinite_mismatches"] == 1


def test_cli_convert_max_ulp_1_rejects_an_overflow(overflow, capsys, monkeypatch):
    """The BN model is made to overflow where the original gives float32 max:
    convert's verification pass must count it as verify does."""
    folder, *_ = overflow
    insert = convert_module.insert_identity_bn

    def overflowing(model, **kwargs):
        return _overflowing(insert(model, **kwargs))

    monkeypatch.setattr(convert_module, "insert_identity_bn", overflowing)
    out = folder / "bn.keras"
    code, err = run_cli(
        capsys,
        "convert",
        folder / "a.keras",
        "--data",
        folder / "x.npy",
        "--after",
        "fc1",
        "--max-ulp",
        1,
        "--out",
        out,
    )
    assert code == 1 and len(err.splitlines()) == 1
    assert "1 NaN/inf mismatches" in err and not out.exists()


def test_ulp_distance_never_makes_finite_against_inf_small():
    from surgery.numerics.compare import ulp_distance

    a = np.array([BIG, 1.0], "float32")
    b = np.array([np.inf, 1.0], "float32")
    assert ulp_distance(a, b) > 2**31
    assert ulp_distance(a, a) == 0


@pytest.mark.parametrize(
    "option, value",
    [
        ("--verify-samples", 0),
        ("--workers", 0),
        ("--max-samples", 0),
        ("--max-samples", -3),
        ("--batch-size", 0),
        ("--gpus-per-worker", -1),
    ],
)
def test_bad_option_values_exit_2_before_any_model_loads(
    tmp_path, capsys, option, value
):
    missing = tmp_path / "no-such-model.keras"  # loading it would fail with 1
    out = tmp_path / "bn.keras"
    code, err = run_cli(
        capsys, "convert", missing, "--data", tmp_path, option, value, "--out", out
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert option in err and "no-such-model" not in err


@pytest.mark.parametrize(
    "keyword, value",
    [("verify_samples", 0), ("max_samples", 0), ("batch_size", 0)],
)
def test_the_python_api_refuses_the_same_values(keyword, value):
    model = _big_model()
    x = np.ones((4, 1), "float32")
    with pytest.raises(surgery.SurgeryError, match=f"{keyword} must be >= 1"):
        surgery.convert(model, ["fc1"], data=x, **{keyword: value})


def test_open_inputs_says_what_an_actor_can_reopen(tmp_path):
    from surgery.data.inputs import open_inputs

    x = np.arange(12, dtype="float32").reshape(6, 2)
    np.save(tmp_path / "x.npy", x)
    whole = open_inputs(str(tmp_path / "x.npy"), batch_size=4)
    assert whole.path == str(tmp_path / "x.npy") and whole.batch_size == 4
    assert np.array_equal(whole.data[1], x[4:])
    shard = open_inputs(str(tmp_path / "x.npy"), batch_size=4, shard=(1, 2))
    assert shard.path is None  # the actors get the opened shard
    pair = open_inputs((x, np.zeros(6)))
    assert pair.data is x and pair.path is None
    assert open_inputs(pair) is pair
    assert open_inputs(iter([x])).one_shot


def test_parquet_is_refused_in_process_in_one_line(tmp_path, capsys):
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    model = _big_model()
    with pytest.raises(surgery.SurgeryError, match="only the Ray engine reads"):
        surgery.activation_stats(model, ["fc1"], str(tmp_path / "rows.parquet"))


def test_the_cli_opens_its_data_once(overflow, capsys, monkeypatch):
    from surgery.data import inputs

    folder, *_ = overflow
    opened = []

    def counting(*args, **kwargs):
        opened.append(args[0])
        return open_source(*args, **kwargs)

    open_source = inputs.open_source
    monkeypatch.setattr(inputs, "open_source", counting)
    for mode in ("auto", "graph"):  # the two-pass and the three-pass convert
        out = folder / f"{mode}.keras"
        argv = ["convert", folder / "a.keras", "--data", folder / "x.npy"]
        code, _ = run_cli(capsys, *argv, "--after", "fc1", "--mode", mode, "--out", out)
        assert code == 0 and opened == [str(folder / "x.npy")]
        opened.clear()
