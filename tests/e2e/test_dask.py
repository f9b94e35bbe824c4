"""Dask fan-out on loopback: a real scheduler with a GPU worker and a CPU-only worker, started with the `dask`
command as the README starts them; and the local cluster `--workers N` starts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import PIL.Image
import pytest
from util import output_names, read_records, write_manifest

DASK = [sys.executable, "-m", "dask"]


def _rows(inputs_dir, n):
    return [{"id": f"row-{i}", "spec": "sdxl-text2img", "prompt": f"picture {i}",
             "ip_image": str(inputs_dir / ("diner.png", "bear.png", "gummy.png")[i % 3]), "num_inference_steps": 1}
            for i in range(n)]


def _start(command, env, log: Path) -> subprocess.Popen:
    with log.open("wb") as stream:  # the process keeps its own copy
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stream)


def _stop(processes) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _scheduler_address(scheduler_file: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return json.loads(scheduler_file.read_text())["address"]
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or half written
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models_env, prefect_api):
    """`dask scheduler` plus two `dask worker` processes on 127.0.0.1: one with `--resources GPU=1`, one
    without. The GPU worker has two threads, so that only the GPU resource keeps renders one at a time. The
    workers get PREFECT_API_URL in their environment, as on a real cluster (the harness sets it in this
    process's settings only); the models folder and offline settings come through the environment too."""
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    folder = tmp_path_factory.mktemp("dask")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    scheduler_file = folder / "scheduler.json"
    loopback = ["--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"]  # HTTP too
    worker = ["worker", *loopback, "--nthreads", "2", "--scheduler-file", str(scheduler_file)]
    processes = [_start([*DASK, "scheduler", *loopback, "--port", "0", "--scheduler-file", str(scheduler_file)],
                        env, folder / "scheduler.log")]
    client = None
    try:
        processes.append(_start([*DASK, *worker, "--name", "gpu-worker", "--resources", "GPU=1"], env,
                                folder / "gpu-worker.log"))
        processes.append(_start([*DASK, *worker, "--name", "cpu-worker"], env, folder / "cpu-worker.log"))
        address = _scheduler_address(scheduler_file)
        client = Client(address, timeout=120, set_as_default=False)  # a default client would capture every
        # DaskTaskRunner of the session (prefect-dask connects to it), the local cluster of `--workers` too
        client.wait_for_workers(2, timeout=120)
        names = {info["name"]: addr for addr, info in client.scheduler_info()["workers"].items()}
        yield SimpleNamespace(address=address, client=client, gpu=names["gpu-worker"], cpu=names["cpu-worker"])
    finally:
        if client is not None:
            client.close()
        _stop(processes)


def test_renders_on_the_gpu_worker_only_one_at_a_time(cluster, tmp_path, inputs_dir, caplog):
    from ipaflow.flows.render import render_manifest

    manifest = write_manifest(tmp_path / "m.parquet", _rows(inputs_dir, 6))
    options = {"batch_size": 2, "shard_size": 2, "dask_address": cluster.address}
    with caplog.at_level(logging.WARNING):
        summary = render_manifest(str(manifest), out=str(tmp_path / "out"), options=options)
    assert "GPU slot" not in caplog.text

    assert (summary.rendered, summary.failed) == (6, 0)
    assert summary.live_updates.shard_reports >= 3  # from the workers' processes, as Dask events
    records = read_records(tmp_path / "out")
    assert sorted(records["id"]) == [f"row-{i}" for i in range(6)] and set(records["status"]) == {"ok"}
    for i in range(6):
        assert PIL.Image.open(tmp_path / "out" / "images" / f"row-{i}.png").size == (64, 64)

    shards = sorted(summary.shards, key=lambda s: s.started_at)
    assert [s.worker for s in shards] == [cluster.gpu] * 3
    for earlier, later in zip(shards, shards[1:]):
        assert later.started_at >= earlier.finished_at, "two renders overlapped on one GPU"
    executed = cluster.client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert executed[cluster.cpu] == 0 and executed[cluster.gpu] >= 3  # the scheduler's own count

    again = render_manifest(str(manifest), out=str(tmp_path / "again"), options=options)
    assert again.rendered == 6
    builds = cluster.client.run(lambda: getattr(sys.modules.get("ipaflow.tasks.pipelines"), "PIPELINES", None)
                                and sys.modules["ipaflow.tasks.pipelines"].PIPELINES.builds)
    assert builds == {cluster.gpu: 1, cluster.cpu: None}  # built once, kept across tasks and flow runs


def test_workers_option_starts_a_local_gpu_cluster(tmp_path, inputs_dir, models_env, prefect_api):
    from ipaflow.flows.render import render_manifest

    manifest = write_manifest(tmp_path / "m.parquet", _rows(inputs_dir, 4))
    summary = render_manifest(str(manifest), out=str(tmp_path / "out"),
                              options={"batch_size": 2, "shard_size": 2, "workers": 1})

    assert (summary.rendered, summary.failed) == (4, 0)
    workers = {shard.worker for shard in summary.shards}
    assert len(workers) == 1 and workers.pop().startswith("tcp://127.0.0.1:")  # not this process's threads
    assert len(output_names(tmp_path / "out" / "images")) == 4


def test_warns_when_no_worker_has_a_gpu_slot(prefect_api, caplog):
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from ipaflow.flows.runners import gpu_routing

    threads_only = {"n_workers": 1, "processes": False, "dashboard_address": None,  # and no GPU resource
                    "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"}}  # its HTTP server off :8787

    @flow
    def route_nothing():
        with DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=threads_only) as runner:
            with gpu_routing(runner):
                pass

    with caplog.at_level(logging.WARNING):
        route_nothing()
    assert "no Dask worker offers a GPU slot yet" in caplog.text
