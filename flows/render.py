"""The render flow: manifest -> rows -> keys -> shards -> render tasks -> metadata + gallery.

    from ipaflow.flows.render import render_manifest
    from ipaflow.specs.options import RenderOptions
    summary = render_manifest("manifest.parquet", out="s3://bucket/renders", options=RenderOptions(batch_size=8))

Rows whose key (spec, parameters, inputs) matches an ``ok`` record with its output present are skipped; bad
rows are recorded as ``failed`` with the column at fault and never reach a worker; the rest are cut into
shards and submitted to the task runner the options name (threads with one GPU worker by default, or a Dask
cluster). ``{date}`` and ``{datetime}`` in ``out`` are filled from the run's scheduled (or start) time, so a
scheduled deployment of this same flow writes each night to a folder of its own.
"""

from __future__ import annotations

import os
import posixpath
import queue
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.states import State
from pydantic import Field

from ipaflow.core.problems import FailedRow, Problem, RowFailed
from ipaflow.core.storage import Storage, is_local, join
from ipaflow.flows.monitoring import FINISHING, TICK_SECONDS, RunMonitor
from ipaflow.flows.previews import preview_uris, read_thumbnails, write_contact_sheet
from ipaflow.flows.runners import gpu_routing, make_task_runner
from ipaflow.specs.manifest import open_manifest
from ipaflow.specs.options import RenderOptions
from ipaflow.specs.outputs import output_paths
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import Job, resolve_manifest
from ipaflow.specs.spec import Spec
from ipaflow.tasks.gallery import write_gallery
from ipaflow.tasks.keys import identify_inputs, row_key
from ipaflow.tasks.metadata import MetadataStore, make_record
from ipaflow.tasks.prefect_tasks import render_shard
from ipaflow.tasks.shards import ShardPlan, plan_shards
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
    """``<deployment>-<date>`` for a deployment's runs, else ``<manifest>-<time>``."""
    from prefect.runtime import deployment, flow_run

    if deployment.name:
        return f"{deployment.name}-{_run_time():%Y-%m-%d}"
    return f"{manifest_name(flow_run.parameters.get('manifest', 'manifest'))}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def _existing_outputs(storage: Storage, out: str) -> set[str]:
    """Relative paths of the outputs present now (one listing per folder)."""
    found = set()
    for folder in ("images", "videos"):
        found.update(f"{folder}/{rel}" for rel in storage.list_files(join(out, folder)))
    return found


def _is_done(record: dict | None, key: str, job: Job, spec: Spec, present: set[str]) -> bool:
    return (
        record is not None
        and record["status"] == "ok"
        and record["key"] == key
        and all(path in present for path in output_paths(job, spec))
    )


@flow(name="ipaflow-render", flow_run_name=_run_name, log_prints=False, validate_parameters=True)
def render_manifest(
    manifest: Annotated[str, Field(min_length=1, description="manifest URI or path (.parquet, .csv, .jsonl)")],
    out: Annotated[str, Field(min_length=1, description="output URI or path; {date} and {datetime} are filled in")],
    options: RenderOptions = RenderOptions(),
) -> State:
    """Render every row of ``manifest`` into ``out``; returns the run summary (a dict).

    ``options`` (``ipaflow.specs.options.RenderOptions``, or a dict of its fields) are the command line's
    render options; ``storage_options`` in it is kept secret (the Prefect API stores it masked). The flow run
    ends "Completed", "Completed with failures" (rows failed; the state's message counts them), or "Failed"
    once ``max_failures`` rows failed (calling the flow then raises ``TooManyFailures``, which carries the
    summary).
    """
    logger = get_run_logger()
    out = absolute_uri(fill_template(out, _run_time()))
    run_id = new_run_id()
    settings = RunSettings(run_id=run_id, out=out, options=options)
    storage = settings.storage()
    name = manifest_name(manifest)
    monitor = RunMonitor(name=name, redact=storage.redact)
    monitor.start()
    storage.clean_staging()  # partial files of a run that was killed mid-write
    registry = SpecRegistry(options.specs, storage=storage)
    opened = open_manifest(manifest, storage=storage)
    metadata = MetadataStore(storage, out)
    if recovered := metadata.compact():  # journals of runs that died fold in first
        logger.info("folded %d journal file(s) left by an earlier run", recovered)

    plan = plan_rows(opened, registry, storage, metadata, options.limit, options.overwrite)
    monitor.tag_flow_run(["ipaflow", f"manifest:{name}", *sorted({f"spec:{spec}" for spec in plan.specs})])
    recorded = _journal_rejected(plan, metadata, monitor, run_id)
    logger.info("%d rows: %d to render, %d already done, %d failed validation",
                plan.total, len(plan.todo), plan.skipped, len(plan.rejected))
    monitor.planned(plan.total, plan.skipped)
    monitor.tick(force=True)  # rows that failed validation show at once

    shards = plan_shards(plan.todo, plan.specs, plan.keys, options.batch_size, options.shard_size)
    stats = _run_shards(shards, settings, monitor)
    _journal_unfinished(shards, stats, plan.keys, metadata, monitor, run_id)

    monitor.set_phase(FINISHING)
    metadata.compact()
    all_records = list(metadata.load().values())
    this_run = [r for r in all_records if r["run_id"] == run_id]
    sheet_thumbs, spec_thumbs = read_thumbnails(storage, all_records, logger.warning)
    contact_sheet = write_contact_sheet(storage, out, sheet_thumbs)
    times = monitor.stage_times()
    rendered = sum(1 for r in this_run if r["status"] == "ok")
    summary = {
        "run_id": run_id,
        "manifest": storage.redact(manifest),
        "out": storage.redact(out),
        "gallery": storage.redact(write_gallery(storage, out, all_records, contact_sheet)),
        "contact_sheet": contact_sheet and storage.redact(contact_sheet),
        "rows": plan.total,
        "rendered": rendered,
        "skipped": plan.skipped,
        # rows without a record of their own (an invalid id, or a repeated one) count too
        "failed": sum(1 for r in this_run if r["status"] == "failed") + len(plan.rejected) - recorded,
        "images": sum(len(r["outputs"]) for r in this_run if r["status"] == "ok"),
        "seconds": times.pop("seconds"),  # from the command's start when a command runs the flow
        "times": {**times, "render_rate": round(rendered / times["rendering"], 4) if times["rendering"] else None},
        "failures": [{"id": f.row, "spec": f.spec, "error": f.error} for f in monitor.failures],
        "shards": monitor.shards,
        "live_updates": {"shard_reports": monitor.reports, "api_writes": monitor.api_writes,
                         "api_seconds": round(monitor.api_seconds, 3)},
    }
    logger.info("done: %d rendered, %d skipped, %d failed in %.1fs; gallery %s", summary["rendered"],
                summary["skipped"], summary["failed"], summary["seconds"], summary["gallery"])
    return monitor.finish(summary, preview_uris(spec_thumbs), options.max_failures)


@dataclass
class RowPlan:
    """What a run does with each manifest row: render it, skip it (done), or reject it (with the reason)."""

    todo: list[Job]
    keys: dict[str, str]  # id -> key, for every row that can run
    specs: dict[str, Spec]
    skipped: int
    rejected: list[FailedRow]

    @property
    def total(self) -> int:
        return len(self.todo) + self.skipped + len(self.rejected)


def plan_rows(opened, registry: SpecRegistry, storage: Storage, metadata: MetadataStore, limit: int | None,
              overwrite: bool) -> RowPlan:
    """Resolve and key every row; rows whose key matches an ``ok`` record with its outputs present are done."""
    jobs, rejected = resolve_manifest(opened, registry)
    if limit is not None:
        jobs = [job for job in jobs if job.index < limit]
        rejected = [failed for failed in rejected if failed.index < limit]
    specs_used = {job.spec: registry.get(job.spec) for job in jobs}
    identities = identify_inputs(storage, jobs)
    keys: dict[str, str] = {}
    runnable: list[Job] = []
    for job in jobs:
        try:
            keys[job.id] = row_key(job, specs_used[job.spec], identities)
            runnable.append(job)
        except RowFailed as exc:  # a missing or unreadable input
            rejected.append(FailedRow(row=job.id, problems=exc.problems, index=job.index, spec=job.spec))
    previous = metadata.load()
    present = _existing_outputs(storage, out=metadata.out) if previous and not overwrite else set()
    todo = [job for job in runnable
            if overwrite or not _is_done(previous.get(job.id), keys[job.id], job, specs_used[job.spec], present)]
    rejected.sort(key=lambda failed: failed.index)
    return RowPlan(todo=todo, keys=keys, specs=specs_used, skipped=len(runnable) - len(todo), rejected=rejected)


def _journal_rejected(plan: RowPlan, metadata: MetadataStore, monitor: RunMonitor, run_id: str) -> int:
    """Record the rows that failed before rendering; returns how many records (one per usable id)."""
    records = {}
    for failed in plan.rejected:
        monitor.row_failed(failed, "planning")
        if not failed.row.startswith("#") and failed.row not in records:
            records[failed.row] = make_record(job_id=failed.row, spec=failed.spec or "", status="failed",
                                              run_id=run_id, error=failed.error, redact=metadata.storage.redact)
    metadata.journal(run_id, "invalid-rows", list(records.values()))
    monitor.close_log("planning")
    return len(records)


def _journal_unfinished(shards: list[ShardPlan], stats: list[ShardStats], keys: dict[str, str],
                        metadata: MetadataStore, monitor: RunMonitor, run_id: str) -> None:
    """Rows of shard tasks that failed after their retries, or that never started, fail with the reason."""
    finished = metadata.journaled_ids(run_id)
    problems = {s.name: s.problem for s in stats if s.problem is not None}
    stopped = Problem("not rendered", "the run stopped early (--max-failures)")
    records = []
    for shard in shards:
        for job in shard.jobs:
            if job.id not in finished:
                failed = FailedRow(row=job.id, problems=(problems.get(shard.name, stopped),), index=job.index,
                                   spec=job.spec)
                monitor.row_failed(failed, shard.name)
                records.append(make_record(job_id=job.id, spec=job.spec, status="failed", run_id=run_id,
                                           error=failed.error, seed=job.seed, params=job.params, key=keys[job.id],
                                           extra=job.extra, redact=metadata.storage.redact))
    metadata.journal(run_id, "unfinished-rows", records)
    for shard in shards:
        monitor.close_log(shard.name)


def _run_shards(shards: list[ShardPlan], settings: RunSettings, monitor: RunMonitor) -> list[ShardStats]:
    """Submit shards to the options' task runner, keeping its worker count busy; stop submitting once
    ``max_failures`` rows failed. Between completions the monitor shows the running shards' reports."""
    logger = get_run_logger()
    max_failures = settings.options.max_failures
    pending = deque(shards)
    running: dict[Any, ShardPlan] = {}
    finished: queue.Queue = queue.Queue()
    results: list[ShardStats] = []
    runner, max_in_flight = make_task_runner(settings.options)
    # no tags on task runs: see RunMonitor.tag_flow_run
    with runner, gpu_routing(runner), monitor.listening(runner, settings.run_id):
        while pending or running:
            while pending and len(running) < max_in_flight and not _too_many(monitor, max_failures):
                shard = pending.popleft()
                future = runner.submit(render_shard, parameters={"shard": shard, "settings": settings})
                running[future] = shard
                future.add_done_callback(finished.put)
            if not running:
                break
            try:
                future = finished.get(timeout=TICK_SECONDS)
            except queue.Empty:
                monitor.tick()
                continue
            shard = running.pop(future)
            try:
                stats = future.result().stats
            except Exception as exc:  # noqa: BLE001 - the task failed after its retries
                problem = Problem("worker", monitor.redact(f"{type(exc).__name__}: {exc}"))
                logger.error("%s failed: %s", shard.name, problem.reason)
                monitor.shard_lost(shard.name)
                results.append(ShardStats(name=shard.name, spec=shard.spec.name, rows=len(shard.jobs), problem=problem))
                continue
            results.append(stats)
            monitor.shard_finished(stats)
    if pending:
        logger.warning("stopped after %d failed rows (--max-failures); %d shards not started", monitor.failed, len(pending))
    return results


def _too_many(monitor: RunMonitor, max_failures: int | None) -> bool:
    return max_failures is not None and monitor.failed_so_far >= max_failures
