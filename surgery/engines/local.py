"""The statistics pass in this process: batches through a tap model, merged on the host.

An engine opens a session for one command (a model and its data); the
session runs passes, each measuring a `TapPlan`, and hears which layers'
weights changed between passes. Here every pass reads the same `Batches`
and runs the compiled tap model batch by batch; the model is the caller's
own object, so changed weights need no shipping.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import tree

from surgery.data.batches import (
    Batches,
    batch_length,
    check_finite_inputs,
    check_inputs,
    progress,
)
from surgery.graph.tap_models import TapPlan, tap_model
from surgery.numerics.moments import Moments, Totals, float64_enabled, tap_moments


class LocalEngine:
    """Runs each pass in this process (the default engine)."""

    def session(
        self,
        model: keras.Model,
        data: Any,
        *,
        batch_size: int | None = None,
        steps: int | None = None,
        max_samples: int | None = None,
        verbose: int | str = "auto",
    ) -> LocalSession:
        """A session for passes of `data` through `model` (see `Batches`)."""
        batches = Batches(
            data,
            batch_size=batch_size,
            steps=steps,
            max_samples=max_samples,
            model=model,
        )
        return LocalSession(model, batches, verbose)


class LocalSession:
    """Passes over one model and one data set, in this process."""

    def __init__(self, model: keras.Model, batches: Batches, verbose: int | str):
        self.model, self.batches, self.verbose = model, batches, verbose

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def moments(
        self, plan: TapPlan, first_batch: list | None = None
    ) -> tuple[list[Moments], int]:
        """The moments at each of `plan`'s spots over one pass, and the samples seen.

        With `plan.zeros` the spots' zero indicators' moments follow, one per
        spot (`TapPlan.results`). The pass's first batch is appended to
        `first_batch` when one is given.
        """
        model = self.model
        built, spots, owners = tap_model(model, plan)
        totals = Totals(spots)
        for step, x in enumerate(progress(self.batches, self.verbose, "statistics")):
            if step == 0:
                check_inputs(model, x)
                if first_batch is not None:
                    first_batch.append(x)
            check_finite_inputs(x, step)
            with float64_enabled():
                flat = tree.flatten(built.predict_on_batch(x))
            totals.add(tap_moments(flat, len(owners)), owners, step, batch_length(x))
        return totals.result()

    def update(self, layers: dict[str, keras.layers.Layer]) -> None:
        """The weights of `layers` (by path) changed: nothing to do, they are ours."""
