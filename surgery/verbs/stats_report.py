"""What the activation statistics say about each tap, as a table or a plot.

Dead units (zero variance: a ReLU that never fires, a constant channel) and
the spread of means and stds are what to look at before trusting a BN
initialisation or picking insertion points.
"""

from __future__ import annotations

import os

import numpy as np

from surgery.errors import SurgeryError
from surgery.files.atomic import atomic_path
from surgery.numerics.moments import Moments


def tap_report(stats: dict[str, Moments]) -> list[dict]:
    """Per tap: samples, units, dead units and the range of means and stds."""
    rows = []
    for key, m in stats.items():
        std = m.std
        rows.append(
            {
                "tap": key,
                "samples": int(m.count),
                "units": m.units,
                "dead": int(np.count_nonzero(m.var == 0)),
                "mean_min": float(m.mean.min()),
                "mean_max": float(m.mean.max()),
                "std_min": float(std.min()),
                "std_max": float(std.max()),
            }
        )
    return rows


def format_report(rows: list[dict]) -> str:
    """`tap_report` rows as an aligned text table."""
    table = [("tap", "samples", "units", "dead", "mean min..max", "std min..max")]
    for r in rows:
        table.append(
            (
                r["tap"],
                str(r["samples"]),
                str(r["units"]),
                str(r["dead"]),
                f"{r['mean_min']:.4g}..{r['mean_max']:.4g}",
                f"{r['std_min']:.4g}..{r['std_max']:.4g}",
            )
        )
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    )


def plot_report(stats: dict[str, Moments], path: str) -> str:
    """Histograms of per-unit mean and std, one row per tap, saved to `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SurgeryError(
            "--plot needs matplotlib: pip install 'surgery[plot]'"
        ) from None
    taps = list(stats.items())
    fig, axes = plt.subplots(len(taps), 2, figsize=(9, 2.4 * len(taps)), squeeze=False)
    for (key, m), (ax_mean, ax_std) in zip(taps, axes, strict=True):
        ax_mean.hist(m.mean, bins=50, color="tab:blue")
        ax_mean.set_title(f"{key}: per-unit mean ({m.units} units)", fontsize=9)
        ax_std.hist(m.std, bins=50, color="tab:orange")
        dead = int(np.count_nonzero(m.var == 0))
        ax_std.set_title(f"{key}: per-unit std ({dead} dead)", fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=os.path.splitext(path)[1] or ".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path
