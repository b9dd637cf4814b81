"""The compiled check of `insert_identity_bn`: is the new model exact in the mode users run?

Eager inference is exact by construction; compiled inference (graph, XLA) runs a
rewritten graph, so insert compares the two models on a batch in that mode and
says, in a warning that names the CPU kind, what differs and why.
"""

from __future__ import annotations

from keras import backend

from surgery.errors import SurgeryError
from surgery.graph.fusion import fusion_causes, isolating_policy
from surgery.runtime.machine import cpu_kind
from surgery.verbs.verify import MODES, batch_difference, resolve_mode


def check_mode(model, check) -> str | None:
    """The mode `check` asks for (None: no check); `True` is `predict`'s."""
    if check is False or check is None:
        return None
    if check is True:
        return resolve_mode(model, "auto")
    if not isinstance(check, str) or check not in ("auto", *MODES):
        raise SurgeryError(
            f"check must be True, False or one of 'auto', {', '.join(map(repr, MODES))}"
            f"; got {check!r}"
        )
    return resolve_mode(model, check)


def checked(model, new, notes, spots, x, build, mode, isolating):
    """`new` (or its float32-BN variant) after a compiled comparison on `x`.

    Compiled inference runs a rewritten graph (see `surgery.graph.fusion`). When the
    float64-isolated model differs from the original there, the all-float32
    one is tried too and kept if it is exact. Otherwise the float64 one stays
    (it is the one XLA leaves alone), and the difference is warned about,
    naming the spots whose neighbourhood the compiler is known to treat
    differently. `isolating` says whether `new` got float64 BNs where
    `fusion.isolating_policy` allows.
    """
    same, _, ulp, noise = batch_difference(model, new, x, mode)
    if same:
        return new, notes
    isolated = {id(spot) for spot in spots if isolating and isolating_policy(spot)}
    if isolated:
        alt, alt_notes = build(isolate=False)
        if batch_difference(model, alt, x, mode)[0]:
            return alt, alt_notes
    measured = (
        f"max {ulp} ulp on one batch (the original's own batch-size noise: {noise} ulp)"
    )
    if backend.backend() == "torch":
        notes.append(f"{TORCH_MEAN}: {measured}; {ZERO_MEAN}")
        return new, notes
    if backend.backend() == "jax":
        notes.append(
            f"the new model is not bit-identical to the original in {mode} mode "
            f"(Keras' JAX predict always uses XLA) on this machine ({cpu_kind()}): "
            f"{measured}. XLA fuses "
            "the BN into its neighbours and computes its rsqrt there, which can "
            "round differently from the standalone op the identity was found "
            "with; eager inference (model(x)) is exact"
        )
        return new, notes
    causes = [
        f"{spot.spec} ({cause})"
        for spot in spots
        for cause in fusion_causes(model, spot, id(spot) in isolated, mode)
    ]
    where = "; ".join(causes[:5]) if causes else "no known cause at any spot"
    more = f" and {len(causes) - 5} more" if len(causes) > 5 else ""
    notes.append(
        f"the new model is not bit-identical to the original in {mode} mode on "
        f"this machine ({cpu_kind()}): {measured}; eager inference is exact. "
        "Spots whose "
        f"neighbour the compiler computes differently: {where}{more}"
    )
    return new, notes


TORCH_MEAN = (
    "torch backend: Keras computes BN as (x - mean) * inv + beta, which rounds "
    "x - mean, so with the measured moving mean the outputs differ"
)


ZERO_MEAN = "pass zero_mean=True for bit-identical outputs (moving mean and beta 0)"
