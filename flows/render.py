"""The render flow: manifest -> rows -> keys -> shards -> render tasks -> metadata + gallery, streamed.

    from ipaflow.flows.render import render_manifest
    from ipaflow.specs.options import RenderOptions
    summary = render_manifest("manifest.parquet", out="s3://bucket/renders", options=RenderOptions(batch_size=8))

The manifest streams (``flows.plan.RowPlanner``): rows whose key (spec, parameters, inputs) matches an ``ok``
record with its outputs present are skipped; bad rows are recorded as ``failed`` with the column at fault and
never reach a worker; the rest are cut into shards as they come and submitted to the task runner the options
name (threads with one GPU worker by default, or a Dask
cluster). ``{date}`` and ``{datetime}`` in ``out`` are filled from the run's scheduled (or start) time, so a
scheduled deployment of this same flow writes each night to a folder of its own.
"""

from __future__ import annotations

import functools
import os
import posixpath
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.states import State
from pydantic import Field

from ipaflow.core import thread_logs
from ipaflow.core.lease import LeaseLost, OutputLease
from ipaflow.core.outages import StorageUnreachable
from ipaflow.core.problems import Problem
from ipaflow.core.storage import Storage, is_local, is_out_unwritable
from ipaflow.flows.monitoring import TICK_SECONDS, RunMonitor, mark_crashed
from ipaflow.flows.open_run import OpenedRun, OutputRecords, open_run, scan_records
from ipaflow.flows.plan import RowPlanner
from ipaflow.flows.previews import preview_uris, read_thumbnails, write_contact_sheet
from ipaflow.flows.run_counter import FINISHING
from ipaflow.flows.runners import gpu_routing, make_task_runner
from ipaflow.specs.options import RenderOptions
from ipaflow.tasks.card import write_card
from ipaflow.tasks.containers import containers_of, drop_members, drop_orphans
from ipaflow.tasks.gallery import GallerySample, write_gallery
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.metadata_schema import renamed_columns
from ipaflow.tasks.prefect_tasks import render_shard
from ipaflow.tasks.shards import ShardPlan
from ipaflow.tasks.worker import RunSettings, ShardStats


def absolute_uri(uri: str) -> str:
    """Local paths made absolute (records name outputs unambiguously); remote URIs unchanged."""
    if uri.startswith("file://"):
        return uri
    return os.path.abspath(os.path.expanduser(uri)) if is_local(uri) else uri.rstrip("/")


def fill_template(template: str, when: datetime) -> str:
    """``{date}`` (YYYY-MM-DD) and ``{datetime}`` (YYYYMMDDTHHMMSS) filled in; nothing else (no str.format on
    user text)."""
    return template.replace("{date}", when.strftime("%Y-%m-%d")).replace("{datetime}", when.strftime("%Y%m%dT%H%M%S"))


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def manifest_name(manifest: str) -> str:
    return posixpath.basename(str(manifest).split("?", 1)[0]).rsplit(".", 1)[0] or "manifest"


def _run_time() -> datetime:
    """The run's scheduled start (a deployment's run), else now."""
    from prefect.runtime import flow_run

    return flow_run.scheduled_start_time or datetime.now(timezone.utc)


def _run_name() -> str:
    """``<deployment>-<scheduled time>`` (to the minute: one name per scheduled run) for a deployment's runs,
    else ``<manifest>-<time>``."""
    from prefect.runtime import deployment, flow_run

    if deployment.name:
        return f"{deployment.name}-{_run_time():%Y-%m-%d-%H%M}"
    return f"{manifest_name(flow_run.parameters.get('manifest', 'manifest'))}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


# The lease the flow body runs under, for its RunSettings; reached through the two functions below only, so that
# the flow's functions, pickled by value for Dask workers, never refer to the ContextVar itself (not picklable).
_LEASE: ContextVar[OutputLease | None] = ContextVar("ipaflow_lease", default=None)


@contextmanager
def _running_under(lease: OutputLease) -> Iterator[None]:
    held = _LEASE.set(lease)
    try:
        yield
    finally:
        _LEASE.reset(held)


def _current_lease() -> OutputLease | None:
    return _LEASE.get()


def _holding_output_lease(body):
    """The flow body runs holding the lease on its ``--out`` (ipaflow.core.lease), taken before anything is
    written there: a second run into the same folder is refused (OutputInUse), an unusable folder said in one
    line (OutputUnusable). A dead run's lease taken over: that run, still Running in Prefect, is marked Crashed
    (``monitoring.mark_crashed``). The body gets ``out`` already resolved, and the lease (``_current_lease``): its token
    fences every write of the run (``ipaflow.core.lease.FencedStorage``)."""

    @functools.wraps(body)
    def run(manifest: str, out: str, options: RenderOptions = RenderOptions()) -> State:
        from prefect.runtime import flow_run

        out = absolute_uri(fill_template(out, _run_time()))
        options = options.resolved()  # the environment's models folder and storage options, for every worker
        storage = Storage(options=options.storage_options_dict())
        try:
            with thread_logs.for_run(flow_run.id), OutputLease(storage, out, run=flow_run.name or "",
                                                               flow_run=flow_run.id or "") as lease:
                if lease.taken_over is not None and lease.taken_over.flow_run:
                    mark_crashed(lease.taken_over.flow_run, f"{lease.taken_over.run or 'the run'} died without "
                                 f"a word; run {flow_run.name} took over its --out")
                with _running_under(lease):
                    return body(manifest, out, options)
        except StorageUnreachable as exc:  # said of --out (the flow run's state and the command's one line)
            raise exc.at(storage.redact(out)) from exc

    return run


@flow(name="ipaflow-render", flow_run_name=_run_name, log_prints=False, validate_parameters=True)
@_holding_output_lease
def render_manifest(
    manifest: Annotated[str, Field(min_length=1, description="manifest URI or path (.parquet, .csv, .jsonl)")],
    out: Annotated[str, Field(min_length=1, description="output URI or path; {date} and {datetime} are filled in")],
    options: RenderOptions = RenderOptions(),
) -> State:
    """Render every row of ``manifest`` into ``out``.

    Args:
        manifest: the manifest's URI or path (Parquet, CSV, JSON Lines; a folder, prefix or glob of them).
        out: the output folder's URI or path; ``{date}`` and ``{datetime}`` are filled from the run's
            scheduled (or start) time.
        options: the command line's render options (``ipaflow.specs.options.RenderOptions``, or a dict of its
            fields); ``storage_options`` in it is kept secret (the Prefect API stores it masked).

    Returns:
        The run summary (``ipaflow.flows.summary.RunSummary``). The flow run ends "Completed", "Completed with
        failures" (rows failed; the state's message counts them), or "Failed" once ``max_failures`` rows
        failed: calling the flow then raises ``TooManyFailures``, which carries the summary.

    Raises:
        OutputInUse: another run holds ``out``.
        LeaseLost: another run took ``out`` over while this one was paused past the lease's ttl; this one
            stopped before writing again.
        ManifestError, SpecError: the manifest or a spec folder is unusable.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    run_id = new_run_id()
    lease = _current_lease()
    settings = RunSettings(run_id=run_id, out=out, options=options, lease_token=lease.token if lease else 0,
                           lease_holder=lease.id if lease else "")
    storage = settings.storage()
    name = manifest_name(manifest)
    monitor = RunMonitor(name=name, redact=storage.redact)
    monitor.start()
    storage.clean_staging()  # partial files of a run that was killed mid-write
    run = open_run(absolute_uri(manifest), options, storage=storage)  # records name the manifest file absolute
    monitor.place = run.manifest.where  # failed rows named by file and row in a folder manifest
    for line in renamed_columns(run.passthrough):
        logger.warning("manifest: %s", line)
    metadata = MetadataStore(storage, out)
    records = _records_state(run, metadata, run_id, logger)
    census = run.census
    monitor.planned(census.rows)
    monitor.tag_flow_run(["ipaflow", f"manifest:{name}", *sorted({f"spec:{spec}" for spec in census.specs})])
    planner = RowPlanner(run, records, metadata, run_id, monitor)
    del records
    try:
        stats = _run_shards(planner, settings, monitor, started)
        planner.flush()
        monitor.close_log("planning")
        counts = monitor.counts
        logger.info("%d rows: %d rendered or tried, %d already done (%d records updated), %d failed before "
                    "rendering", planner.rows, sum(s.rows for s in stats), counts.skipped, counts.updated,
                    planner.rejected)
        monitor.set_phase(FINISHING)
        folded = metadata.fold(run_id, planner.records.index, drop_outputs=lambda uris: drop_members(storage, uris),
                               lease_token=settings.lease_token)
        gallery, contact_sheet, previews = _gallery(storage, out, metadata, logger, monitor)
        write_card(storage, out, metadata)
    except (LeaseLost, StorageUnreachable) as exc:  # the rows that are safe: done before, or journaled by a
        # finished shard (an outage met by a worker's write or the fence's read of the lease, not by the tick)
        raise exc.at(exc.where, monitor.counts.ok + monitor.counts.skipped) from exc
    summary = monitor.summary(run_id=run_id, manifest=storage.redact(absolute_uri(manifest)), out=storage.redact(out),
                              gallery=storage.redact(gallery),
                              contact_sheet=contact_sheet and storage.redact(contact_sheet),
                              metadata_bytes_written=folded.bytes_written, first_shard_s=planner.first_shard_s)
    logger.info("done: %d rendered, %d skipped, %d failed in %.1fs; gallery %s", summary.rendered,
                summary.skipped, summary.failed, summary.seconds, summary.gallery)
    return monitor.finish(summary, previews, options.max_failures)


def _records_state(run: OpenedRun, metadata: MetadataStore, run_id: str, logger) -> OutputRecords:
    """The ``--out``'s records as this run plans against them (``flows.open_run.scan_records``), after folding
    in what killed runs left: superseded copies of an interrupted fold dropped, journals and updates folded."""
    records = scan_records(run, metadata)
    if metadata.repair(records.index):
        logger.warning("metadata: dropped superseded copies of records left by an interrupted fold")
        records = scan_records(run, metadata)
    if metadata.journal_files() or metadata.update_files():
        folded = metadata.fold(f"{run_id}-recovered", records.index,
                               drop_outputs=lambda uris: drop_members(run.storage, uris))
        logger.info("folded %d journal file(s) left by an earlier run", folded.files)
        records = scan_records(run, metadata)
    return records


def _gallery(storage: Storage, out: str, metadata: MetadataStore, logger,
             monitor: RunMonitor) -> tuple[str, str | None, dict[str, str]]:
    """``index.html``, the contact sheet and the UI's per-spec previews, from one bounded pass over the records,
    with this run's failed rows that have no record of their own (the monitor's); containers that no record
    points into (an attempt killed after its upload) are removed on the way."""
    sample = GallerySample()
    referenced: set[str] = set()
    for table in metadata.iter_current(GallerySample.COLUMNS):
        sample.add(table)
        referenced.update(containers_of(table))
    drop_orphans(storage, out, referenced)
    sheet_thumbs, spec_thumbs = read_thumbnails(storage, sample.plain_files(), logger.warning)
    contact_sheet = write_contact_sheet(storage, out, sheet_thumbs)
    sample.without_record(monitor.without_record,
                          [line.model_dump() for line in monitor.failures if not line.recorded])
    return write_gallery(storage, out, sample, contact_sheet), contact_sheet, preview_uris(spec_thumbs)


LOOKAHEAD = 8  # shards planned ahead of the running ones: spec affinity picks among them


def _pick(window: deque, last_spec: str | None) -> ShardPlan:
    """The next shard: one of the spec just submitted when there is one (the worker keeps its pipeline), else
    the oldest."""
    for position, shard in enumerate(window):
        if shard.spec.name == last_spec:
            del window[position]
            return shard
    return window.popleft()


def _run_shards(planner: RowPlanner, settings: RunSettings, monitor: RunMonitor, started: float) -> list[ShardStats]:
    """Submit shards to the options' task runner as the planner cuts them, keeping its worker count busy;
    stop submitting once ``max_failures`` rows failed; fail a spec's remaining rows at once when its pipeline
    cannot be built."""
    logger = get_run_logger()
    max_failures = settings.options.max_failures
    shards = planner.shards()
    window: deque[ShardPlan] = deque()
    running: dict[Any, ShardPlan] = {}
    results: list[ShardStats] = []
    exhausted, last_spec = False, None
    stopped = Problem("not rendered", "the run stopped early (--max-failures)")
    runner, max_in_flight = make_task_runner(settings.options)
    # no tags on task runs: see RunMonitor.tag_flow_run
    with runner, gpu_routing(runner), monitor.listening(runner, settings.run_id):
        while True:
            for future in [f for f in running if f.wrapped_future.done()]:
                results.append(_finished(future, running.pop(future), planner, monitor, logger))
            for shard in [s for s in window if s.spec.name in planner.broken]:
                window.remove(shard)
                planner.fail_shard(shard, planner.broken[shard.spec.name])
            too_many = max_failures is not None and monitor.failed_so_far >= max_failures
            if too_many:
                while window:
                    planner.fail_shard(window.popleft(), stopped)
            while window and len(running) < max_in_flight and not too_many:
                shard = _pick(window, last_spec)
                last_spec = shard.spec.name
                running[runner.submit(render_shard, parameters={"shard": shard, "settings": settings})] = shard
                if planner.first_shard_s is None:
                    planner.first_shard_s = round(time.perf_counter() - started, 3)
                    logger.info("first shard submitted %.1fs after the run started", planner.first_shard_s)
            if not exhausted and (len(window) < LOOKAHEAD or too_many):
                try:
                    shard = next(shards)
                except StopIteration:
                    exhausted = True
                    continue
                if shard is None:
                    continue
                if too_many:
                    planner.fail_shard(shard, stopped)
                elif shard.spec.name in planner.broken:
                    planner.fail_shard(shard, planner.broken[shard.spec.name])
                else:
                    window.append(shard)
                continue
            if not running:
                if exhausted and not window:
                    break
                continue
            # wait for one (handled at the top of the loop); meanwhile the monitor shows the shards' reports
            try:
                next(as_completed(list(running), timeout=TICK_SECONDS))
            except TimeoutError:
                pass
            monitor.tick()
            _unless_unreachable(planner.storage, settings.out, monitor)
            planner.storage.check_lease()  # LeaseLost once another run took --out over
    if max_failures is not None and monitor.counts.failed >= max_failures:
        logger.warning("stopped after %d failed rows (--max-failures)", monitor.counts.failed)
    return results


def _unless_unreachable(storage: Storage, out: str, monitor: RunMonitor) -> None:
    """Stop the run once the store of --out has been unreachable past $IPAFLOW_OUTAGE_TIMEOUT (a worker or the
    lease gave up on it): ``StorageUnreachable``, one line and exit status 3, counting the rows that are safe:
    done before this run, or rendered by a shard that finished (a finished shard has journaled its records; a
    running one's rows may not be yet, and are not counted)."""
    if (outage := storage.gave_up(out)) is not None:
        raise outage.at(storage.redact(out), monitor.counts.ok + monitor.counts.skipped)


def _finished(future, shard: ShardPlan, planner: RowPlanner, monitor: RunMonitor, logger) -> ShardStats:
    try:
        stats = future.result().stats
    except Exception as exc:  # noqa: BLE001 - the task failed after its retries
        if is_out_unwritable(exc) or isinstance(exc, LeaseLost):  # every later shard would fail the same way
            raise
        problem = Problem("worker", monitor.redact(f"{type(exc).__name__}: {exc}"))
        logger.error("%s failed: %s", shard.name, problem.reason)
        done = planner.metadata.journaled_ids(planner.run_id, f"{shard.name}-")
        monitor.shard_lost(shard.name, planner.metadata.journaled_ids(planner.run_id, f"{shard.name}-", "ok"), done)
        planner.fail_jobs([job for job in shard.jobs if job.id not in done], shard.row_keys, problem)
        return ShardStats(name=shard.name, spec=shard.spec.name, rows=len(shard.jobs), problem=problem)
    if stats.pipeline_problem is not None and shard.spec.name not in planner.broken:
        planner.broken[shard.spec.name] = stats.pipeline_problem
        logger.error("spec %s: its pipeline cannot be built (%s); its remaining rows fail with that reason",
                     shard.spec.name, stats.pipeline_problem.reason)
    monitor.shard_finished(stats)
    return stats
