"""Rows counted, in one additive type: what a shard did, what it reported so far, what a fold wrote, per spec
and for the whole run (as datatrove sums its ``PipelineStats``)."""

from __future__ import annotations

from pydantic import BaseModel


class RowCounts(BaseModel):
    """Counts of rows, summed with ``+`` (or ``add`` in place); a model that extends it (``ShardStats``,
    ``ShardProgress``, ``FoldResult``) sums as its counts.

    Attributes:
        rows: rows counted (rendered, failed or skipped).
        ok: rows rendered: an ``ok`` record written, its outputs in place.
        failed: rows with a ``failed`` record (or, for a row whose id is unusable, a report only).
        skipped: rows already done (an ``ok`` record with the same key and its outputs present).
        updated: done rows whose records took new passthrough values (not rendered again).
        images: outputs written (images, or one video per row).
        seconds: worker seconds spent on the rows.
    """

    rows: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    updated: int = 0
    images: int = 0
    seconds: float = 0.0

    def counts(self) -> RowCounts:
        """The counts alone (a plain ``RowCounts`` of a model that extends it)."""
        return RowCounts(**{name: getattr(self, name) for name in COUNTED})

    def add(self, other: RowCounts) -> RowCounts:
        """Add ``other``'s counts to these, in place; returns self."""
        for name in COUNTED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def __add__(self, other: RowCounts) -> RowCounts:
        return self.counts().add(other)


COUNTED = tuple(RowCounts.model_fields)
