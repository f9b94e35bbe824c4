"""Planning a run as the manifest streams: rows -> jobs -> keys -> done or to render -> shards.

``RowPlanner.shards()`` yields each shard as soon as it is full (and ``None`` after each batch, so the flow can
look after running shards while a long stretch of done rows streams by). It holds a batch of rows, the shards
being filled, a bounded cache of input identities and, to decide what is done, one uint64 per current ``ok``
record whose outputs are present (``tasks.metadata.done_hashes``) and two per output those records own
(``tasks.owners``: a row may not overwrite another id's output): never all rows, jobs, keys or records.

Rows that fail before rendering (checks, missing inputs, a spec whose pipeline cannot be built) are journaled
as ``failed`` records in batches, with their passthrough columns, and reported to the run monitor.

A done row whose passthrough values differ from its record's is not rendered again: its new values are
journaled as an update (``MetadataStore.journal_updates``), which the run's fold applies to the record. Deciding
that costs one more uint64 per current ``ok`` record (``tasks.metadata.passthrough_hashes``, over the manifest's
passthrough columns), compared with the done rows' as they stream.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from ipaflow.core.hashing import hash_joined, members
from ipaflow.core.problems import FailedRow, Problem, RowFailed
from ipaflow.core.storage import Storage
from ipaflow.specs.census import Census
from ipaflow.specs.checks import as_job
from ipaflow.specs.manifest import Manifest
from ipaflow.specs.options import RenderOptions
from ipaflow.specs.outputs import layout_of
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import Job
from ipaflow.specs.stream import resolve_stream
from ipaflow.tasks.call_defaults import denoising_failures
from ipaflow.tasks.keys import IdentityCache, identify_inputs, row_key
from ipaflow.tasks.metadata import MetadataStore, make_record, passthrough_names, record_column, row_passthrough_hashes
from ipaflow.tasks.owners import OwnedOutputs
from ipaflow.tasks.shards import ShardCutter, ShardPlan, auto_shard_size

JOURNAL_EVERY = 4096  # failed records journaled per file


class RowPlanner:
    def __init__(self, manifest: Manifest, registry: SpecRegistry, storage: Storage, metadata: MetadataStore,
                 census: Census, options: RenderOptions, run_id: str, monitor, done: np.ndarray,
                 current: np.ndarray | None = None, owned: OwnedOutputs | None = None):
        self.manifest, self.registry, self.storage, self.metadata = manifest, registry, storage, metadata
        self.census, self.options, self.run_id, self.monitor = census, options, run_id, monitor
        self.done = done  # sorted hash(id, key, layout) of the current ok records with outputs present
        self.current = current  # sorted passthrough_hashes of the current ok records (None: not compared)
        self.owned = owned if owned is not None else OwnedOutputs()  # outputs earlier runs' records own
        self.passthrough = passthrough_names(manifest.columns)  # manifest column -> record column
        self.updated = 0
        self._updates: list[dict] = []
        self._update_files = 0
        self.cache = IdentityCache()
        self.specs = {name: registry.get(name) for name in census.specs}
        self.size = options.shard_size or auto_shard_size(census.rows, options.batch_size)
        self.cutter = ShardCutter(self.specs, self.size, options.layout)
        self.broken: dict[str, Problem] = {}  # spec -> why its pipeline cannot be built (fail fast)
        self.skipped = self.rejected = self.rows = 0
        self.first_shard_s: float | None = None
        self._records: list[dict] = []
        self._files = 0
        self._redact = functools.lru_cache(maxsize=4096)(storage.redact)  # fail-fast rows share one reason

    def layout(self, spec_name: str) -> str:
        return layout_of(self.specs[spec_name], self.options.layout)

    # -- failed rows ----------------------------------------------------------------------------------------
    def fail(self, failed: FailedRow, job: Job | None = None, key: str | None = None, extra: dict | None = None) -> None:
        """A row that fails without reaching a worker: counted, reported, journaled (one record per usable id,
        with its passthrough cells: the job's, else ``extra``)."""
        self.rejected += 1
        self.monitor.row_failed(failed)
        if failed.row.startswith("#"):
            return
        if job is not None:
            job = as_job(job)
            record = make_record(job_id=job.id, spec=job.spec, status="failed", run_id=self.run_id, error=failed.error,
                                 seed=job.seed, params=job.params, key=key, extra=job.extra,
                                 redact=self._redact, layout=self.layout(job.spec))
        else:
            record = make_record(job_id=failed.row, spec=failed.spec or "", status="failed", run_id=self.run_id,
                                 error=failed.error, redact=self._redact, extra=extra)
        self._records.append(record)
        if len(self._records) >= JOURNAL_EVERY:
            self.flush()

    def fail_jobs(self, jobs: list, keys: dict[str, str], problem: Problem) -> None:
        for job in jobs:
            self.fail(FailedRow(row=job.id, problems=(problem,), index=job.index, spec=job.spec), job, keys.get(job.id))

    def fail_shard(self, shard: ShardPlan, problem: Problem) -> None:
        self.fail_jobs(shard.jobs, shard.row_keys, problem)

    def flush(self) -> None:
        if self._records:
            self.metadata.journal(self.run_id, f"planned-rows-{self._files:05d}", self._records)
            self._files += 1
            self._records = []
        if self._updates:
            self.metadata.journal_updates(self.run_id, f"updates-{self._update_files:05d}", self._updates,
                                          self.passthrough.values())
            self._update_files += 1
            self._updates = []

    def _update_stale(self, jobs: list) -> None:
        """Done rows whose passthrough values differ from their records': journal the new values."""
        extras = [{record_column(name): value for name, value in job.extra.items()} for job in jobs]
        names = sorted(self.passthrough.values())
        stale = ~members(row_passthrough_hashes([job.id for job in jobs], extras, names), self.current)
        for job, values, changed in zip(jobs, extras, stale):
            if changed:
                self._updates.append({"id": job.id, **values})  # absent columns are nulls (journal_updates)
        self.updated += int(stale.sum())
        if len(self._updates) >= JOURNAL_EVERY:
            self.flush()

    # -- the stream -----------------------------------------------------------------------------------------
    def shards(self) -> Iterator[ShardPlan | None]:
        for resolved in resolve_stream(self.manifest, self.registry, self.census, limit=self.options.limit):
            self.rows += resolved.num_rows
            for failed in resolved.failed:
                self.fail(failed, extra=resolved.extras.get(failed.index))
            yield from self._plan(resolved.jobs)
            yield None
        yield from self.cutter.flush()
        self.flush()

    def _plan(self, jobs: list[Job]) -> Iterator[ShardPlan]:
        if not jobs:
            return
        if broken := denoising_failures(jobs, self.specs, self.options.models):
            for job in jobs:
                if job.index in broken:
                    self.fail(FailedRow(row=job.id, problems=(broken[job.index],), index=job.index, spec=job.spec), job)
            jobs = [job for job in jobs if job.index not in broken]
        # out: a style folder inside the output folder leaves ipaflow's own files out
        identities = identify_inputs(self.storage, jobs, cache=self.cache, out=self.metadata.out)
        keyed: list[tuple[Job, str]] = []
        for job in jobs:
            try:
                keyed.append((job, row_key(job, self.specs[job.spec], identities)))
            except RowFailed as exc:  # a missing or unreadable input
                self.fail(FailedRow(row=job.id, problems=exc.problems, index=job.index, spec=job.spec), job)
        if not keyed:
            return
        done = np.zeros(len(keyed), dtype=bool)
        if len(self.done) and not self.options.overwrite:
            hashes = hash_joined(pa.array([job.id for job, _ in keyed]), pa.array([key for _, key in keyed]),
                                 pa.array([self.layout(job.spec) for job, _ in keyed]))
            done = members(hashes, self.done)
        skipped = int(done.sum())
        self.skipped += skipped
        self.monitor.skipped += skipped
        if skipped and self.current is not None:
            self._update_stale([job for (job, _), finished in zip(keyed, done) if finished])
        taken = self.owned.problems([job for (job, _), finished in zip(keyed, done) if not finished], self.specs)
        for (job, key), finished in zip(keyed, done):
            if finished:
                continue
            if job.index in taken:  # it would overwrite an output of another id's record
                self.fail(FailedRow(row=job.id, problems=taken[job.index], index=job.index, spec=job.spec), job, key)
                continue
            if job.spec in self.broken:
                self.fail(FailedRow(row=job.id, problems=(self.broken[job.spec],), index=job.index, spec=job.spec),
                          job, key)
                continue
            yield from self.cutter.add(as_job(job), key)
