"""The shard task: what runs on a GPU worker.

For each window of rows: inputs are fetched ahead (background threads), rows are grouped into micro-batches
that can share one pipeline call, rendered on the cached pipeline, and handed to the writer, which encodes and
uploads in the background and journals the records. A retried task skips the rows its earlier attempt
already journaled. Plain Python (no Prefect): tasks/prefect_tasks.py wraps it as the Prefect task, and turns
the optional ``progress`` callback's reports into live updates of the run.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from pydantic import BaseModel

from ipaflow.core.lease import Fence, FencedStorage
from ipaflow.core.problems import FailedRow, Problem, describe_exception
from ipaflow.core.storage import Storage, TransientStorageError, is_transient, join
from ipaflow.specs.options import RenderOptions
from ipaflow.specs.rows import Job
from ipaflow.tasks.compile import resolve_setting
from ipaflow.tasks.counts import RowCounts
from ipaflow.tasks.inputs import InputFetcher, RowInputs
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.model_files import ModelFileError
from ipaflow.tasks.pipelines import PIPELINES
from ipaflow.tasks.render import batch_key, render_rows
from ipaflow.tasks.shards import ShardPlan
from ipaflow.tasks.writers import ShardWriter

log = logging.getLogger("ipaflow.worker")


class RunSettings(BaseModel):
    """What every shard task of a run needs to know: the run, the output URI, the run's options (small,
    picklable; the storage options stay a SecretStr, out of logs and the Prefect UI) and the run's lease on the
    output (``lease_token``, ``lease_holder``: 0 and "" for none): every write checks that the run still holds
    it (``ipaflow.core.lease.FencedStorage``)."""

    run_id: str
    out: str
    options: RenderOptions = RenderOptions()
    lease_token: int = 0
    lease_holder: str = ""

    def storage(self) -> FencedStorage:
        options = self.options.storage_options_dict()
        fence = Fence(self.out, self.lease_token, self.lease_holder, Storage(options=options)) if self.lease_token else None
        return FencedStorage(options=options, local_staging=join(self.out, "_ipaflow", "tmp"), fence=fence)


class ShardCounts(RowCounts):
    """A shard's counts; its ``skipped`` rows are those an earlier attempt of the same shard journaled."""

    def run_counts(self) -> RowCounts:
        """The counts as the run sees them: rows an earlier attempt of this shard rendered are rendered."""
        return RowCounts(rows=self.rows, ok=self.ok + self.skipped, failed=self.failed, images=self.images,
                         seconds=self.seconds)


class ShardStats(ShardCounts):
    """What a shard task did (its counts, ``RowCounts``); ``problem`` is set when the task itself failed (after
    its retries)."""

    name: str
    spec: str
    build_seconds: float = 0.0
    failures: list[FailedRow] = []
    worker: str = ""  # where it ran (host:pid, or a Dask worker's address)
    pipeline_problem: Problem | None = None  # the spec's pipeline cannot be built: its other shards fail alike
    batch_ends: list[float] = []  # seconds from the shard's start to the end of each pipeline call (estimates)
    batch_rows: list[int] = []  # rows of each of those calls
    started_at: float = 0.0  # wall-clock times (time.time())
    finished_at: float = 0.0
    problem: Problem | None = None


class ShardProgress(ShardCounts):
    """What a running shard reports after each batch and when it changes phase: its counts so far in this
    attempt, and the rows that failed since its previous report. Plain data, so that it can cross from a Dask
    worker's process to the flow's."""

    shard: str
    spec: str
    phase: str  # "loading pipeline" | "rendering"
    new_failures: list[FailedRow] = []


ProgressCallback = Callable[[ShardProgress], None]


class _Reporter:
    """Sends ShardProgress to the callback, if any; a callback that raises never fails the shard."""

    def __init__(self, stats: ShardStats, writer: ShardWriter, callback: ProgressCallback | None):
        self.stats, self.writer, self.callback = stats, writer, callback
        self.sent_failures = 0

    def __call__(self, phase: str) -> None:
        if self.callback is None:
            return
        writer = self.writer
        new = writer.failures[self.sent_failures:]  # appended by writer threads; a slice is one atomic read
        self.sent_failures += len(new)
        written = writer.counts
        report = ShardProgress(shard=self.stats.name, spec=self.stats.spec, rows=self.stats.rows, phase=phase,
                               ok=written.ok, failed=written.failed, skipped=self.stats.skipped, images=written.images,
                               new_failures=new)
        try:
            self.callback(report)
        except Exception:  # noqa: BLE001 - progress is for people; the render goes on without it
            log.warning("progress report of %s failed", self.stats.name, exc_info=True)


def _batches(loaded, jobs: list[Job], inputs: dict[str, RowInputs], batch_size: int):
    """Group a window's rows by call compatibility (first-seen order), then cut groups to batch_size, or to the
    smaller size that fits in free GPU memory or that an out-of-memory taught the pipeline for that shape."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(batch_key(job, inputs[job.id]), []).append(job)
    for group in groups.values():
        size = loaded.batch_size(group[0], batch_size, inputs[group[0].id].images)  # memory, OOM splits, the cap
        for start in range(0, len(group), size):
            yield group[start:start + size]


# Pipelines that failed to build in this process, per run: the run's other shards of the spec fail at once.
_BROKEN: dict[tuple[str, str], Problem] = {}


def _build(shard: ShardPlan, settings: RunSettings, redact):
    """The shard's pipeline, or the Problem why it cannot be built. A transient storage error raises instead,
    so that the task is retried."""
    broken = _BROKEN.get((settings.run_id, shard.spec.fingerprint()))
    if broken is not None:
        return broken
    try:
        return PIPELINES.get(shard.spec, settings.options.models)
    except Exception as exc:  # noqa: BLE001 - a spec that cannot load fails its rows, with the reason
        if isinstance(exc, TransientStorageError) or is_transient(exc):
            raise
        problem = Problem("pipeline", redact(str(exc))) if isinstance(exc, ModelFileError) else \
            describe_exception("pipeline", exc, redact)
        log.warning("cannot build the pipeline of spec %s: %s", shard.spec.name, problem.reason)
        log.debug("the pipeline of spec %s failed to build", shard.spec.name, exc_info=True)  # the traceback
        _BROKEN[(settings.run_id, shard.spec.fingerprint())] = problem
        return problem


def run_shard(shard: ShardPlan, settings: RunSettings, progress: ProgressCallback | None = None) -> ShardStats:
    """Render one shard; every row ends journaled as ``ok`` or ``failed`` with a reason. Free of Prefect: the
    Prefect task (``tasks.prefect_tasks.render_shard``) and ``--dry-run`` call it alike.

    Args:
        shard: the rows to render (one spec, sorted by call group) and their keys.
        settings: the run's id, output folder and options.
        progress: when given, receives a ``ShardProgress`` as the pipeline loads and after every batch (in this
            thread); an exception it raises is logged, never fails the shard.

    Returns:
        What the shard did (``ShardStats``: its counts, failed rows, batch timings); rows an earlier attempt of
        the same shard journaled ``ok`` are ``skipped``.
    """
    started = time.perf_counter()
    storage = settings.storage()
    stats = ShardStats(name=shard.name, spec=shard.spec.name, rows=len(shard.jobs))
    done = MetadataStore(storage, settings.out).journaled_ids(settings.run_id, f"{shard.name}-", "ok")
    jobs = [job for job in shard.jobs if job.id not in done]
    stats.skipped = len(shard.jobs) - len(jobs)
    writer = ShardWriter(storage, settings.out, settings.run_id, shard.name, shard.spec, shard.row_keys,
                         layout=shard.layout, manifests=shard.manifests)
    fetcher = InputFetcher(storage, jobs, {shard.spec.name: shard.spec}, out=settings.out)
    report = _Reporter(stats, writer, progress)
    try:
        report("loading pipeline")
        built = time.perf_counter()
        loaded = _build(shard, settings, storage.redact)
        stats.build_seconds = time.perf_counter() - built
        if isinstance(loaded, Problem):
            stats.pipeline_problem = loaded
            for job in jobs:
                writer.fail(job, loaded)
            return stats
        loaded.compiler.plan(resolve_setting(settings.options.compile, shard.spec.compile),
                             Counter(job.call_group() for job in jobs))
        batch_size = settings.options.batch_size
        window = max(batch_size * 2, 2)
        windows = [jobs[i:i + window] for i in range(0, len(jobs), window)]
        if windows:
            fetcher.prefetch(windows[0])
        for number, rows in enumerate(windows):
            if number + 1 < len(windows):
                fetcher.prefetch(windows[number + 1])
            # in parts that end early when the window's decoded inputs fill the fetcher's pixel budget
            for ready in fetcher.take(rows, lambda job, exc: writer.fail(job, *exc.problems)):
                report("rendering")
                batchable = [job for job in rows if job.id in ready]
                for batch in _batches(loaded, batchable, ready, batch_size):
                    for rendered in render_rows(loaded, batch, [ready[job.id] for job in batch], storage.redact,
                                                shard.spec.score):
                        storage.check_lease()  # a run that lost its lease (paused past its ttl) stops here
                        writer.submit(rendered)
                    stats.batch_ends.append(time.perf_counter() - started)
                    stats.batch_rows.append(len(batch))
                    writer.flush()
                    report("rendering")
                del ready  # the part's images go before the next part is fetched
    finally:
        fetcher.close()
        writer.close()
        stats.ok, stats.failed, stats.images = writer.counts.ok, writer.counts.failed, writer.counts.images
        stats.failures = writer.failures
        stats.seconds = time.perf_counter() - started
    return stats
