"""One progress bar per command, whose passes over the data are its phases.

A command such as `convert` (statistics, then verify) or `recalibrate`
(one pass per BN level) reads the data several times. Inside `one_bar()`
every pass advances the same Keras `Progbar` line, labelled with the current
phase, instead of printing a bar of its own.

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

from keras.utils import Progbar

_ACTIVE: contextvars.ContextVar[PhasedBar | None] = contextvars.ContextVar(
    "surgery_progress", default=None
)


class PhasedBar:
    """A single progress line over several passes, labelled `phase (pass k)`."""

    def __init__(self, verbose: int):
        self.verbose = verbose
        self.passes = 0
        self._bar: Progbar | None = None
        self._steps = 0

    def start(self, phase: str, num_batches: int | None) -> None:
        self.passes += 1
        self.label = f"{phase} (pass {self.passes})"
        if self._bar is None:
            self._bar = Progbar(None, verbose=self.verbose, unit_name="batch")
            self._steps = 0
        if num_batches is None:
            self._bar.target = None
        elif self._bar.target is not None or self._steps == 0:
            self._bar.target = self._steps + num_batches

    def step(self) -> None:
        self._steps += 1
        # Keras' Progbar prints a non-list value as it is (Keras 3.15).
        self._bar._values["phase"] = self.label
        if "phase" not in self._bar._values_order:
            self._bar._values_order.append("phase")
        self._bar.update(self._steps, finalize=False)

    def close(self) -> None:
        """Ends the line (before other output, and at the end of the command)."""
        if self._bar is not None and self._steps:
            self._bar.target = self._steps
            self._bar.update(self._steps, finalize=True)
        self._bar = None


@contextlib.contextmanager
def one_bar(verbose: int):
    """Every pass inside shares one progress line (none with verbose=0)."""
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
    """Drops TensorFlow's frequent-retracing warning while a pass runs."""
    logger = logging.getLogger("tensorflow")
    quiet = _NoRetracingWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
