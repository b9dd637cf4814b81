"""What a user sees of the `surgery` command besides its results.

`--help` and usage errors answer before any backend loads; progress goes to
stderr, as plain lines without escape codes when stderr is not a terminal;
stdout holds the results only.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from surgery import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ("keras", "tensorflow", "jax", "torch", "numpy")

# Runs the CLI in-process, then reports which backends it imported.
PROBE = """
import json, sys
from surgery.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
loaded = [m for m in {backends!r} if m in sys.modules]
print(json.dumps({{"code": code, "loaded": loaded}}), file=sys.stderr)
"""


def _env():
    """The environment a user has: no TF_CPP_MIN_LOG_LEVEL (conftest sets it)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def _commands():
    import argparse

    parser = cli._parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    raise AssertionError("no subcommands")


def _probe(*argv):
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(backends=BACKENDS), *argv],
        capture_output=True, text=True, check=False, env=_env(), cwd=ROOT,
    )  # fmt: skip
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return report["code"], report["loaded"], done


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        *[[name, "--help"] for name in _commands()],
        [],  # no command: a usage error
        ["convert"],  # --out missing
        ["convert", "--out", "x.keras", "--no-such-flag"],
        ["stats", "--out", "s.npz", "--batch-size", "zero"],
        ["convert", "--out", "x.keras", "--epsilon", "-1"],  # checked after parsing
        ["convert", "--out", "x.keras", "--input-shape", "a,b"],
        ["prune", "m.keras", "--criterion", "l1", "--out", "x.keras"],  # no --amount
        ["prune", "--criterion", "l1", "--amount", "1.5", "--out", "x.keras"],
        ["prune", "m.keras", "--out", "x.keras"],  # dead without --data
        ["prune", "--criterion", "l3", "--out", "x.keras"],
    ],
    ids=lambda argv: " ".join(argv) or "(nothing)",
)
def test_help_and_usage_errors_load_no_backend(argv):
    code, loaded, done = _probe(*argv)
    assert code == (0 if "--help" in argv else 2), done.stderr
    assert loaded == [], (argv, loaded)
    if "--help" in argv:
        assert done.stdout.startswith("usage: surgery")
    else:
        assert "surgery" in done.stderr and "error" in done.stderr


def test_help_answers_fast():
    """The whole process, interpreter start included; under 0.5 s on an idle
    machine (about 0.1 s measured), 1 s allowed for a loaded CI machine."""
    timings = []
    for argv in (["--help"], ["convert", "--help"], ["convert"]):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "surgery", *argv],
            capture_output=True, check=False, env=_env(), cwd=ROOT,
        )  # fmt: skip
        timings.append(time.perf_counter() - start)
    assert max(timings) < 1.0, timings


def test_progress_goes_to_stderr_as_plain_lines_when_it_is_no_terminal(tmp_path):
    out = tmp_path / "bn.keras"
    done = subprocess.run(
        [sys.executable, "-m", "surgery", "convert", "--out", str(out)],
        capture_output=True, text=True, check=False, env=_env(), cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout + done.stderr
    assert "\r" not in done.stdout + done.stderr and "━" not in done.stdout
    # stderr: one line per pass over the embedded default's 200 images
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr
    assert lines[0].startswith("statistics (pass 1): 7 batches, 200 samples, ")
    assert lines[1].startswith("verify (pass 2): 7 batches, 200 samples, ")
    assert all(line.endswith(" s") for line in lines)
    # stdout: the report only
    assert "(pass" not in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("identical: True")


class _Terminal:
    """A stand-in for stderr on a terminal."""

    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_is_one_keras_bar_on_stderr_on_a_terminal(
    tmp_path, capsys, monkeypatch
):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["convert", "--out", str(tmp_path / "bn.keras")]) == 0
    out = capsys.readouterr().out
    assert "━" not in out and "\x1b[" not in out and "(pass" not in out
    assert "identical: True" in out
    # one bar over both passes (7 batches each), redrawn in place
    assert "14/14" in terminal.text and "verify (pass 2)" in terminal.text
    assert "\r" in terminal.text and terminal.text.count("\n") == 1


def test_json_output_is_the_only_output(tmp_path, capfd):
    argv = ["--format", "json", "convert", "--out", str(tmp_path / "bn.keras")]
    assert cli.main(argv) == 0
    captured = capfd.readouterr()
    assert captured.err == ""
    assert json.loads(captured.out)["identical"] is True


_RETRACING = """
import logging

import keras
import numpy as np

import surgery

messages = []
handler = logging.Handler()
handler.emit = lambda record: messages.append(record.getMessage())
logging.getLogger("tensorflow").addHandler(handler)
x = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")


def fresh():
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3, name="fc")(inputs))


model = fresh()
for _ in range(3):  # every pass traces a new tap model
    new = surgery.insert_identity_bn(model, after=["fc"], data=x, verbose=0)
    surgery.verify(model, new, x, verbose=0)
for _ in range(3):  # the user's own models, one trace each
    fresh().predict_on_batch(x)
print(sum("retracing" in m for m in messages))
"""


def test_surgery_passes_leave_no_retracing_warning_for_the_users_own_calls():
    """In a fresh process, as a user's script: TF's retracing counter is global."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("TensorFlow's retracing detector")
    done = subprocess.run(
        [sys.executable, "-c", _RETRACING],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "0", done.stderr[-2000:]


@pytest.mark.parametrize(
    "script, argv",
    [
        ("quickstart.py", []),
        ("vgg16_bn.py", ["--workdir", "work", "--max-samples", "60", "--epochs", "1"]),
    ],
)
def test_examples_print_no_tensorflow_warnings(script, argv, tmp_path):
    from surgery.runtime.quiet import _without_noise

    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *argv],
        capture_output=True, text=True, check=False, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # TensorFlow's own import-time records (absl INFO/WARNING, before any
    # surgery code runs) are what every TensorFlow program prints; nothing else
    left = _without_noise(done.stderr)
    assert "WARNING" not in left and "retracing" not in left, left


def test_the_no_gpu_cuinit_error_is_dropped_only_without_an_nvidia_device(
    monkeypatch,
):
    """The standard `tensorflow` package logs this when it first looks for
    devices on a machine without a GPU (measured with tensorflow 2.21.0)."""
    from surgery.runtime import quiet

    line = (
        "E0000 00:00:1796334372.823065   19110 cuda_platform.cc:52] failed call "
        "to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR "
        "(303)\n"
    )
    other = "E0000 00:00:1796334372.9   19110 x.cc:1] real failure\n"
    monkeypatch.setattr(quiet, "_has_nvidia_device", lambda: False)
    assert quiet._without_noise(line + other) == other
    monkeypatch.setattr(quiet, "_has_nvidia_device", lambda: True)
    assert quiet._without_noise(line + other) == line + other
