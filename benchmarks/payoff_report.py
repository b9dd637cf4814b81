"""Render the payoff section (benchmarks/payoff.py): Markdown and the plot."""

from __future__ import annotations

VARIANTS_BN = ("identity BN", "fast.ai BN")


def _loss(x) -> str:
    return "diverged (nan)" if x is None else f"{x:.4f}"


def _recalibrated(r) -> str:
    if not r.get("recalibrated_runs"):
        return "—"
    runs = (
        ""
        if r["recalibrated_runs"] == r["seeds"]
        else f" ({r['recalibrated_runs']} runs)"
    )
    return (
        f"{_loss(r['recalibrated_end'])}, {r['recalibrated_accuracy']:.3f} ± "
        f"{r['recalibrated_accuracy_std']:.3f}{runs}"
    )


def markdown(section: dict) -> list[str]:
    """The payoff section of results.md: the table, the plot, the checks."""
    d = section["data"]
    t, sizes = d["task"], d["sizes"]
    quick = ", --quick sizes" if section["quick"] else ""
    kept = d["source_val_loss"]
    lines = [
        "## 7. The payoff: fine-tuning with and without BN, over learning rates",
        "",
        f"_{sizes['seeds']} seed(s), {sizes['epochs']} epochs of "
        f"{t['train_samples'] // t['batch_size']} batches of {t['batch_size']}{quick}; "
        f"section took {section['seconds']:.0f} s_",
        "",
        f"Pretrained on digits {t['pretrain_classes'][0]}-{t['pretrain_classes'][-1]} "
        f"({t['pretrain_samples']} images, {sizes['pretrain_epochs']} epochs); "
        f"dense head fine-tuned with {t['optimizer']} on digits "
        f"{t['transfer_classes'][0]}-{t['transfer_classes'][-1]} "
        f"({t['train_samples']} images, {t['features']}-d frozen conv features, "
        f"new 5-way output layer), validated on {t['val_samples']} others. "
        "Losses are validation losses (means over seeds); a run diverged if its "
        "final val loss is not finite or above its loss before training, or its "
        "accuracy is below twice chance. The last column evaluates the same "
        "fine-tuned BN models after `surgery.recalibrate_bn` on the training "
        "features (moving statistics replaced by population statistics).",
        "",
        "Pretrained function on its own task (source validation loss, "
        f"{t['source_val_samples']} images): "
        + ", ".join(f"{k} {v:.6f}" for k, v in kept.items())
        + ".",
        "",
        "| lr | variant | val loss before | after 1 epoch | at the end "
        "| accuracy (mean ± std) | diverged | BN recalibrated: loss, accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in d["summary"]:
        lines.append(
            f"| {r['lr']:g} | {r['variant']} | {_loss(r['before'])} "
            f"| {_loss(r['epoch1'])} | {_loss(r['end'])} "
            f"| {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} "
            f"| {r['diverged']}/{r['seeds']} | {_recalibrated(r)} |"
        )
    at = d["diverges_at"]
    lines += [
        "",
        "Diverges (most seeds) from lr: "
        + ", ".join(
            f"{k} {'none in the grid' if v is None else f'{v:g}'}"
            for k, v in at.items()
        )
        + ".",
        "",
        f"Under `mixed_float16` with `LossScaleOptimizer(Adam)` at lr {d['mixed']['lr']:g}:",
        "",
        "| variant | val loss before | identical before | at the end | accuracy (mean ± std) | diverged |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["mixed"]["summary"]:
        lines.append(
            f"| {r['variant']} | {_loss(r['before'])} "
            f"| {r['identical_before']}/{r['seeds']} | {_loss(r['end'])} "
            f"| {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | {r['diverged']}/{r['seeds']} |"
        )
    lines += [
        "",
        "Checks: "
        + "; ".join(f"{k}: {'yes' if v else '**no**'}" for k, v in d["checks"].items())
        + ".",
        "",
    ]
    return lines


def plot(section: dict, path) -> None:
    """Final accuracy against learning rate, one line per variant, error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = section["data"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    variants = list(dict.fromkeys(r["variant"] for r in d["summary"]))
    for offset, variant in zip((0.94, 1.0, 1.06), variants, strict=True):
        rows = [r for r in d["summary"] if r["variant"] == variant]
        ax.errorbar(
            [r["lr"] * offset for r in rows],
            [r["accuracy"] for r in rows],
            yerr=[r["accuracy_std"] for r in rows],
            marker="o",
            capsize=3,
            label=variant,
        )
    for color, variant in ((1, VARIANTS_BN[0]), (2, VARIANTS_BN[1])):
        rows = [
            r
            for r in d["summary"]
            if r["variant"] == variant and r.get("recalibrated_runs")
        ]
        ax.plot(
            [r["lr"] for r in rows],
            [r["recalibrated_accuracy"] for r in rows],
            linestyle="--",
            marker=".",
            color=f"C{color}",
            alpha=0.7,
            label=f"{variant}, then recalibrate_bn",
        )
    ax.axhline(
        1 / len(d["task"]["transfer_classes"]),
        color="grey",
        linestyle=":",
        label="chance",
    )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (Adam)")
    ax.set_ylabel("val accuracy after fine-tuning")
    sizes = d["sizes"]
    ax.set_title(
        f"digits 0-4 -> 5-9, dense head, {sizes['epochs']} epochs, "
        f"mean ± std over {sizes['seeds']} seeds",
        fontsize=10,
    )
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
