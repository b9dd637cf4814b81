"""Import the Keras backend without TensorFlow's native log lines on stderr.

TensorFlow 2.21 logs through absl from its shared libraries while they load,
before `TF_CPP_MIN_LOG_LEVEL` is read: on CPUs where oneDNN is on by default
every import prints "oneDNN custom operations are on ..." twice. That text
goes to file descriptor 2 directly, so the import runs with descriptor 2
pointed at a temporary file; afterwards everything but absl INFO and WARNING
records is written back to stderr. The numerics are untouched: no
TensorFlow option is changed.

TensorFlow finds its devices once, on first use. The standard `tensorflow`
package (built with CUDA) then logs "failed call to cuInit" as an error on
a machine without an NVIDIA GPU. That is done here too, inside the
redirection, and that one record is dropped when the machine has no NVIDIA
device (with one, a failing driver is worth its line).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

_RECORD = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called"
_NO_CUDA = "] failed call to cuInit"


def import_keras_quietly():
    """`import keras` (and its backend) with native INFO/WARNING logs dropped."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "keras" in sys.modules:
        return sys.modules["keras"]
    with _filtered_stderr():
        import keras

        if keras.backend.backend() != "tensorflow" and _installed("tensorflow"):
            # Keras imports it later anyway where it is installed (saving a
            # model checks for it), and that import would print the lines.
            import tensorflow  # noqa: F401
        _find_devices()
    return keras


def _find_devices() -> None:
    tf = sys.modules.get("tensorflow")
    try:
        tf.config.list_physical_devices()
    except Exception:  # noqa: BLE001 - no TensorFlow, or none to ask: later then
        pass


def _has_nvidia_device() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia")


def _installed(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # blocked or half-installed
        return False


@contextlib.contextmanager
def _filtered_stderr():
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 to redirect
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = _without_noise(capture.read().decode(errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def _without_noise(text: str) -> str:
    """`text` less the absl preamble and INFO/WARNING records.

    A record's continuation lines (those without a record header) go with it.
    """
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith(_PREAMBLE):
            dropping = True
        elif _RECORD.match(line):
            dropping = line[0] in "IW" or (
                _NO_CUDA in line and not _has_nvidia_device()
            )
        if not dropping:
            kept.append(line)
    return "".join(kept)
