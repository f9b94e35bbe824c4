"""A paused run whose lease was taken over stops before writing again (fencing): run A paused with SIGSTOP past
the lease's ttl, run B (the same command) takes ``--out`` over and completes, A resumed ends at its next write
with one line and exit status 4, having written nothing. After both: one record per id in
``pandas.read_parquet(out/metadata)``, every output a record names present, ``ipaflow verify`` clean. On a local
disk and on S3 (moto's server). Marked ``faults`` (slow: ``pytest -m "not faults"`` skips them)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from s3 import MotoS3
from util import ipaflow_command, output_names, write_manifest

from ipaflow.tasks.metadata_scans import FOLDER_METADATA

pytestmark = pytest.mark.faults

TTL_S = 3  # the lease's: short, so that B may take over a few seconds after A stopped renewing it
ROWS = 12


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """Where the output goes: (out, listing of every object under it, metadata read by pandas, extra args)."""
    if request.param == "local":
        out = tmp_path / "out"

        def listing() -> dict[str, tuple]:
            return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
                    for p in out.rglob("*") if p.is_file()}

        yield {"out": str(out), "listing": listing, "args": [], "env": {},
               "images": lambda: [n for n in output_names(out / "images")] if (out / "images").is_dir() else [],
               "records": lambda: pd.read_parquet(out / "metadata")}
        return
    moto = MotoS3()
    bucket = moto.bucket(f"fence-{uuid.uuid4().hex[:8]}")
    options = json.dumps({"client_kwargs": {"endpoint_url": moto.endpoint}})

    def parts() -> list[str]:
        return [k for k in moto.objects(bucket, "r/metadata/") if k.endswith(".parquet")]

    yield {"out": f"s3://{bucket}/r", "args": ["--storage-options", options],
           "env": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"},
           "listing": lambda: {k: (v["ETag"], v["LastModified"]) for k, v in moto.objects(bucket, "r/").items()},
           "images": lambda: [k.rsplit("/", 1)[1] for k in moto.objects(bucket, "r/images/")
                              if not k.endswith(FOLDER_METADATA)],
           "records": lambda: pd.concat([pd.read_parquet(io.BytesIO(moto.get(bucket, k)[0])) for k in parts()
                                         if not k.endswith("00-schema.parquet")], ignore_index=True)}
    moto.close()


def test_a_paused_run_taken_over_stops_at_once_and_writes_nothing(tmp_path, inputs_dir, models_env, prefect_api,
                                                                  place):
    from prefect.settings import PREFECT_API_URL

    rows = [{"id": f"r{i:02d}", "spec": "sdxl-text2img", "prompt": f"p{i}", "ip_image": str(inputs_dir / "bear.png"),
             "num_inference_steps": 2} for i in range(ROWS)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    env = {**os.environ, **place["env"], "PREFECT_API_URL": PREFECT_API_URL.value(), "IPAFLOW_LEASE_TTL": str(TTL_S)}
    out = place["out"]
    command = [ipaflow_command(), "render", str(manifest), "--out", out, "--batch-size", "2", *place["args"]]
    paused = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(place["images"]()) < 3:
            assert paused.poll() is None and time.monotonic() < deadline, paused.communicate()
            time.sleep(0.05)
        paused.send_signal(signal.SIGSTOP)  # a GC pause, a suspended laptop, a VM migration
        time.sleep(TTL_S + 1)  # its lease expires
        taker = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert taker.returncode == 0, taker.stderr
        assert "taking over the lease" in taker.stderr, taker.stderr
        before = place["listing"]()
        paused.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        _, stderr = paused.communicate(timeout=120)
        took = time.monotonic() - resumed
    finally:
        paused.send_signal(signal.SIGCONT)
        paused.kill()
        paused.wait()
    assert paused.returncode == 4, stderr
    assert took < 30, took  # its next write, then the flow's exit
    print(f"resumed run ended {took:.1f} s after SIGCONT")
    line = re.fullmatch(rf"ipaflow: lost the lease on {re.escape(out)} to run (?P<run>\S+) \(token 2\); stopped, "
                        r"(?P<safe>\d+) rows? (are|is) safe, re-run to resume", stderr.splitlines()[-1])
    assert line, stderr
    assert "Traceback" not in stderr, stderr
    assert place["listing"]() == before  # nothing written after B took over: no file new, changed or removed
    records = place["records"]()
    assert sorted(records["id"]) == [row["id"] for row in rows] and set(records["status"]) == {"ok"}  # once each
    named = {uri.rsplit("/", 1)[1] for outputs in records["outputs"] for uri in outputs}
    assert set(place["images"]()) == named
    verify = subprocess.run([ipaflow_command(), "verify", out, *place["args"]], env=env, capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    import httpx

    runs = httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json={}, timeout=10).json()
    ours = {run["name"]: run["state"] for run in runs if run["parameters"].get("out") in (out, Path(out).as_posix())}
    assert line["run"] in ours and ours[line["run"]]["type"] == "COMPLETED", ours
    assert any(state["type"] == "FAILED" and line.group(0).removeprefix("ipaflow: ") in (state["message"] or "")
               for state in ours.values()), ours
