"""Opening a run and judging its rows: the one way ``render``, ``validate``, ``render --dry-run`` and the command
line's pre-check go through, so that a rule added here applies to all of them.

    run = open_run("manifest.parquet", options)          # storage, spec registry, manifest, passthrough columns
    records = scan_records(run, MetadataStore(run.storage, out))   # what --out holds (render and --dry-run)
    for judged in judge_rows(run, records):               # every rule that applies before rendering
        judged.rejected, judged.done, judged.to_render

The rules, in the order they apply: the whole-manifest rules (duplicate ids, colliding outputs: the census),
each row's own checks (``specs.rows``, vouched for in bulk by ``specs.checks``), steps x strength with the
pipeline's own defaults (``tasks.call_defaults``); then, with an ``--out``: every input has an identity (the row's
key), a row whose key matches a current ``ok`` record with its outputs present is done, and a row may not write
an output another id's record owns (``tasks.owners``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ipaflow.core.hashing import hash_joined, hash_strings, members
from ipaflow.core.problems import FailedRow, Problem, RowFailed
from ipaflow.core.storage import Storage
from ipaflow.specs.census import Census, take_census
from ipaflow.specs.checks import VouchedRow
from ipaflow.specs.manifest import Manifest, ManifestError, open_manifest
from ipaflow.specs.options import RenderOptions
from ipaflow.specs.outputs import layout_of
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import Job
from ipaflow.specs.spec import Spec
from ipaflow.specs.stream import resolve_stream
from ipaflow.specs.sweeps import expander
from ipaflow.tasks.call_defaults import denoising_failures
from ipaflow.tasks.keys import IdentityCache, identify_inputs, row_key
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.metadata_scans import RecordIndex, done_hashes, listing_hashes, passthrough_hashes
from ipaflow.tasks.metadata_schema import passthrough_names
from ipaflow.tasks.owners import OwnedOutputs


@dataclass
class OpenedRun:
    """A manifest opened with its run's options: what every command that reads a manifest starts from.

    Attributes:
        options: the run's options.
        storage: the storage the options describe (credentials redacted from what it says).
        registry: the bundled specs and those of ``options.specs``.
        manifest: the opened manifest (its columns known, its rows not read yet).
        passthrough: manifest column -> record column, for the columns carried into the metadata.
    """

    options: RenderOptions
    storage: Storage
    registry: SpecRegistry
    manifest: Manifest
    passthrough: dict[str, str]

    @functools.cached_property
    def census(self) -> Census:
        """The whole-manifest rules' pass (duplicate ids, colliding outputs, rows per spec), up to ``--limit``."""
        return take_census(self.manifest, self.registry, self.options.limit)

    @functools.cached_property
    def specs(self) -> dict[str, Spec]:
        """The specs the manifest's rows name (and the registry knows)."""
        return {name: self.registry.get(name) for name in self.census.specs}

    def layout(self, spec_name: str) -> str:
        """The output layout of a spec's rows in this run (``--layout`` wins over the spec's)."""
        return layout_of(self.specs[spec_name], self.options.layout)


def open_run(manifest: str, options: RenderOptions, storage: Storage | None = None) -> OpenedRun:
    """Open ``manifest`` with ``options``: the storage, the spec registry, the manifest and its passthrough
    columns. Reads the spec folders and the manifest's schema, not its rows (the census is taken when first used).

    Args:
        manifest: the manifest's URI or path.
        options: the run's options (``RenderOptions.resolved`` here, if not already).
        storage: the storage to read through (a run's own, with its staging folder); by default one made from
            ``options``.

    Returns:
        The opened run.

    Raises:
        ManifestError: the manifest cannot be read, or a column name is unusable.
        SpecError: a spec folder or spec is unusable.
    """
    options = options.resolved()
    storage = storage or Storage(options=options.storage_options_dict())
    registry = SpecRegistry(options.specs, storage=storage)
    opened = open_manifest(manifest, storage=storage)
    if (expand := expander(registry)) is not None:  # swept specs: rows stream as their combinations
        opened = replace(opened, expand=expand, num_rows=None)
    return OpenedRun(options=options, storage=storage, registry=registry, manifest=opened,
                     passthrough=passthrough_names(opened.columns))


@dataclass
class OutputRecords:
    """What an ``--out`` already holds, as the rules before rendering need it (a few uint64 per record).

    Attributes:
        out: the output folder.
        index: where each id's current record lives (for the run's fold).
        done_keys: sorted ``hash(id, key, layout)`` of the current ``ok`` records whose outputs are all present
            (empty with ``--overwrite``).
        owned: the outputs each id's current record owns.
        ok_passthrough: sorted ``passthrough_hashes`` of the current ``ok`` records, when the manifest has passthrough
            columns (None: not compared).
    """

    out: str
    index: RecordIndex
    done_keys: np.ndarray
    owned: OwnedOutputs
    ok_passthrough: np.ndarray | None = None


def scan_records(run: OpenedRun, metadata: MetadataStore) -> OutputRecords:
    """One read of ``metadata``'s parts and one listing per output folder; writes nothing (a render folds what
    killed runs left first: ``flows.render``)."""
    passthrough = sorted(run.passthrough.values())
    output_paths = None if run.options.overwrite else listing_hashes(run.storage, metadata.out)
    owned = OwnedOutputs()
    done_chunks: list[np.ndarray] = []
    passthrough_chunks: list[np.ndarray] = []

    def collect(_: str, table: pa.Table) -> None:
        owned.add(table)
        if output_paths is not None and len(output_paths):
            done_chunks.append(done_hashes(table, metadata.out,
                                           lambda paths: members(hash_strings(paths), output_paths)))
            if passthrough:
                ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False)
                passthrough_chunks.append(passthrough_hashes(table.filter(ok), passthrough))

    index = metadata.index(collect, ["status", "key", "outputs", "layout", *passthrough])
    done_keys = np.unique(np.concatenate(done_chunks)) if done_chunks else np.zeros(0, np.uint64)
    ok_passthrough = None if not passthrough else \
        np.unique(np.concatenate(passthrough_chunks)) if passthrough_chunks else np.zeros(0, np.uint64)
    owned.seal(metadata, index)
    return OutputRecords(out=metadata.out, index=index, done_keys=done_keys, owned=owned,
                         ok_passthrough=ok_passthrough)


@dataclass
class Rejected:
    """A row that fails before rendering: why (``failed``), and what is known of it for its record: the job
    once it resolved (else the row's passthrough cells, ``extra``) and its key once its inputs were identified."""

    failed: FailedRow
    job: Job | VouchedRow | None = None
    key: str | None = None
    extra: dict | None = None


@dataclass
class JudgedRows:
    """A piece of the manifest, judged by every rule that applies before rendering; each list in manifest order.

    Attributes:
        rows: the rows of the piece.
        rejected: the rows that fail.
        done: rows whose current record is ``ok`` with the same key and its outputs present (with an ``--out``).
        to_render: the rows to render, each with its key (None without an ``--out``: nothing was keyed).
    """

    rows: int
    rejected: list[Rejected] = field(default_factory=list)
    done: list[Job | VouchedRow] = field(default_factory=list)
    to_render: list[tuple[Job | VouchedRow, str | None]] = field(default_factory=list)


def _failed(job: Job | VouchedRow, problems: tuple[Problem, ...], key: str | None = None) -> Rejected:
    return Rejected(FailedRow(row=job.id, problems=problems, index=job.index, spec=job.spec), job=job, key=key)


def judge_rows(run: OpenedRun, records: OutputRecords | None = None,
               cache: IdentityCache | None = None) -> Iterator[JudgedRows]:
    """Every row of the run's manifest (up to ``--limit``), judged, a piece at a time, in manifest order.

    Args:
        run: the opened run.
        records: what the ``--out`` holds; without it the rules of an ``--out`` (inputs' identities, done rows,
            outputs other ids own) are not applied and nothing is keyed (``validate``).
        cache: input identities already looked up (kept across pieces).

    Yields:
        One ``JudgedRows`` per piece.
    """
    cache = cache if cache is not None else IdentityCache()
    for resolved in _first_rows_judged(resolve_stream(run.manifest, run.registry, run.census,
                                                      limit=run.options.limit)):
        judged = JudgedRows(rows=resolved.num_rows)
        judged.rejected = [Rejected(failed, extra=resolved.extras.get(failed.index)) for failed in resolved.failed]
        jobs = resolved.jobs
        if broken := denoising_failures(jobs, run.specs, run.options.models):
            judged.rejected += [_failed(job, (broken[job.index],)) for job in jobs if job.index in broken]
            jobs = [job for job in jobs if job.index not in broken]
        if records is None:
            judged.to_render = [(job, None) for job in jobs]
        elif jobs:
            _judge_against(run, records, jobs, cache, judged)
        judged.rejected.sort(key=lambda rejected: rejected.failed.index)
        yield judged


class NothingJudged(ManifestError):
    """The manifest became unusable (a file changed underneath: ``specs.manifest_files``) before the run judged
    its first row: nothing of it ran (exit 2)."""


def _first_rows_judged(pieces: Iterator) -> Iterator:
    """``pieces``, with a ManifestError raised before the first one as ``NothingJudged``."""
    try:
        first = next(pieces, None)
    except NothingJudged:
        raise
    except ManifestError as exc:
        raise NothingJudged(str(exc)) from None
    if first is not None:
        yield first
        yield from pieces


def _judge_against(run: OpenedRun, records: OutputRecords, jobs: list, cache: IdentityCache,
                   judged: JudgedRows) -> None:
    """The rules of an ``--out``: every input has an identity, done rows, outputs other ids own."""
    # out: a style folder inside the output folder leaves ipaflow's own files out
    identities = identify_inputs(run.storage, jobs, cache=cache, out=records.out)
    keyed: list[tuple[Job | VouchedRow, str]] = []
    for job in jobs:
        try:
            keyed.append((job, row_key(job, run.specs[job.spec], identities)))
        except RowFailed as exc:  # a missing or unreadable input
            judged.rejected.append(_failed(job, exc.problems))
    if not keyed:
        return
    done = np.zeros(len(keyed), dtype=bool)
    if len(records.done_keys) and not run.options.overwrite:
        hashes = hash_joined(pa.array([job.id for job, _ in keyed]), pa.array([key for _, key in keyed]),
                             pa.array([run.layout(job.spec) for job, _ in keyed]))
        done = members(hashes, records.done_keys)
    judged.done = [job for (job, _), finished in zip(keyed, done) if finished]
    left = [(job, key) for (job, key), finished in zip(keyed, done) if not finished]
    taken = records.owned.problems([job for job, _ in left], run.specs)
    for job, key in left:
        if job.index in taken:  # it would overwrite an output of another id's record
            judged.rejected.append(_failed(job, taken[job.index], key))
        else:
            judged.to_render.append((job, key))
