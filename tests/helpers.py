import json
import warnings

import keras
import numpy as np

import surgery
from surgery import cli
from surgery.runtime.machine import cpu_kind

# Keras' torch BN computes (x - mean) * inv + beta, an exact identity only with
# the zero_mean opt-in; the other backends are exact with the measured mean.
TORCH = keras.backend.backend() == "torch"


def snapshot(model):
    return [w.copy() for w in model.get_weights()]


def assert_identical_insert(model, x, exact_on=None, **kwargs):
    """Insert, then check bit-identity and that the original is untouched.

    `exact_on` lists the CPU kinds (`surgery.runtime.machine.cpu_kind()`) where the
    case was measured bit-identical in compiled inference, for a case whose
    compiled kernels differ by CPU; None means every kind. On any other kind
    the test asserts what is promised everywhere: bit-identical, or
    `insert_identity_bn`'s check warned with the measured difference.
    """
    before = snapshot(model)
    reference = model.predict_on_batch(x)
    kwargs.setdefault("zero_mean", TORCH)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = surgery.insert_identity_bn(model, data=x, verbose=0, **kwargs)
    for w in caught:  # passed on, for the caller's own pytest.warns
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    report = surgery.verify(model, new, x, verbose=0)
    if exact_on is not None and cpu_kind() not in exact_on and not report.identical:
        warned = [
            str(w.message) for w in caught if "not bit-identical" in str(w.message)
        ]
        assert len(warned) == 1 and f"({cpu_kind()})" in warned[0], (report, warned)
        assert (
            np.array_equal(_flat(reference)[0], _flat(new(x, training=False))[0])
            or keras.backend.backend() == "torch"
        )  # eager stays exact
        return new
    assert report.identical, report
    assert report.max_ulp_diff == 0
    got = new.predict_on_batch(x)
    for a, b in zip(_flat(reference), _flat(got), strict=True):
        assert np.array_equal(a, b)
    for a, b in zip(before, model.get_weights(), strict=True):
        assert np.array_equal(a, b)
    assert not {id(v) for v in new.weights} & {id(v) for v in model.weights}
    return new


def _flat(x):
    if isinstance(x, dict):
        return [x[k] for k in sorted(x)]
    if isinstance(x, list | tuple):
        return list(x)
    return [x]


def run_cli(capsys, *argv):
    """Run the CLI with JSON output; returns (exit code, result or stderr)."""
    code = cli.main(["--format", "json", *map(str, argv)])
    captured = capsys.readouterr()
    if code == 0 or captured.out.strip():
        return code, json.loads(captured.out.strip().splitlines()[-1])
    return code, captured.err.strip()


# CPU kinds on which the compiled exactness of the cases added for outputs,
# non-Layer ops and recurrent layers was measured (TF graph and XLA, JAX jit).
MEASURED_ON = ("AMD (AVX-512)",)


def assert_exact_where_measured(model, new, x, modes, exact_on=MEASURED_ON, **kwargs):
    """`new` is bit-identical to `model` in each mode, or, on a CPU kind
    where that was not measured, `insert_identity_bn`'s check in that mode
    warns with the measured difference (what is promised everywhere).

    `kwargs` are the arguments `new` was made with (`after=...`, ...).
    """
    for mode in modes:
        report = surgery.verify(model, new, x, verbose=0, mode=mode)
        if report.identical:
            continue
        assert cpu_kind() not in exact_on, (mode, report)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            surgery.insert_identity_bn(model, data=x, verbose=0, check=mode, **kwargs)
        warned = [
            str(w.message) for w in caught if "not bit-identical" in str(w.message)
        ]
        assert warned and f"in {mode} mode" in warned[0], (mode, report, warned)
