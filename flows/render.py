"""The render flow: manifest -> jobs -> keys -> shards -> render tasks -> metadata + gallery.

    from flows.render import render_manifest
    summary = render_manifest("manifest.parquet", out="s3://bucket/renders")

Rows whose key (spec, parameters, inputs) matches an ``ok`` record with its output present are skipped; bad
rows are recorded as ``failed`` with the column at fault and never reach a worker; the rest are cut into
shards and mapped over the task runner (threads with one GPU worker by default, or a Dask cluster).
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from pydantic import Field, SecretStr

from flows.monitoring import RunMonitor, write_contact_sheet
from flows.runners import gpu_routing
from specs.jobs import Job, resolve_manifest
from specs.manifest import open_manifest
from specs.registry import SpecRegistry
from specs.spec import Spec
from tasks.inputs import InputError
from tasks.gallery import write_gallery
from tasks.keys import identify_inputs, row_key
from tasks.metadata import MetadataStore, make_record
from tasks.shards import DEFAULT_BATCH_SIZE, ShardPlan, plan_shards
from tasks.prefect_tasks import render_shard
from tasks.storage import Storage, is_local, join, redact
from tasks.worker import RunSettings
from tasks.writers import output_paths

PositiveInt = Annotated[int, Field(ge=1)]


def absolute_uri(uri: str) -> str:
    """Local paths made absolute (records name outputs unambiguously); remote URIs unchanged."""
    if uri.startswith("file://"):
        return uri
    return os.path.abspath(os.path.expanduser(uri)) if is_local(uri) else uri.rstrip("/")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def _existing_outputs(storage: Storage, out: str) -> set[str]:
    """Relative paths of the outputs present now (one listing per folder)."""
    found = set()
    for folder in ("images", "videos"):
        found.update(f"{folder}/{rel}" for rel in storage.list_files(join(out, folder)))
    return found


def _is_done(record: dict | None, key: str, job: Job, spec, present: set[str]) -> bool:
    return (
        record is not None
        and record["status"] == "ok"
        and record["key"] == key
        and all(path in present for path in output_paths(job, spec))
    )


def _run_name() -> str:
    from prefect.runtime import flow_run

    manifest = flow_run.parameters.get("manifest", "manifest")
    stem = posixpath.basename(str(manifest)).rsplit(".", 1)[0] or "manifest"
    return f"{stem}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


@flow(name="ipaflow-render", flow_run_name=_run_name, log_prints=False, validate_parameters=True)
def render_manifest(
    manifest: str,
    out: str,
    specs: list[str] | None = None,
    models: str | None = None,
    batch_size: PositiveInt = DEFAULT_BATCH_SIZE,
    shard_size: PositiveInt | None = None,
    storage_options: SecretStr | None = None,
    overwrite: bool = False,
    max_failures: PositiveInt | None = None,
    limit: PositiveInt | None = None,
    max_in_flight: PositiveInt = 2,
) -> dict[str, Any]:
    """Render every row of ``manifest`` into ``out``; returns the run summary.

    ``storage_options`` is a JSON string of fsspec keyword arguments, kept secret (the Prefect API stores
    it masked). ``max_in_flight`` bounds the shard tasks submitted at once (set it to the worker count).
    """
    logger = get_run_logger()
    started = time.perf_counter()
    out = absolute_uri(out)
    run_id = new_run_id()
    settings = RunSettings(run_id=run_id, out=out, batch_size=batch_size, models=models, storage_options=storage_options)
    storage = settings.storage()
    storage.clean_staging()  # partial files of a run that was killed mid-write
    options = json.loads(storage_options.get_secret_value()) if storage_options else None
    registry = SpecRegistry(specs or [], storage_options=options)
    opened = open_manifest(manifest, storage_options=options)
    metadata = MetadataStore(storage, out)
    if recovered := metadata.compact():  # journals of runs that died fold in first
        logger.info("folded %d journal file(s) left by an earlier run", recovered)

    plan = plan_rows(opened, registry, storage, metadata, limit, overwrite)
    name = posixpath.basename(manifest).rsplit(".", 1)[0] or "manifest"
    monitor = RunMonitor(name=name, total=plan.total)
    monitor.start()
    monitor.tag_flow_run(["ipaflow", f"manifest:{name}", *sorted({f"spec:{spec}" for spec in plan.specs})])
    monitor.done = monitor.ok = plan.skipped
    recorded = _journal_rejected(plan, metadata, monitor, run_id)
    logger.info("%d rows: %d to render, %d already done, %d failed validation",
                plan.total, len(plan.todo), plan.skipped, len(plan.rejected))

    shards = plan_shards(plan.todo, plan.specs, plan.keys, batch_size, shard_size)
    stats = _run_shards(shards, settings, monitor, max_failures, max_in_flight)
    _journal_unfinished(shards, stats, plan.keys, metadata, monitor, run_id)

    metadata.compact()
    all_records = list(metadata.load().values())
    this_run = [r for r in all_records if r["run_id"] == run_id]
    contact_sheet = write_contact_sheet(storage, out, all_records)
    summary = {
        "run_id": run_id,
        "manifest": manifest,
        "out": out,
        "gallery": write_gallery(storage, out, all_records, contact_sheet),
        "contact_sheet": contact_sheet,
        "rows": plan.total,
        "rendered": sum(1 for r in this_run if r["status"] == "ok"),
        "skipped": plan.skipped,
        # rows without a record of their own (an invalid id, or a repeated one) count too
        "failed": sum(1 for r in this_run if r["status"] == "failed") + len(plan.rejected) - recorded,
        "images": sum(len(r["outputs"]) for r in this_run if r["status"] == "ok"),
        "seconds": round(time.perf_counter() - started, 3),
        "failures": [{"id": i, "spec": s, "error": e} for i, s, e in monitor.failures],
        "shards": monitor.shards,
    }
    monitor.finish(summary)
    logger.info("done: %d rendered, %d skipped, %d failed in %.1fs; gallery %s", summary["rendered"],
                summary["skipped"], summary["failed"], summary["seconds"], redact(summary["gallery"]))
    return summary


@dataclass
class RowPlan:
    """What a run does with each manifest row: render it, skip it (done), or reject it (with the reason)."""

    todo: list[Job]
    keys: dict[str, str]  # id -> key, for every row that can run
    specs: dict[str, Spec]
    skipped: int
    rejected: dict[int, tuple[str, str, str]]  # manifest index -> (id, spec, reason)

    @property
    def total(self) -> int:
        return len(self.todo) + self.skipped + len(self.rejected)


def plan_rows(opened, registry: SpecRegistry, storage: Storage, metadata: MetadataStore, limit: int | None,
              overwrite: bool) -> RowPlan:
    """Resolve and key every row; rows whose key matches an ``ok`` record with its outputs present are done."""
    jobs, bad = resolve_manifest(opened, registry)
    if limit is not None:
        jobs = [job for job in jobs if job.index < limit]
        bad = [(index, problems) for index, problems in bad if index < limit]
    rejected = {index: (problems[0].row, "", "; ".join(f"{p.column}: {p.reason}" for p in problems))
                for index, problems in bad}  # every problem, as validate lists them
    specs_used = {job.spec: registry.get(job.spec) for job in jobs}
    identities = identify_inputs(storage, jobs)
    keys: dict[str, str] = {}
    runnable: list[Job] = []
    for job in jobs:
        try:
            keys[job.id] = row_key(job, specs_used[job.spec], identities)
            runnable.append(job)
        except InputError as exc:  # a missing or unreadable input
            rejected[job.index] = (job.id, job.spec, f"{exc.column}: {exc.reason}")
    previous = metadata.load()
    present = _existing_outputs(storage, out=metadata.out) if previous and not overwrite else set()
    todo = [job for job in runnable
            if overwrite or not _is_done(previous.get(job.id), keys[job.id], job, specs_used[job.spec], present)]
    return RowPlan(todo=todo, keys=keys, specs=specs_used, skipped=len(runnable) - len(todo), rejected=rejected)


def _journal_rejected(plan: RowPlan, metadata: MetadataStore, monitor: RunMonitor, run_id: str) -> int:
    """Record the rows that failed before rendering; returns how many records (one per usable id)."""
    records = {}
    for index, (row_id, spec, reason) in sorted(plan.rejected.items()):
        monitor.row_failed(row_id, spec or "-", reason)
        if not row_id.startswith("#") and row_id not in records:
            records[row_id] = make_record(job_id=row_id, spec=spec, status="failed", run_id=run_id, error=reason)
    metadata.journal(run_id, "invalid-rows", list(records.values()))
    return len(records)


def _journal_unfinished(shards: list[ShardPlan], stats: list[dict], keys: dict[str, str], metadata: MetadataStore,
                        monitor: RunMonitor, run_id: str) -> None:
    """Rows of shard tasks that failed after their retries, or that never started, fail with the reason."""
    finished = metadata.journaled_ids(run_id)
    reasons = {s["name"]: s["error"] for s in stats if "error" in s}
    records = []
    for shard in shards:
        for job in shard.jobs:
            if job.id not in finished:
                reason = reasons.get(shard.name, "not rendered: the run stopped early (--max-failures)")
                monitor.row_failed(job.id, job.spec, reason)
                records.append(make_record(job_id=job.id, spec=job.spec, status="failed", run_id=run_id,
                                           error=reason, seed=job.seed, params=job.params, key=keys[job.id],
                                           extra=job.extra))
    metadata.journal(run_id, "unfinished-rows", records)


def _run_shards(shards: list[ShardPlan], settings: RunSettings, monitor: RunMonitor, max_failures: int | None,
                max_in_flight: int) -> list[dict]:
    """Submit shards with at most ``max_in_flight`` running; stop submitting once ``max_failures`` is hit."""
    logger = get_run_logger()
    pending = deque(shards)
    running: dict[Any, ShardPlan] = {}
    results: list[dict] = []
    with gpu_routing():  # no tags() here: see RunMonitor.tag_flow_run
        while pending or running:
            while pending and len(running) < max_in_flight and not _too_many(monitor, max_failures):
                shard = pending.popleft()
                running[render_shard.submit(shard, settings)] = shard
            if not running:
                break
            future = next(as_completed(list(running)))
            shard = running.pop(future)
            try:
                stats = future.result()
            except Exception as exc:  # noqa: BLE001 - the task failed after its retries
                logger.error("%s failed: %s", shard.name, redact(exc))
                stats = {"name": shard.name, "error": redact(f"worker: {type(exc).__name__}: {exc}")[:500]}
                results.append(stats)
                continue
            results.append(stats)
            monitor.shard_finished(stats)
    if pending:
        logger.warning("stopped after %d failed rows (--max-failures); %d shards not started", monitor.failed, len(pending))
    return results


def _too_many(monitor: RunMonitor, max_failures: int | None) -> bool:
    return max_failures is not None and monitor.failed >= max_failures
