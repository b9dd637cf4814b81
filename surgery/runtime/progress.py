"""One progress display per command, whose passes over the data are its phases.

A command such as `convert` (statistics, then verify) or `recalibrate`
(one pass per BN level) reads the data several times. Inside `one_bar()`
every pass advances the same Keras `Progbar` line, labelled with the current
phase, instead of printing a bar of its own. The bar goes to stderr, so that
stdout holds only the command's results; when stderr is not a terminal (a
file, a pipe, CI) each phase is instead one plain line when it ends, e.g.
`statistics (pass 1): 7 batches, 200 samples, 1.2 s`, without the escape
codes and carriage returns of a live bar.

Each pass also runs a new Keras model (the tap model of that pass), so its
predict function is traced once per pass. TensorFlow's frequent-tracing
detector counts those traces of the same Python function across models and
logs "triggered tf.function retracing"; the traces are intended (and the
short last batch costs only one more, Keras traces with `reduce_retracing`),
so that one message is filtered while a pass runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time

from keras.utils import Progbar

_ACTIVE: contextvars.ContextVar[PhasedBar | None] = contextvars.ContextVar(
    "surgery_progress", default=None
)


class PhasedBar:
    """A single progress line over several passes, labelled `phase (pass k)`.

    Args:
        verbose: 0 for nothing, else progress on `stream`.
        stream: where progress goes (default: `sys.stderr` when it starts);
            a live Keras bar on a terminal, else one plain line per phase.
    """

    def __init__(self, verbose: int, stream=None):
        self.verbose = verbose
        self.stream = stream
        self.passes = 0
        self._bar: Progbar | None = None
        self._steps = 0
        self._phase: list | None = None  # label, batches, samples, start time

    def start(self, phase: str, num_batches: int | None) -> None:
        self._end_phase()
        self.passes += 1
        self.label = f"{phase} (pass {self.passes})"
        if not self.verbose:
            return
        if not is_terminal(self._stream()):
            self._phase = [self.label, 0, 0, time.perf_counter()]
            return
        if self._bar is None:
            with self._to_stream():  # Progbar looks at (and writes to) stdout
                self._bar = Progbar(None, verbose=self.verbose, unit_name="batch")
            self._steps = 0
        if num_batches is None:
            self._bar.target = None
        elif self._bar.target is not None or self._steps == 0:
            self._bar.target = self._steps + num_batches

    def step(self, samples: int = 0) -> None:
        """One batch of the current pass done (of `samples` samples)."""
        if self._phase is not None:
            self._phase[1] += 1
            self._phase[2] += samples
        if self._bar is None:
            return
        self._steps += 1
        # Keras' Progbar prints a non-list value as it is (Keras 3.15).
        self._bar._values["phase"] = self.label
        if "phase" not in self._bar._values_order:
            self._bar._values_order.append("phase")
        with self._to_stream():
            self._bar.update(self._steps, finalize=False)

    def close(self) -> None:
        """Ends the line (before other output, and at the end of the command)."""
        self._end_phase()
        if self._bar is not None and self._steps:
            self._bar.target = self._steps
            with self._to_stream():
                self._bar.update(self._steps, finalize=True)
        self._bar = None

    def _end_phase(self) -> None:
        """The plain line of the pass that ran, if any batch was read."""
        if self._phase is None:
            return
        label, batches, samples, started = self._phase
        self._phase = None
        if batches:
            seconds = time.perf_counter() - started
            stream = self._stream()
            stream.write(
                f"{label}: {_count(batches, 'batch')}, "
                f"{_count(samples, 'sample')}, {seconds:.1f} s\n"
            )
            stream.flush()

    def _stream(self):
        return sys.stderr if self.stream is None else self.stream

    def _to_stream(self):
        return contextlib.redirect_stdout(self._stream())


def is_terminal(stream) -> bool:
    """Whether `stream` is a terminal (a live bar can redraw its line there)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" + ("" if n == 1 else "es" if unit.endswith("h") else "s")


@contextlib.contextmanager
def one_bar(verbose: int):
    """Every pass inside shares one progress display (none with verbose=0)."""
    bar = PhasedBar(verbose)
    token = _ACTIVE.set(bar)
    try:
        yield bar
    finally:
        _ACTIVE.reset(token)
        bar.close()


def active() -> PhasedBar | None:
    return _ACTIVE.get()


def close_line() -> None:
    """Finish the current progress line, if any, so other output starts clean."""
    bar = _ACTIVE.get()
    if bar is not None:
        bar.close()


class _NoRetracingWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def quiet_retracing():
    """Drops TensorFlow's frequent-retracing warning while a pass runs.

    TensorFlow's detector remembers the last calls of each Python function
    (by its code, so across models): Keras' predict step traced once per tap
    model would make the user's next `predict` of a model of their own warn
    afterwards. The detector is left as it was before the pass.
    """
    logger = logging.getLogger("tensorflow")
    quiet = _NoRetracingWarning()
    logger.addFilter(quiet)
    saved = _tracing_history()
    try:
        yield
    finally:
        _restore_tracing_history(saved)
        logger.removeFilter(quiet)


def _detectors():
    """TensorFlow's frequent-tracing detectors by function code, or None when
    TensorFlow has not run a tf.function (or keeps them elsewhere)."""
    module = sys.modules.get(
        "tensorflow.python.eager.polymorphic_function.polymorphic_function"
    )
    manager = getattr(module, "_frequent_tracing_detector_manager", None)
    detectors = getattr(manager, "_detectors", None)
    lock = getattr(manager, "_lock", None)
    if detectors is None or lock is None:
        return None
    return detectors, lock


_FIELDS = ("_calls_per_tracings", "_call_count", "_total_warning_count")


def _tracing_history() -> dict | None:
    """Each detector's state ({} before any), None if it cannot be read."""
    found = _detectors()
    if found is None:
        return {}
    detectors, lock = found
    with lock:
        try:
            return {
                key: [_copy(getattr(detector, field)) for field in _FIELDS]
                for key, detector in detectors.items()
            }
        except AttributeError:  # another TensorFlow's detector: leave it be
            return None


def _copy(value):
    return list(value) if isinstance(value, list) else value


def _restore_tracing_history(saved: dict | None) -> None:
    found = _detectors()
    if found is None or saved is None:
        return
    detectors, lock = found
    with lock:
        for key in list(detectors.keys()):
            if key not in saved:
                del detectors[key]  # made by the pass: forgotten
                continue
            for field, value in zip(_FIELDS, saved[key], strict=True):
                setattr(detectors[key], field, value)
