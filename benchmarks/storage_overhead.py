"""What writing to S3 costs against a local folder: the same manifest rendered to both, alternately.

    python benchmarks/storage_overhead.py [--rows 100] [--steps 1] [--reps 3] [--models DIR]

Starts moto's S3 server (``python -m moto.server``, a separate process on 127.0.0.1) and Prefect's ephemeral
API, builds the tiny zoo when no ``--models`` / ``$IPAFLOW_MODELS`` is given, writes a manifest of
sdxl-text2img rows (a few shared IP-Adapter images), renders it once to warm up (pipeline load, API start), then
renders it ``--reps`` times to a fresh local folder and to a fresh ``s3://`` prefix, alternating which goes
first, and prints the medians and their ratio. The manifest and inputs stay local: only ``--out`` differs.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUCKET = "ipaflow-bench"
IMAGES = ("diner", "bear", "gummy", "face")


def quiet_offline_environment(home: Path) -> None:
    """Set before Prefect and huggingface_hub are imported: both read these once."""
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.update(AWS_ACCESS_KEY_ID="benchmark-key-id", AWS_SECRET_ACCESS_KEY="benchmark-secret",
                      AWS_DEFAULT_REGION="us-east-1")


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("moto's S3 server did not start")


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (Linux /proc): moto shares this machine's cores with the render."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_manifest(folder: Path, rows: int, steps: int) -> Path:
    import pandas as pd

    from ipaflow.flows.demo import draw_inputs

    drawn = draw_inputs()
    for name in IMAGES:
        drawn[name].save(folder / f"{name}.png")
    manifest = folder / "bench.parquet"
    pd.DataFrame([
        {"id": f"row-{i:04d}", "spec": "sdxl-text2img", "prompt": f"picture {i}",
         "ip_image": str(folder / f"{IMAGES[i % len(IMAGES)]}.png"), "num_inference_steps": steps}
        for i in range(rows)
    ]).to_parquet(manifest, index=False)
    return manifest


def timed_render(manifest: Path, out: str, rows: int) -> float:
    from ipaflow.flows.render import render_manifest

    started = time.perf_counter()
    summary = render_manifest(str(manifest), out=out)
    seconds = time.perf_counter() - started
    if (summary.rendered, summary.failed) != (rows, 0):
        raise SystemExit(f"render to {out} did not complete: {summary.failures[:3]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", default=os.environ.get("IPAFLOW_MODELS"), help="tiny zoo (built when missing)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ipaflow-bench-"))
    quiet_offline_environment(work)
    if not args.models:
        from ipaflow.tasks.zoo import build_zoo

        args.models = str(build_zoo(work / "zoo"))
    os.environ["IPAFLOW_MODELS"] = str(Path(args.models).resolve())
    server, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        manifest = write_manifest(work, args.rows, args.steps)
        warm = timed_render(manifest, str(work / "warm-up"), args.rows)
        print(f"warm-up (pipeline load, Prefect API start): {warm:.1f}s", flush=True)
        times: dict[str, list[float]] = {"local": [], "s3": []}
        server_cpu: list[float] = []
        for rep in range(args.reps):
            order = ("local", "s3") if rep % 2 == 0 else ("s3", "local")
            for target in order:
                out = str(work / f"out-{rep}") if target == "local" else f"s3://{BUCKET}/out-{rep}"
                cpu = cpu_seconds(server.pid)
                times[target].append(timed_render(manifest, out, args.rows))
                if target == "s3":
                    server_cpu.append(cpu_seconds(server.pid) - cpu)
                print(f"rep {rep + 1} {target:5} {times[target][-1]:6.2f}s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    local, s3 = statistics.median(times["local"]), statistics.median(times["s3"])
    print(f"\n{args.rows} rows, sdxl-text2img, {args.steps} step(s), {args.reps} reps each, moto on loopback")
    for name, median in (("local", local), ("s3", s3)):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:6} median {median:6.2f}s  ({1000 * median / args.rows:.0f} ms/row)  runs: {runs}")
    print(f"ratio s3/local {s3 / local:.2f}  (+{s3 - local:.2f}s per run); "
          f"moto's own CPU per s3 run: median {statistics.median(server_cpu):.2f}s")

if __name__ == "__main__":
    main()
