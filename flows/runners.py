"""Where shard tasks run: threads in this process (one GPU worker, the default), a local Dask cluster
(``--workers N``) or an existing one (``--dask-address``). On Dask, render tasks need a ``GPU`` resource, so
they run only on workers started with ``--resources GPU=1``, one at a time per GPU."""

from __future__ import annotations

import contextlib

from prefect.task_runners import ThreadPoolTaskRunner

GPU_RESOURCE = {"GPU": 1}


def make_task_runner(dask_address: str | None = None, workers: int | None = None):
    """The task runner and how many shard tasks to keep in flight with it."""
    if dask_address or workers:
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address), 64
        cluster = {"n_workers": workers, "threads_per_worker": 1, "processes": True, "resources": GPU_RESOURCE,
                   "dashboard_address": None}
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster), 2 * workers
    return ThreadPoolTaskRunner(max_workers=1), 2


def gpu_routing():
    """Inside a flow on a Dask runner: annotate submissions so they need a GPU slot; elsewhere a no-op."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = getattr(context, "task_runner", None)
    if runner is not None and type(runner).__name__ == "DaskTaskRunner":
        import dask

        return dask.annotate(resources=GPU_RESOURCE)
    return contextlib.nullcontext()
