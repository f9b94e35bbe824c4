"""The shard task: what runs on a GPU worker.

For each window of rows: inputs are fetched ahead (background threads), rows are grouped into micro-batches
that can share one pipeline call, rendered on the cached pipeline, and handed to the writer, which encodes and
uploads in the background and journals the records. A retried task skips the rows its earlier attempt
already journaled. Plain Python (no Prefect): tasks/prefect_tasks.py wraps it as the Prefect task.
"""

from __future__ import annotations

import json
import logging
import time

from pydantic import BaseModel, SecretStr

from specs.jobs import Job
from tasks.inputs import InputError, InputFetcher, RowInputs
from tasks.metadata import MetadataStore
from tasks.pipelines import PIPELINES
from tasks.render import batch_key, output_shape, render_rows
from tasks.shards import DEFAULT_BATCH_SIZE, ShardPlan
from tasks.storage import Storage, join, redact
from tasks.writers import ShardWriter

log = logging.getLogger("ipaflow.worker")


class RunSettings(BaseModel):
    """What every shard task of a run needs to know (small, picklable, no secrets in clear)."""

    run_id: str
    out: str
    batch_size: int = DEFAULT_BATCH_SIZE
    models: str | None = None
    storage_options: SecretStr | None = None  # JSON; SecretStr keeps it out of logs and the Prefect UI

    def storage(self) -> Storage:
        options = json.loads(self.storage_options.get_secret_value()) if self.storage_options else {}
        return Storage(options=options, local_staging=join(self.out, "_ipaflow", "tmp"))


class ShardStats(BaseModel):
    name: str
    spec: str
    rows: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    images: int = 0
    seconds: float = 0.0
    build_seconds: float = 0.0
    failures: list[tuple[str, str]] = []


def _batches(loaded, jobs: list[Job], inputs: dict[str, RowInputs], batch_size: int):
    """Group a window's rows by call compatibility (first-seen order), then cut groups to batch_size, or to
    the smaller size an out-of-memory taught the pipeline for that shape."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(batch_key(job, inputs[job.id]), []).append(job)
    for group in groups.values():
        size = min(batch_size, loaded.batch_limits.get(output_shape(group[0]), batch_size))
        for start in range(0, len(group), size):
            yield group[start:start + size]


def run_shard(shard: ShardPlan, settings: RunSettings) -> ShardStats:
    """Render one shard; every row ends journaled as ``ok`` or ``failed`` with a reason."""
    started = time.perf_counter()
    storage = settings.storage()
    stats = ShardStats(name=shard.name, spec=shard.spec.name, rows=len(shard.jobs))
    done = MetadataStore(storage, settings.out).journaled_ids(settings.run_id, f"{shard.name}-", "ok")
    jobs = [job for job in shard.jobs if job.id not in done]
    stats.skipped = len(shard.jobs) - len(jobs)
    writer = ShardWriter(storage, settings.out, settings.run_id, shard.name, shard.spec, shard.row_keys)
    fetcher = InputFetcher(storage, jobs, {shard.spec.name: shard.spec})
    try:
        try:
            built = time.perf_counter()
            loaded = PIPELINES.get(shard.spec, settings.models)
            stats.build_seconds = time.perf_counter() - built
        except Exception as exc:  # noqa: BLE001 - a spec that cannot load fails its rows, with the reason
            log.exception("cannot build the pipeline of spec %s", shard.spec.name)
            reason = redact(f"pipeline: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            for job in jobs:
                writer.fail(job, reason[:500])
            return stats
        window = max(settings.batch_size * 2, 2)
        windows = [jobs[i:i + window] for i in range(0, len(jobs), window)]
        if windows:
            fetcher.prefetch(windows[0])
        for number, rows in enumerate(windows):
            if number + 1 < len(windows):
                fetcher.prefetch(windows[number + 1])
            ready: dict[str, RowInputs] = {}
            for job in rows:
                try:
                    ready[job.id] = fetcher.get(job)
                except InputError as exc:
                    writer.fail(job, f"{exc.column}: {exc.reason}")
            batchable = [job for job in rows if job.id in ready]
            for batch in _batches(loaded, batchable, ready, settings.batch_size):
                for rendered in render_rows(loaded, batch, [ready[job.id] for job in batch]):
                    writer.submit(rendered)
                writer.flush()
    finally:
        fetcher.close()
        writer.close()
        stats.ok, stats.failed, stats.images = writer.ok, writer.failed, writer.images
        stats.failures = writer.failures
        stats.seconds = time.perf_counter() - started
    return stats
