"""Where shard tasks run: threads in this process (one GPU worker, the default), a local Dask cluster
(``--workers N``) or an existing one (``--dask-address``). On Dask, render tasks need a ``GPU`` resource, so
they run only on workers started with ``--resources GPU=1``, one at a time per GPU."""

from __future__ import annotations

import contextlib
import logging
import os

from prefect.task_runners import ThreadPoolTaskRunner

from ipaflow.specs.options import RenderOptions

GPU_RESOURCE = {"GPU": 1}
IN_FLIGHT_ON_A_CLUSTER = 64  # an existing cluster's size is unknown until connected: keep plenty queued


def make_task_runner(options: RenderOptions):
    """The task runner the options name (not yet started) and how many shard tasks to keep in flight on it."""
    if options.dask_address or options.workers:
        from prefect_dask import DaskTaskRunner

        if options.dask_address:
            return DaskTaskRunner(address=options.dask_address), IN_FLIGHT_ON_A_CLUSTER
        workers = options.workers
        return DaskTaskRunner(cluster_class=local_gpu_cluster, cluster_kwargs={"n_workers": workers}), 2 * workers
    return ThreadPoolTaskRunner(max_workers=1), 2


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries (empty on a CPU-only box)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def local_gpu_cluster(n_workers: int):
    """``n_workers`` worker processes on this machine, each one GPU slot, as `dask worker --resources GPU=1
    --nthreads 1` would start them; plus what a plain LocalCluster cannot do per worker:

    - each worker sees its own GPU (CUDA_VISIBLE_DEVICES), so N workers on an N-GPU box do not all land on
      cuda:0;
    - torch gets its share of the CPU cores (OMP_NUM_THREADS): workers each using every core stall one
      another on a CPU-only machine (measured 0.4 s -> 7-11 s per image with two workers on two cores);
    - each may use its share of the machine's memory (Dask's default ties it to the thread count, which
      would stop a worker loading an SDXL pipeline on a box with many cores).
    """
    from distributed import Nanny, Scheduler, SpecCluster

    gpus = visible_gpus()
    threads = max(1, usable_cpus() // n_workers)

    def worker(index: int) -> dict:
        env = {"OMP_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        options = {"host": "127.0.0.1", "nthreads": 1, "resources": dict(GPU_RESOURCE), "env": env,
                   "memory_limit": 1 / n_workers, "dashboard": False, "silence_logs": logging.WARNING}
        return {"cls": Nanny, "options": options}

    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0, "dashboard": False,
                                               "dashboard_address": "127.0.0.1:0"}}  # not :8787, a real one's
    return SpecCluster(scheduler=scheduler, workers={f"gpu-{i}": worker(i) for i in range(n_workers)},
                       name="ipaflow-local", silence_logs=logging.WARNING)


def is_dask(runner) -> bool:
    """Whether a task runner is prefect-dask's (checked by name: prefect_dask is imported only when used)."""
    return type(runner).__name__ == "DaskTaskRunner"


def gpu_routing(runner):
    """On a (started) Dask runner: annotate submissions so they need a GPU slot; elsewhere a no-op."""
    if is_dask(runner):
        import dask

        _warn_without_gpu_workers(runner.client)
        return dask.annotate(resources=GPU_RESOURCE)
    return contextlib.nullcontext()


def _warn_without_gpu_workers(client) -> None:
    """Render tasks wait, silently, until a worker with a GPU slot joins: say so when none is there now (the
    usual cause: workers started without `--resources GPU=1`)."""
    from prefect import get_run_logger

    workers = client.scheduler_info()["workers"].values()
    if not any(worker.get("resources", {}).get("GPU") for worker in workers):
        get_run_logger().warning("no Dask worker offers a GPU slot yet: render tasks wait until a worker started "
                                 "with `--resources GPU=1` joins %s", client.scheduler.address)
