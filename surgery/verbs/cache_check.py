"""What a feature cache records of what made it, and the checks before reuse.

A cache's fingerprint is JSON: `model` (its name, `weights` and
`architecture` digests, from `surgery.files.fingerprint`) and `data` (its
`source` in words, the per-sample `layout` of each input, and `rows`, `head`
and `tail`: the number of rows and digests of the first and the last
`WINDOW` input samples before them). `cache_features` commits it with every
batch of rows (in `<path>.partial.json`, see `surgery.files.rowstore`) and
keeps it in the complete file's `surgery` attribute.

`Resume` checks an interrupted cache before a single row is appended: the
model first, the layout on the first batch, and the digests once the data
has passed the committed rows. `check_complete` checks a complete cache
against the model and the data's first samples. Any difference, or no
fingerprint at all (a cache from before fingerprints), is refused in one
line that says what changed and how to start again.
"""

from __future__ import annotations

from typing import Any

from surgery.data.batches import batch_length
from surgery.errors import SurgeryError
from surgery.files.fingerprint import (
    WINDOW,
    RowDigests,
    architecture_fingerprint,
    as_recorded,
    describe_source,
    model_fingerprint,
    sample_layout,
)

_UNKNOWN = "without a fingerprint of its model and data (before caches recorded one)"


def made_by(model, data: Any) -> dict:
    """The fingerprint of a cache of `model` over `data`, before any row."""
    return {
        "model": {
            "name": model.name,
            "weights": model_fingerprint(model),
            "architecture": architecture_fingerprint(model),
        },
        "data": {"source": describe_source(data)},
    }


class Resume:
    """The checks of an interrupted cache against the run resuming it.

    Args:
        partial: the partial file's path, for the messages.
        rows: the rows it committed.
        recorded: the fingerprint committed with them (None: there is none).
        current: `made_by` of this run.
    """

    def __init__(self, partial: str, rows: int, recorded, current: dict):
        self.partial, self.rows = partial, rows
        self.recorded, self.current = recorded, current
        if not isinstance(recorded, dict) or not _complete(recorded):
            raise self._refuse(_UNKNOWN, verb="was written", why="it cannot be trusted")
        _check_model(recorded["model"], current["model"], self._refuse)

    def check_layout(self, layout: list) -> None:
        """Refuse data whose samples have another shape or dtype."""
        _check_layout(self.recorded["data"], layout, self._refuse)

    def check_rows(self, digests: dict) -> None:
        """Refuse data whose first or last committed samples differ."""
        _check_digests(self.recorded["data"], digests, self._refuse)

    def _refuse(
        self, what: str, verb: str = "was made", why: str = "resuming would mix them"
    ) -> SurgeryError:
        return SurgeryError(
            f"the partial cache {self.partial} ({self.rows} rows) {verb} {what}; "
            f"{why}: pass restart=True to cache_features to discard its rows "
            f"and start again, or delete {self.partial}"
        )


def check_complete(path: str, rows, recorded, model_made_by: dict, batches) -> None:
    """Refuse a complete cache made by another model or from other data.

    Reads only the data's first `WINDOW` samples.
    """

    def refuse(what: str, verb: str = "was made") -> SurgeryError:
        return SurgeryError(
            f"the feature cache {path} {verb} {what}; it does not hold these "
            "features: delete it or cache to another path"
        )

    if not isinstance(recorded, dict) or not _complete(recorded):
        raise refuse(_UNKNOWN, verb="was written")
    _check_model(recorded["model"], model_made_by["model"], refuse)
    want = min(WINDOW, int(rows.shape[0]))
    digests, seen = RowDigests(), 0
    for x in batches:
        if seen == 0:
            layout = as_recorded(sample_layout(x), recorded["data"]["layout"])
            _check_layout(recorded["data"], layout, refuse)
            digests.dtypes = [dtype for _, dtype in layout]
        digests.add(x, seen)
        seen += batch_length(x)
        if seen >= want:
            break
    if seen < want or digests.digest(want)["head"] != recorded["data"]["head"]:
        raise refuse(_other_data(recorded["data"], "first"))


def _complete(recorded: dict) -> bool:
    model, data = recorded.get("model"), recorded.get("data")
    return (
        isinstance(model, dict)
        and isinstance(data, dict)
        and all(k in model for k in ("weights", "architecture"))
        and all(k in data for k in ("layout", "rows", "head", "tail"))
    )


def _check_model(recorded: dict, current: dict, refuse) -> None:
    then, now = recorded.get("name"), current["name"]
    names = f"'{then}' then, '{now}' now" if then != now else f"'{now}'"
    if recorded["architecture"] != current["architecture"]:
        raise refuse(f"by another model (another architecture or split point: {names})")
    if recorded["weights"] != current["weights"]:
        raise refuse(f"by another model (same architecture, other weights: {names})")


def _check_layout(recorded: dict, layout: list, refuse) -> None:
    if recorded["layout"] != layout:
        then = ", ".join(f"{tuple(s)} {d}" for s, d in recorded["layout"])
        now = ", ".join(f"{tuple(s)} {d}" for s, d in layout)
        raise refuse(f"from data of another shape (per sample: {then} then, {now} now)")


def _check_digests(recorded: dict, digests: dict, refuse) -> None:
    for key, which in (("head", "first"), ("tail", "last committed")):
        if recorded[key] != digests[key]:
            raise refuse(_other_data(recorded, which))


def _other_data(recorded: dict, which: str) -> str:
    return (
        f"from other data (its {which} samples differ; it was cached from "
        f"{recorded.get('source', 'unknown data')})"
    )
