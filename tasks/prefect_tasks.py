"""The Prefect task of ipaflow: a thin wrapper around the shard worker, named per spec and shard.

Its inputs are small (rows as text, URIs, settings); ``NO_CACHE`` because hashing inputs is wasted work here
and results must never be reused across runs (the metadata decides what is done).
"""

from __future__ import annotations

import os
import socket
import sys
import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from ipaflow.tasks.shards import ShardPlan
from ipaflow.tasks.worker import RunSettings, ShardStats, run_shard


def worker_name() -> str:
    """Where this shard runs: the Dask worker's address on a cluster, else host:pid (threads in the flow's
    process). The run summary lists it per shard, so an operator sees which GPU did what."""
    if "distributed" in sys.modules:  # without it imported this cannot be a Dask worker
        from distributed import get_worker

        try:
            return get_worker().address
        except ValueError:  # not inside a Dask worker
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


@task(name="render-shard", task_run_name="{shard.name}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def render_shard(shard: ShardPlan, settings: RunSettings) -> ShardStats:
    """Render one shard; a worker that dies mid-shard has the shard re-run (retries), which skips the rows
    its earlier attempt already journaled."""
    started = time.time()
    stats = run_shard(shard, settings)
    return stats.model_copy(update={"worker": worker_name(), "started_at": started, "finished_at": time.time()})
