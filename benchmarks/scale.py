"""Dataset-scale runs on this machine: validate, the flow's memory and time to the first shard, an all-done
re-run, and the metadata bytes a run touching 1% of the rows writes.

    python benchmarks/scale.py --sizes 10000 100000 1000000 10000000 [--rounds 3] [--work DIR]

Per size, a generated Parquet manifest (tiny-zoo spec ``sd15-full-face``, 64x64, 1 step, one shared image prompt):

- ``validate --no-inputs``: wall time and peak RSS of the whole process;
- ``render`` with a spec whose pipeline cannot load (the model folder is empty): every row fails at once with
  the reason (fail fast), so the run is cheap at any size: wall time, the flow process's peak RSS, and when
  the first shard was submitted (from the run summary);
- an all-done re-run (files layout): the done state is written first by ipaflow's own shard writer, journal and
  fold, with a fixed 8x8 picture instead of a rendered one (rendering 1M rows takes ~7 h here); then
  ``render`` is timed on it (it must skip every row);
- 1% of the rows touched, as a contiguous block of manifest rows and scattered (every 100th row): the journal and
  metadata bytes written by the fold, against the metadata's size.

``--files N`` adds the many-files case per size: the same rows written as a folder of N Parquet files (Hive
partitions of 100 files each, ``part=0003/part-00321.parquet``), and ``validate --no-inputs`` and the failing
``render`` timed on the folder against the one file: wall time, peak RSS, and their ratios.

``--estimate-rows 3000`` also checks ``render --dry-run`` against the real render of that many rows (rendered for
real on the tiny zoo): the estimated total against the flow's own seconds (both leave out process start-up).

Each process is timed from outside (wall) and its peak RSS read with wait4; medians over ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = process.communicate()
    wall = time.perf_counter() - started
    rss = _peak_rss_mb(process)
    if process.returncode not in (0, 1):
        raise RuntimeError(f"{command[:4]} exited {process.returncode}: {err.decode()[-2000:]}")
    return wall, rss, out.decode()


_RUSAGE: dict[int, float] = {}


def _peak_rss_mb(process) -> float:
    return _RUSAGE.get(process.pid, float("nan"))


class Popen(subprocess.Popen):
    """subprocess.Popen that reaps its child with wait4, keeping the child's own peak RSS."""

    def _try_wait(self, wait_flags):
        try:
            pid, status, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            return self.pid, 0
        if pid == self.pid:
            _RUSAGE[pid] = usage.ru_maxrss / 1024
        return pid, status


subprocess.Popen = Popen  # the benchmark's own children only


def write_manifest(path: Path, rows: int, image: Path, spec: str = "sd15-full-face", touched: str = "") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    step = 1_000_000
    for start in range(0, rows, step):
        n = min(step, rows - start)
        ids = [f"row-{i:08d}" for i in range(start, start + n)]
        prompts = [f"a picture number {i}" for i in range(start, start + n)]
        if touched == "block":
            prompts = [p + " edited" if i < rows // 100 else p for i, p in zip(range(start, start + n), prompts)]
        elif touched == "scattered":
            prompts = [p + " edited" if i % 100 == 0 else p for i, p in zip(range(start, start + n), prompts)]
        table = pa.table({"id": ids, "spec": [spec] * n, "prompt": prompts, "ip_image": [str(image)] * n,
                          "num_inference_steps": pa.array([1] * n, pa.int64()), "width": pa.array([64] * n, pa.int64()),
                          "height": pa.array([64] * n, pa.int64())})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def write_folder(folder: Path, rows: int, files: int, image: Path) -> None:
    """The rows of ``write_manifest`` as ``files`` Parquet files under Hive folders of 100 files each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    per = -(-rows // files)
    for number, start in enumerate(range(0, rows, per)):
        n = min(per, rows - start)
        part = folder / f"part={number // 100:04d}"
        part.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "id": [f"row-{i:08d}" for i in range(start, start + n)], "spec": ["sd15-full-face"] * n,
            "prompt": [f"a picture number {i}" for i in range(start, start + n)], "ip_image": [str(image)] * n,
            "num_inference_steps": pa.array([1] * n, pa.int64()), "width": pa.array([64] * n, pa.int64()),
            "height": pa.array([64] * n, pa.int64())}), part / f"part-{number:05d}.parquet")


def many_files(work: Path, size: int, files: int, manifest: Path, image: Path, empty: Path, env: dict,
               cli: list[str], me: list[str], rounds: int) -> dict:
    """validate and the failing render of one file against a folder of ``files`` files holding the same rows."""
    folder = work / f"m-{size}-{files}-files"
    if not folder.exists():
        write_folder(folder, size, files, image)
    row: dict = {"rows": size, "files": files}
    for name, target in (("file", manifest), ("folder", folder)):
        runs = [run(cli + ["validate", str(target), "--no-inputs"], env) for _ in range(rounds)]
        row[f"validate_{name}_s"] = round(statistics.median(r[0] for r in runs), 2)
        row[f"validate_{name}_rss_mb"] = round(statistics.median(r[1] for r in runs), 1)
        runs = []
        for number in range(rounds):
            out = work / f"broken-{name}-{number}"
            wall, rss, text = run(me + ["render", str(target), str(out), str(empty), ""], env)
            summary = json.loads(text.strip().splitlines()[-1])
            assert summary["failed"] == size, summary
            runs.append((wall, rss))
            subprocess.run(["rm", "-rf", str(out)])
        row[f"render_{name}_s"] = round(statistics.median(r[0] for r in runs), 2)
        row[f"render_{name}_rss_mb"] = round(statistics.median(r[1] for r in runs), 1)
    for what in ("validate", "render"):
        row[f"{what}_time_ratio"] = round(row[f"{what}_folder_s"] / row[f"{what}_file_s"], 3)
        row[f"{what}_rss_ratio"] = round(row[f"{what}_folder_rss_mb"] / row[f"{what}_file_rss_mb"], 3)
    return row


def child_render(manifest: str, out: str, models: str, layout: str | None) -> None:
    """In its own process: the render flow, then its summary as JSON on stdout."""
    os.environ["IPAFLOW_MODELS"] = models
    from ipaflow.flows.prefect_api import TemporaryAPIServer
    from ipaflow.flows.render import render_manifest

    server = TemporaryAPIServer.start_unless_configured()
    if server is not None:
        server.wait_until_ready()
    options = {"models": models, **({"layout": layout} if layout else {})}
    summary = render_manifest(manifest, out=out, options=options)
    print(summary.model_dump_json(include={"rows", "rendered", "skipped", "failed", "seconds", "first_shard_s",
                                           "metadata_bytes_written"}))


def child_done_state(manifest: str, out: str, models: str) -> None:
    """In its own process: write every row as done, through ipaflow's planner, keys, shard writer and fold, with
    a fixed picture in place of the render (see the module docstring)."""
    import PIL.Image

    from ipaflow.core.storage import Storage
    from ipaflow.flows.open_run import judge_rows, open_run
    from ipaflow.specs.checks import as_job
    from ipaflow.specs.options import RenderOptions
    from ipaflow.tasks.keys import IdentityCache, identify_inputs, row_key
    from ipaflow.tasks.metadata import MetadataStore
    from ipaflow.tasks.render import Rendered
    from ipaflow.tasks.writers import ShardWriter

    storage = Storage(local_staging=f"{out}/_ipaflow/tmp")
    run = open_run(manifest, RenderOptions(), storage=storage)
    registry = run.registry
    picture = PIL.Image.new("RGB", (8, 8), "gray")
    cache = IdentityCache()
    run_id = "bench-done-state"
    started = time.perf_counter()
    for number, judged in enumerate(judge_rows(run)):
        jobs = [as_job(job) for job, _ in judged.to_render]
        identities = identify_inputs(storage, jobs, cache=cache)
        keys = {job.id: row_key(job, registry.get(job.spec), identities) for job in jobs}
        writer = ShardWriter(storage, out, run_id, f"fill-{number:05d}", registry.get("sd15-full-face"), keys,
                             threads=2, flush_every_s=1e9)
        for job in jobs:
            writer.submit(Rendered(job=job, images=[picture]))
        writer.close()
    folded = MetadataStore(storage, out).fold(run_id)
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1), "records": folded.records}))


def child_touch(manifest: str, out: str) -> None:
    """In its own process: a run that re-renders the rows whose key changed (the fixed picture again) and
    folds; prints the bytes of journal and metadata it wrote."""
    import logging

    import PIL.Image

    from ipaflow.core.storage import Storage
    from ipaflow.flows.open_run import judge_rows, open_run
    from ipaflow.flows.render import _records_state
    from ipaflow.specs.checks import as_job
    from ipaflow.specs.options import RenderOptions
    from ipaflow.tasks.metadata import MetadataStore
    from ipaflow.tasks.render import Rendered
    from ipaflow.tasks.writers import ShardWriter

    storage = Storage(local_staging=f"{out}/_ipaflow/tmp")
    run = open_run(manifest, RenderOptions(), storage=storage)
    metadata = MetadataStore(storage, out)
    records = _records_state(run, metadata, "bench-touch", logging.getLogger("bench"))
    picture = PIL.Image.new("RGB", (8, 8), "gray")
    run_id = "bench-touch"
    touched = 0
    for number, judged in enumerate(judge_rows(run, records)):  # done rows left out, as a run leaves them
        todo = [as_job(job) for job, _ in judged.to_render]
        if not todo:
            continue
        touched += len(todo)
        keys = {job.id: key for job, key in judged.to_render}
        writer = ShardWriter(storage, out, run_id, f"touch-{number:05d}", run.registry.get("sd15-full-face"), keys,
                             threads=2, flush_every_s=1e9)
        for job in todo:
            writer.submit(Rendered(job=job, images=[picture]))
        writer.close()
    journal = sum(Path(p).stat().st_size for p in metadata.journal_files())
    folded = metadata.fold(run_id, records.index)
    total = sum(p.stat().st_size for p in Path(out, "metadata").glob("*.parquet"))
    print(json.dumps({"touched": touched, "journal_bytes": journal, "fold_bytes": folded.bytes_written,
                      "parts_rewritten": folded.parts_rewritten, "parts_written": folded.parts_written,
                      "metadata_bytes": total}))


def check_estimate(work: Path, rows: int, image: Path, zoo: Path, env: dict, cli: list[str], rounds: int) -> dict:
    """The dry run's estimate against the real render of the same manifest, ``rounds`` times each."""
    import re

    manifest = work / f"estimate-{rows}.parquet"
    write_manifest(manifest, rows, image)
    env = {**env, "IPAFLOW_MODELS": str(zoo)}
    found = []
    for number in range(rounds):
        _, _, text = run(cli + ["render", str(manifest), "--out", str(work / "estimate-scratch"), "--dry-run"], env)
        total = re.search(r"estimated total on one worker: (\d+)s .*spread (\d+)-(\d+)s", text)
        out = work / f"estimate-out-{number}"
        subprocess.run(["rm", "-rf", str(out)])
        wall, rss, printed = run(cli + ["render", str(manifest), "--out", str(out)], env)
        flow = float(re.search(r"images in ([\d.]+)s", printed).group(1))
        found.append({"estimate_s": int(total.group(1)), "low_s": int(total.group(2)), "high_s": int(total.group(3)),
                      "flow_s": flow, "wall_s": round(wall, 1)})
        subprocess.run(["rm", "-rf", str(out)])
    ratios = [f["estimate_s"] / f["flow_s"] for f in found]
    return {"estimate_rows": rows, "runs": found, "estimate_over_real_median": round(statistics.median(ratios), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["validate", "broken", "done", "touch"])
    parser.add_argument("--files", type=int, default=0, help="also the rows as a folder of this many files")
    parser.add_argument("--estimate-rows", type=int, default=0, help="also compare --dry-run with a real render")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        {"render": child_render, "done-state": child_done_state, "touch": child_touch}[args.child[0]](*args.child[1:])
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="ipaflow-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    zoo = work / "zoo"
    subprocess.run([sys.executable, "-m", "ipaflow.flows.cli", "zoo", "build", str(zoo)], check=True,
                   stdout=subprocess.DEVNULL)
    empty = work / "no-models"
    empty.mkdir(exist_ok=True)
    image = work / "face.png"
    if not image.exists():
        import PIL.Image

        PIL.Image.new("RGB", (64, 64), "white").save(image)
    env = {"HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    cli = [sys.executable, "-m", "ipaflow.flows.cli"]
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    results = []
    if args.estimate_rows:
        results.append(check_estimate(work, args.estimate_rows, image, zoo, env, cli, args.rounds))
        print(json.dumps(results[-1]), flush=True)
    for size in args.sizes:
        manifest = work / f"m-{size}.parquet"
        if not manifest.exists():
            write_manifest(manifest, size, image)
        row: dict = {"rows": size}
        if args.files:
            results.append(many_files(work, size, args.files, manifest, image, empty, env, cli, me, args.rounds))
            print(json.dumps(results[-1]), flush=True)
        if "validate" not in args.skip:
            runs = [run(cli + ["validate", str(manifest), "--no-inputs"], env) for _ in range(args.rounds)]
            row["validate_s"] = statistics.median(r[0] for r in runs)
            row["validate_rss_mb"] = statistics.median(r[1] for r in runs)
        if "broken" not in args.skip:
            runs = []
            for number in range(args.rounds if size <= 1_000_000 else 1):
                out = work / f"broken-{size}-{number}"
                wall, rss, text = run(me + ["render", str(manifest), str(out), str(empty), ""], env)
                summary = json.loads(text.strip().splitlines()[-1])
                assert summary["failed"] == size, summary
                runs.append((wall, rss, summary["first_shard_s"], summary["seconds"]))
                subprocess.run(["rm", "-rf", str(out)])
            row["broken_wall_s"] = statistics.median(r[0] for r in runs)
            row["broken_flow_s"] = statistics.median(r[3] for r in runs)
            row["flow_rss_mb"] = statistics.median(r[1] for r in runs)
            row["first_shard_s"] = statistics.median(r[2] for r in runs)
        if size <= 1_000_000 and ("done" not in args.skip or "touch" not in args.skip):
            out = work / f"done-{size}"
            if not (out / "metadata").exists():
                fill = run(me + ["done-state", str(manifest), str(out), str(zoo)], env)
                row["done_state_write_s"] = round(fill[0], 1)
            if "done" not in args.skip:
                runs = []
                for _ in range(args.rounds):
                    wall, rss, text = run(me + ["render", str(manifest), str(out), str(zoo), ""], env)
                    summary = json.loads(text.strip().splitlines()[-1])
                    assert summary["skipped"] == size and summary["rendered"] == 0, summary
                    runs.append((wall, rss, summary["seconds"]))
                row["all_done_wall_s"] = statistics.median(r[0] for r in runs)
                row["all_done_flow_s"] = statistics.median(r[2] for r in runs)
                row["all_done_rss_mb"] = statistics.median(r[1] for r in runs)
            if "touch" not in args.skip:
                for how in ("block", "scattered"):
                    touched = work / f"m-{size}-{how}.parquet"
                    write_manifest(touched, size, image, touched=how)
                    copy = work / f"touch-{size}-{how}"  # a done state of its own (records name absolute paths)
                    subprocess.run(["rm", "-rf", str(copy)])
                    run(me + ["done-state", str(manifest), str(copy), str(zoo)], env)
                    _, _, text = run(me + ["touch", str(touched), str(copy)], env)
                    measured = json.loads(text.strip().splitlines()[-1])
                    written = measured["journal_bytes"] + measured["fold_bytes"]
                    row[f"touch_{how}_share"] = round(written / measured["metadata_bytes"], 4)
                    row[f"touch_{how}"] = measured
                    subprocess.run(["rm", "-rf", str(copy)])
        results.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
