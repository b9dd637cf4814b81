"""What `recalibrate_bn` did: the mode it used and how far each BN moved."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class BnChange:
    """One BN's statistics before and after recalibration.

    `mean_shift` is the largest change of a unit's mean in units of its old
    standard deviation (`sqrt(old var + eps)`, what the BN divides by);
    `var_ratio_min`/`_max` bound new variance / old variance. `dead` counts
    units whose variance over the data is 0: their scale becomes
    `gamma / sqrt(eps)`.
    """

    path: str
    units: int
    dead: int
    mean_shift: float
    var_ratio_min: float
    var_ratio_max: float

    @classmethod
    def measure(cls, path, old_mean, old_var, new_mean, new_var, epsilon):
        old_mean, old_var, new_mean, new_var = (
            np.asarray(a, dtype=np.float64)
            for a in (old_mean, old_var, new_mean, new_var)
        )
        shift = np.abs(new_mean - old_mean) / np.sqrt(old_var + epsilon)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(old_var > 0, new_var / old_var, np.inf)
        ratio = np.where((old_var == 0) & (new_var == 0), 1.0, ratio)
        return cls(
            path,
            int(new_var.size),
            int(np.count_nonzero(new_var == 0)),
            float(shift.max(initial=0.0)),
            float(ratio.min(initial=np.inf)),
            float(ratio.max(initial=0.0)),
        )


@dataclass(frozen=True)
class Recalibration:
    """The mode `recalibrate_bn` used (auto resolved) and one row per BN."""

    mode: str
    samples: int
    changes: list[BnChange] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def warn_dead(self, stacklevel: int = 3) -> None:
        dead = [c for c in self.changes if c.dead]
        if dead:
            listed = ", ".join(f"'{c.path}' {c.dead} of {c.units}" for c in dead)
            warnings.warn(
                f"recalibrate_bn: units dead on the data (variance 0, so their "
                f"scale becomes gamma/sqrt(eps)): {listed}; check that the data "
                "covers what the model sees",
                stacklevel=stacklevel,
            )

    def table(self) -> str:
        rows = [("BN", "units", "dead", "max |d mean|/std", "new/old var")]
        for c in self.changes:
            ratio = f"{c.var_ratio_min:.3g} .. {c.var_ratio_max:.3g}"
            rows.append(
                (c.path, str(c.units), str(c.dead), f"{c.mean_shift:.3g}", ratio)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        )
