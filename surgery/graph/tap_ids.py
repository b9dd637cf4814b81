"""What identifies a tap and how many units it has, for the caches of tap models.

A tap model is cached per model and spots; two spots are the same tap when
they name the same side of the same call of the same layer, on the same axis.
"""

from __future__ import annotations

from surgery.errors import SurgeryError
from surgery.graph.spots import Spot


def tap_ident(spot: Spot) -> tuple:
    """A hashable key of `spot`: equal for spots that tap the same tensor."""
    return (spot.side, spot.scope, id(spot.layer), spot.index, spot.axis)


def tap_units(tensor, spot: Spot) -> int:
    """The units of the tapped `tensor` on the spot's axis (they must be fixed)."""
    units = tensor.shape[spot.axis]
    if units is None:
        raise SurgeryError(
            f"'{spot.spec}' has no fixed number of units on axis {spot.axis}"
        )
    return int(units)
