"""The Prefect task of ipaflow: a thin wrapper around the shard worker, named per spec and shard.

Its inputs are small (rows as text, URIs, settings); ``NO_CACHE`` because hashing inputs is wasted work here
and results must never be reused across runs (the metadata decides what is done).

Live progress: the worker reports after every batch (``ipaflow.tasks.worker.ShardProgress``). The report
goes to the flow without touching the Prefect API: in the flow's own process (the default thread runner) it
is handed to the receiver the flow registered for its run; in a Dask worker's process it is sent as a Dask
event (``Worker.log_event``) on the run's topic, which reaches the flow's Dask client through the scheduler
on the connection the task already uses. The flow alone writes to the API, at a bounded rate
(``ipaflow.flows.monitoring``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.states import Completed, State
from pydantic import BaseModel

from ipaflow.core import thread_logs
from ipaflow.core.lease import LeaseLost
from ipaflow.core.storage import is_out_unwritable
from ipaflow.tasks.shards import ShardPlan
from ipaflow.tasks.worker import ProgressCallback, RunSettings, ShardStats, run_shard

_receivers: dict[str, ProgressCallback] = {}  # run id -> the flow's receiver, for tasks run in its process


def progress_topic(run_id: str) -> str:
    """The Dask event topic a run's shard tasks report on."""
    return f"ipaflow-progress-{run_id}"


@contextlib.contextmanager
def receive_progress(run_id: str, receiver: ProgressCallback) -> Iterator[None]:
    """While in this block, shard tasks of ``run_id`` that run in this process hand their reports to
    ``receiver`` (called in the task's thread)."""
    _receivers[run_id] = receiver
    try:
        yield
    finally:
        _receivers.pop(run_id, None)


def _dask_worker():
    if "distributed" not in sys.modules:  # without it imported this cannot be a Dask worker
        return None
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:  # not inside a Dask worker
        return None


def progress_sender(run_id: str) -> ProgressCallback | None:
    """Where this task's reports go: the flow's receiver in this process, else the run's Dask event topic,
    else nowhere."""
    receiver = _receivers.get(run_id)
    if receiver is not None:
        return receiver
    worker = _dask_worker()
    if worker is None:
        return None
    topic = progress_topic(run_id)
    return lambda report: worker.log_event(topic, report.model_dump(mode="json"))


def worker_name() -> str:
    """Where this shard runs: the Dask worker's address on a cluster, else host:pid (threads in the flow's
    process). The run summary lists it per shard, so an operator sees which GPU did what."""
    worker = _dask_worker()
    return worker.address if worker is not None else f"{socket.gethostname()}:{os.getpid()}"


class ShardOutcome(BaseModel):
    """What the task returns: the shard's stats, wrapped.

    Prefect links a task's return value and its direct members to the task run by object identity, and
    records a later task's input as depending on that run when an argument contains one of those objects.
    Returned bare, the stats' ``spec`` string is the very ``Spec.name`` object that every later shard of the
    spec carries, so the UI drew each shard as depending on the previous one. Wrapped, the only members are
    this object and the stats, which no later task receives."""

    stats: ShardStats


def thread_logs_of_this_run():
    """``thread_logs.for_run`` for the flow run of the task running now (none outside a task run): in a Dask
    worker's process, the threads a shard starts log to its flow run, as in the flow's own process."""
    context = TaskRunContext.get()
    return thread_logs.for_run(context.task_run.flow_run_id if context is not None else None)


def worth_retrying(task, task_run, state) -> bool:
    """The retry policy: a failed shard is tried again (twice, 5 s apart), unless --out cannot be written at all
    now (disk full, over quota, read-only) or the run lost its lease on it: every try would fail the same way,
    and the run ends instead."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the task's own error, judged here
        return not (is_out_unwritable(exc) or isinstance(exc, LeaseLost))
    return True


@task(name="render-shard", task_run_name="{shard.name}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=worth_retrying)
def render_shard(shard: ShardPlan, settings: RunSettings) -> State:
    """Render one shard; a shard that failed is re-run (retries, ``worth_retrying``), skipping the rows its
    earlier attempt already journaled. The task run ends Completed with the shard's counts as its message
    ("29 ok, 2 failed"); its result is the ``ShardOutcome``. Logs from the threads it starts name the flow run
    (``thread_logs``)."""
    started = time.time()
    with thread_logs_of_this_run():
        stats = run_shard(shard, settings, progress=progress_sender(settings.run_id))
    counted = stats.run_counts()
    return Completed(message=f"{counted.ok} ok, {counted.failed} failed", data=ShardOutcome(stats=stats.model_copy(
        update={"worker": worker_name(), "started_at": started, "finished_at": time.time()})))
