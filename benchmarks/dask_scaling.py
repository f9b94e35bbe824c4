"""Wall time of one manifest on 1 and 2 local Dask workers, and what a Prefect task costs on Dask.

The manifest: --rows rows of sdxl-text2img on the tiny zoo (64x64, --steps steps), cut into shards of
--shard-size rows. Per worker count N, on a cluster ipaflow starts (`--workers N`: N processes, one GPU slot
each, torch given cores/N threads each):

  cold   `render_manifest` with the option workers=N, as `ipaflow render --workers N` runs it: cluster
         start, imports and pipeline builds included;
  warm   the same manifest again on an already started cluster whose workers hold their pipelines.

Plus the in-process default (threads, no Dask) as the reference, and the per-task overhead: --tasks no-op
Prefect tasks through the GPU-routed Dask runner, against the same number of plain Dask tasks.

    python benchmarks/dask_scaling.py                  # 48 rows, 4 steps, shards of 8
    PREFECT_API_URL=http://127.0.0.1:4200/api python benchmarks/dask_scaling.py   # against your server

Without PREFECT_API_URL a temporary Prefect server is started (prefect_test_harness): worker processes need a
real API URL, never an ephemeral server of their own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def write_manifest(folder: Path, rows: int, steps: int) -> Path:
    import pandas as pd
    import PIL.Image

    prompts = []
    for k in range(4):
        path = folder / f"prompt-{k}.png"
        PIL.Image.new("RGB", (64, 64), (60 * k, 200 - 40 * k, 90)).save(path)
        prompts.append(str(path))
    frame = pd.DataFrame({"id": [f"row-{i:03d}" for i in range(rows)], "spec": "sdxl-text2img",
                          "prompt": [f"a picture of thing {i}" for i in range(rows)],
                          "ip_image": [prompts[i % 4] for i in range(rows)], "num_inference_steps": steps})
    path = folder / "manifest.parquet"
    frame.to_parquet(path, index=False)
    return path


def render(manifest: Path, out: Path, args, **cluster) -> dict:
    """One render; ``cluster`` is ``workers=N`` (a local cluster per run), ``dask_address=...`` or nothing."""
    from ipaflow.flows.render import render_manifest

    options = {"batch_size": args.batch_size, "shard_size": args.shard_size, "overwrite": True, **cluster}
    summary = render_manifest(str(manifest), out=str(out), options=options)
    assert summary.rendered == args.rows and summary.failed == 0, summary
    return summary


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def breakdown(seconds: float, summary: dict) -> str:
    """Wall time, the flow's own time (without Prefect's flow start and end), and the seconds each worker
    spent inside shards (how evenly the work spread; the rest is fixed cost and per-task overhead)."""
    busy: dict[str, float] = {}
    for shard in summary.shards:
        busy[shard.worker] = busy.get(shard.worker, 0.0) + shard.finished_at - shard.started_at
    per_worker = " + ".join(f"{s:.1f}" for s in sorted(busy.values(), reverse=True))
    return (f"{seconds:6.1f}s wall ({summary.images / seconds:.2f} images/s), flow {summary.seconds:.1f}s, "
            f"in shards {per_worker}s")


def task_overhead(address: str, count: int) -> tuple[float, float]:
    """Seconds per no-op task: as Prefect tasks through the GPU-routed Dask runner, and as plain Dask tasks
    (both serialised by the one GPU slot per worker)."""
    import dask
    from distributed import Client
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    from ipaflow.flows.runners import GPU_RESOURCE, gpu_routing

    @task
    def noop(i: int) -> int:
        return i

    @flow
    def many() -> None:
        with gpu_routing():
            futures = [noop.submit(i) for i in range(count)]
        for future in futures:
            future.result()

    many.with_options(task_runner=DaskTaskRunner(address=address))()  # workers import Prefect's task engine
    prefect_s, _ = timed(lambda: many.with_options(task_runner=DaskTaskRunner(address=address))())
    with Client(address, set_as_default=False) as client, dask.annotate(resources=GPU_RESOURCE):
        plain_s, _ = timed(lambda: client.gather([client.submit(abs, -i, pure=False) for i in range(count)]))
    return prefect_s / count, plain_s / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=40, help="no-op tasks for the overhead figure")
    parser.add_argument("--repeats", type=int, default=2, help="warm runs per set-up")
    parser.add_argument("--models", help="models folder (default: the tiny zoo, built when missing)")
    args = parser.parse_args()

    from ipaflow.tasks.zoo import build_zoo

    work = Path(tempfile.mkdtemp(prefix="ipaflow-dask-scaling-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    models = Path(args.models) if args.models else build_zoo(Path.home() / ".cache/ipaflow/zoo")
    os.environ["IPAFLOW_MODELS"] = str(Path(models).resolve())  # the workers inherit it
    manifest = write_manifest(work, args.rows, args.steps)

    api = contextlib.nullcontext()
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.testing.utilities import prefect_test_harness

        api = prefect_test_harness(server_startup_timeout=180)
    with api:
        run(args, manifest, work)


def run(args, manifest: Path, work: Path) -> None:
    from distributed import Client

    from ipaflow.flows.runners import local_gpu_cluster, usable_cpus

    print(f"{args.rows} rows sdxl-text2img 64x64, {args.steps} steps, batch {args.batch_size}, shards of "
          f"{args.shard_size} ({-(-args.rows // args.shard_size)} tasks); {usable_cpus()} CPUs")
    print("threads, no Dask, cold:  " + breakdown(*timed(lambda: render(manifest, work / "t", args))))
    for _ in range(args.repeats):
        print("threads, no Dask, warm:  " + breakdown(*timed(lambda: render(manifest, work / "t", args))))

    for workers in (1, 2):
        cold = timed(lambda n=workers: render(manifest, work / f"cold-{n}", args, workers=n))
        print(f"{workers} Dask worker(s), cold: " + breakdown(*cold))
        with local_gpu_cluster(workers) as cluster, Client(cluster, set_as_default=False) as client:
            client.wait_for_workers(workers)
            address = cluster.scheduler_address
            render(manifest, work / f"warm-{workers}", args, dask_address=address)  # imports + pipeline builds
            for _ in range(args.repeats):
                warm = timed(lambda n=workers, a=address: render(manifest, work / f"warm-{n}", args, dask_address=a))
                print(f"{workers} Dask worker(s), warm: " + breakdown(*warm))
            if workers == 1:
                prefect_task, dask_task = task_overhead(cluster.scheduler_address, args.tasks)
                print(f"per-task overhead (1 worker, {args.tasks} no-op tasks): Prefect task on Dask "
                      f"{prefect_task * 1000:.0f} ms, plain Dask task {dask_task * 1000:.1f} ms")


if __name__ == "__main__":
    main()
