"""Planning a run as the manifest streams: rows -> jobs -> keys -> done or to render -> shards.

``RowPlanner.shards()`` yields each shard as soon as it is full (and ``None`` after each batch, so the flow can
look after running shards while a long stretch of done rows streams by). It holds a batch of rows, the shards
being filled, a bounded cache of input identities and, to decide what is done, one uint64 per current ``ok``
record whose outputs are present (``tasks.metadata_scans.done_hashes``) and two per output those records own
(``tasks.owners``: a row may not overwrite another id's output): never all rows, jobs, keys or records.

Rows that fail before rendering (checks, missing inputs, a spec whose pipeline cannot be built) are journaled
as ``failed`` records in batches, with their passthrough columns, and reported to the run monitor.

A done row whose passthrough values differ from its record's is not rendered again: its new values are
journaled as an update (``MetadataStore.journal_updates``), which the run's fold applies to the record. Deciding
that costs one more uint64 per current ``ok`` record (``tasks.metadata_scans.passthrough_hashes``, over the manifest's
passthrough columns), compared with the done rows' as they stream.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

from ipaflow.core.hashing import members
from ipaflow.core.problems import FailedRow, Problem
from ipaflow.flows.open_run import OpenedRun, OutputRecords, judge_rows
from ipaflow.specs.checks import as_job
from ipaflow.specs.outputs import layout_of
from ipaflow.specs.rows import Job
from ipaflow.tasks.keys import IdentityCache
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.metadata_scans import row_passthrough_hashes
from ipaflow.tasks.metadata_schema import make_record, record_column
from ipaflow.tasks.shards import ShardCutter, ShardPlan, auto_shard_size

JOURNAL_EVERY = 4096  # failed records journaled per file


class RowPlanner:
    """Plans a run as its manifest streams: the rows ``judge_rows`` rejects are journaled as failed, done rows
    whose passthrough values changed as updates, and the rows to render cut into shards."""

    def __init__(self, run: OpenedRun, records: OutputRecords, metadata: MetadataStore, run_id: str, monitor):
        self.run, self.records, self.metadata = run, records, metadata
        self.storage, self.options, self.census = run.storage, run.options, run.census
        self.run_id, self.monitor = run_id, monitor
        self.passthrough = run.passthrough  # manifest column -> record column
        self._updates: list[dict] = []
        self._update_files = 0
        self.cache = IdentityCache()
        self.specs = run.specs
        self.size = self.options.shard_size or auto_shard_size(self.census.rows, self.options.batch_size)
        self.cutter = ShardCutter(self.specs, self.size, self.options.layout)
        self.broken: dict[str, Problem] = {}  # spec -> why its pipeline cannot be built (fail fast)
        self.rejected = self.rows = 0  # rows judged, and of those failed before rendering
        self.first_shard_s: float | None = None
        self._records: list[dict] = []
        self._files = 0
        self._redact = functools.lru_cache(maxsize=4096)(self.storage.redact)  # fail-fast rows share one reason

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
                                 redact=self._redact, layout=self.layout(job.spec), manifest=self.manifest_file(job.index))
        else:
            record = make_record(job_id=failed.row, spec=failed.spec or "", status="failed", run_id=self.run_id,
                                 error=failed.error, redact=self._redact, extra=extra,
                                 manifest=self.manifest_file(failed.index))
        self._records.append(record)
        if len(self._records) >= JOURNAL_EVERY:
            self.flush()

    def manifest_file(self, index: int | None) -> str:
        """The manifest file a row came from (a folder manifest's own file), as its records name it."""
        return self.run.manifest.uri if index is None else self.run.manifest.file_of(index)

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
        stale = ~members(row_passthrough_hashes([job.id for job in jobs], extras, names), self.records.ok_passthrough)
        for job, values, changed in zip(jobs, extras, stale):
            if changed:
                self._updates.append({"id": job.id, **values})  # absent columns are nulls (journal_updates)
        self.monitor.counts.updated += int(stale.sum())
        if len(self._updates) >= JOURNAL_EVERY:
            self.flush()

    # -- the stream -----------------------------------------------------------------------------------------
    def shards(self) -> Iterator[ShardPlan | None]:
        for judged in judge_rows(self.run, self.records, self.cache):
            self.rows += judged.rows
            for rejected in judged.rejected:
                self.fail(rejected.failed, rejected.job, rejected.key, rejected.extra)
            skipped = len(judged.done)
            self.monitor.counts.skipped += skipped
            if skipped and self.records.ok_passthrough is not None:
                self._update_stale(judged.done)
            for job, key in judged.to_render:
                if job.spec in self.broken:
                    self.fail(FailedRow(row=job.id, problems=(self.broken[job.spec],), index=job.index,
                                        spec=job.spec), job, key)
                else:
                    yield from self._with_manifests(self.cutter.add(as_job(job), key))
            yield None
        yield from self._with_manifests(self.cutter.flush())
        self.flush()

    def _with_manifests(self, shards: list[ShardPlan]) -> list[ShardPlan]:
        for shard in shards:
            shard.manifests = {job.id: self.manifest_file(job.index) for job in shard.jobs}
        return shards
