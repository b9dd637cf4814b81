"""`PruneReport`: what `prune_channels` removed and what it did to the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from surgery.numerics.compare import Report


@dataclass(frozen=True)
class GroupChange:
    """One channel group's channels before and after pruning."""

    producers: tuple[str, ...]
    before: int
    after: int


@dataclass(frozen=True)
class PruneReport:
    """What `prune_channels` did.

    Attributes:
        criterion: The criterion the channels were picked by.
        amount: The fraction or count per group asked for (None for the
            dead and constant criteria, which remove every such channel).
        groups: Each group that lost channels: its producers and its
            channel count before and after.
        params_before: Weights in the original model (all of them).
        params_after: Weights in the pruned model.
        flops_before: Floating-point operations per sample of the original
            (2 per multiply-add of Dense and convolution layers, with bias
            adds and BatchNormalization), or None when the input size is
            free and no data fixed it.
        flops_after: The same for the pruned model.
        difference: How far apart the two models' outputs were over the data
            (`surgery.verify`'s report), or None without data.
        accuracy_before: Top-1 accuracy of the original over labelled data,
            or None (no labels, or the model does not output class scores).
        accuracy_after: The same for the pruned model.
        recalibrated: Whether BatchNormalization statistics were re-estimated
            on the data after pruning.
        notes: What a user should know: channels a group kept to stay
            non-empty, groups a criterion could not score, why a removal is
            exact only in real arithmetic.
    """

    criterion: str
    amount: float | int | None
    groups: list[GroupChange]
    params_before: int
    params_after: int
    flops_before: int | None
    flops_after: int | None
    difference: Report | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    recalibrated: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def removed(self) -> int:
        """The number of channels removed, over every group."""
        return sum(g.before - g.after for g in self.groups)

    def as_dict(self) -> dict:
        """The report as plain values, e.g. for `json.dumps`."""
        out = asdict(self)
        out["removed"] = self.removed
        out["difference"] = self.difference.as_dict() if self.difference else None
        return out

    def __str__(self) -> str:
        lines = [
            f"pruned {_count(self.removed, 'channel')} in "
            f"{_count(len(self.groups), 'group')} "
            f"by {self.criterion}"
            + (f" (amount {self.amount})" if self.amount is not None else ""),
        ]
        for g in self.groups:
            lines.append(f"  {' + '.join(g.producers)}: {g.before} -> {g.after}")
        lines.append(
            f"parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({_ratio(self.params_after, self.params_before)})"
        )
        if self.flops_before is not None and self.flops_after is not None:
            lines.append(
                f"FLOPs per sample: {self.flops_before:,} -> {self.flops_after:,} "
                f"({_ratio(self.flops_after, self.flops_before)})"
            )
        if self.difference is not None:
            lines.append(f"outputs: {self.difference}")
        if self.accuracy_before is not None:
            lines.append(
                f"accuracy: {self.accuracy_before:.4f} -> {self.accuracy_after:.4f}"
            )
        if self.recalibrated:
            lines.append("BatchNormalization statistics re-estimated on the data")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.1%} of before" if before else "n/a"
