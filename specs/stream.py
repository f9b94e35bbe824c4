"""Rows to jobs as the manifest streams: batch by batch, in manifest order, never all rows at once.

Each batch is vouched for by the vectorised checks (``specs.checks``); vouched rows become jobs directly, the
others go through the exact checks of ``specs.rows`` (which name every column at fault). The census
(``specs.census``) adds the whole-manifest rules, duplicate ids and colliding outputs, exactly as
``specs.rows.resolve_rows`` applies them to a list of rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ipaflow.core.problems import FailedRow, RowFailed
from ipaflow.specs.census import Census, ManifestWideProblems, take_census
from ipaflow.specs.checks import JobBuilder, VouchedRow, vouch
from ipaflow.specs.manifest import Manifest, RowBatch
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import Job, passthrough_of, resolve_row, row_label, spec_name_of


@dataclass
class Resolved:
    """One batch, resolved: its jobs and its failed rows, each in manifest order. A job may be a ``VouchedRow``
    (``specs.checks``: a vouched row not yet made a ``Job``; ``as_job`` makes it one)."""

    start: int
    num_rows: int
    jobs: list[Job | VouchedRow] = field(default_factory=list)
    failed: list[FailedRow] = field(default_factory=list)
    extras: dict[int, dict] = field(default_factory=dict)  # failed rows' passthrough cells, by manifest index


def _with_manifest_wide(index: int, row: dict, outcome: Job | RowFailed, manifest_wide: ManifestWideProblems | None,
                  registry: SpecRegistry) -> Job | FailedRow:
    """The row's final outcome: its own, plus what the whole-manifest rules say (as resolve_rows does)."""
    if isinstance(outcome, Job):
        if manifest_wide is None:
            return outcome
        problems = [manifest_wide.duplicate] if manifest_wide.duplicate else manifest_wide.collisions
        return FailedRow(row=outcome.id, problems=tuple(problems), index=index, spec=outcome.spec)
    problems = list(outcome.problems)
    if manifest_wide is not None and manifest_wide.duplicate:
        problems.insert(0, manifest_wide.duplicate)
    return FailedRow(row=row_label(row, index), problems=tuple(problems), index=index,
                     spec=spec_name_of(row, registry))


def resolve_batch(batch: RowBatch, registry: SpecRegistry, base: str, offenders: dict[int, ManifestWideProblems],
                  build: bool = True, limit: int | None = None) -> Resolved:
    """Resolve one batch; ``build=False`` only judges (``validate`` needs no jobs for good rows)."""
    n = batch.num_rows if limit is None else max(0, min(batch.num_rows, limit - batch.start))
    out = Resolved(start=batch.start, num_rows=n)
    vouched = vouch(batch, registry)[:n]
    builder = JobBuilder(batch, registry, base)
    for offset in range(n):
        index = batch.start + offset
        manifest_wide = offenders.get(index)
        if vouched[offset] and manifest_wide is None:
            if build:
                out.jobs.append(builder.draft(offset))
            continue
        row = batch.row(offset)
        try:
            outcome: Job | RowFailed = resolve_row(row, index, registry, base)
        except RowFailed as exc:
            outcome = exc
        final = _with_manifest_wide(index, row, outcome, manifest_wide, registry)
        if isinstance(final, FailedRow):
            out.failed.append(final)
            out.extras[index] = passthrough_of(row)
        elif build:
            out.jobs.append(final)
    return out


PIECE_ROWS = 4096  # rows resolved at a time: the first shard leaves after a few thousand rows, not a whole batch


def resolve_stream(manifest: Manifest, registry: SpecRegistry, census: Census | None = None, build: bool = True,
                   limit: int | None = None, piece: int = PIECE_ROWS) -> Iterator[Resolved]:
    """Every row of the manifest, resolved, in order, a piece of a batch at a time (up to ``limit`` rows)."""
    census = census or take_census(manifest, registry, limit)
    for batch in manifest.iter_batches():
        if limit is not None and batch.start >= limit:
            break
        for offset in range(0, batch.num_rows, piece):
            part = batch.slice(offset, piece) if batch.num_rows > piece else batch
            if limit is not None and part.start >= limit:
                break
            yield resolve_batch(part, registry, batch.base, census.offenders, build, limit)

