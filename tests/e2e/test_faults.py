"""Infrastructure faults, each a real fault against real parts: moto's S3 server (a process of its own) frozen with
SIGSTOP or taken down mid-run, SIGTERM to a render blocked on a frozen store. For each: nothing lost (after a
re-run every row is ``ok`` exactly once and the folder holds what the records name), the run's end is one line
on the terminal with the exit status docs/faults.md lists, and the time to give up is bounded by the settings
the test gives (short ones; the defaults are in ipaflow.core.deadlines).

The S3 cases are a few seconds of rendering each; most of their time is the command's start-up (imports,
Prefect). Marked ``faults`` (slow: ``pytest -m "not faults"`` skips them)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pandas as pd
import pytest
from s3 import MotoProcess, TcpGate, free_port
from util import ipaflow_command, mounted_tmpfs, output_names, read_records, write_manifest

from ipaflow.tasks.metadata_scans import FOLDER_METADATA

pytestmark = pytest.mark.faults

# Short limits, so that a fault ends a run in seconds here (production defaults: ipaflow.core.deadlines).
LIMITS = {"IPAFLOW_CONNECT_TIMEOUT": "1", "IPAFLOW_READ_TIMEOUT": "1", "IPAFLOW_CALL_TIMEOUT": "2",
          "IPAFLOW_INPUT_TIMEOUT": "3", "IPAFLOW_OUTAGE_TIMEOUT": "6", "IPAFLOW_LEASE_TTL": "8"}
UNREACHABLE = re.compile(r"ipaflow: s3://(?P<bucket>[\w-]+)/r unreachable for (?P<seconds>\d+)s \((?P<cause>\w+)\); "
                         r"(?P<safe>\d+) rows? (are|is) safe, re-run to resume")


@pytest.fixture
def moto():
    server = MotoProcess()
    yield server
    server.close()


@pytest.fixture
def job(tmp_path, moto, inputs_dir, models_env, prefect_api):
    """A 24-row manifest (local inputs) and the environment of a render into ``s3://<new bucket>/r``."""
    from prefect.settings import PREFECT_API_URL

    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    moto.client.create_bucket(Bucket=bucket)
    rows = [{"id": f"r{i:02d}", "spec": "sdxl-text2img", "prompt": f"p{i}", "ip_image": str(inputs_dir / "bear.png"),
             "num_inference_steps": 2} for i in range(24)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    env = {**os.environ, **LIMITS, "PREFECT_API_URL": PREFECT_API_URL.value(), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    options = json.dumps({"client_kwargs": {"endpoint_url": moto.endpoint}})
    command = [ipaflow_command(), "render", str(manifest), "--out", f"s3://{bucket}/r", "--batch-size", "2",
               "--storage-options", options]
    return {"bucket": bucket, "rows": rows, "env": env, "command": command}


def _start(job) -> subprocess.Popen:
    return subprocess.Popen(job["command"], env=job["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_images(moto, job, process, count: int = 2) -> None:
    deadline = time.monotonic() + 240
    while len(moto.keys(job["bucket"], "r/images/")) < count:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)


def _wait_for_local_images(out, process, count: int) -> None:
    deadline = time.monotonic() + 240
    while not (out / "images").is_dir() or len(list((out / "images").iterdir())) < count:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)


def _local_all_ok_once(out, rows) -> None:
    """Every row ``ok`` exactly once in a local --out, and its images folder holds exactly what the records name."""

    records = read_records(out)
    assert sorted(records["id"]) == sorted(row["id"] for row in rows) and set(records["status"]) == {"ok"}
    named = {os.path.basename(uri) for outputs in records["outputs"] for uri in outputs}
    assert set(output_names(out / "images")) == named


def _rerun_completes(moto, job) -> None:
    """A re-run once the store is back renders what is left."""
    done = subprocess.run(job["command"], env=job["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _all_ok_once(moto, job)


def _all_ok_once(moto, job) -> None:
    """Every row ``ok`` exactly once, and the folder holds exactly the outputs the records name."""
    bucket = job["bucket"]
    parts = [key for key in moto.keys(bucket, "r/metadata/") if key.endswith(".parquet")]
    records = pd.concat([pd.read_parquet(io.BytesIO(moto.client.get_object(Bucket=bucket, Key=key)["Body"].read()))
                         for key in parts if not key.endswith("00-schema.parquet")])
    assert sorted(records["id"]) == sorted(row["id"] for row in job["rows"])  # each exactly once
    assert set(records["status"]) == {"ok"}
    named = {f"r/{name}" for outputs in records["outputs"] for name in outputs}  # names relative to --out
    assert set(moto.keys(bucket, "r/images/")) - {f"r/images/{FOLDER_METADATA}"} == named  # less the card's file


def test_a_frozen_store_ends_the_run_in_one_line_and_a_rerun_completes(moto, job):
    """The S3 endpoint frozen (SIGSTOP: connections accepted, never answered) mid-run: every request is cut at
    $IPAFLOW_CALL_TIMEOUT, the outage lasts $IPAFLOW_OUTAGE_TIMEOUT, then the run stops by itself with one line
    and exit status 3. Bound: outage + call timeout + the workers' last calls + the flow's exit."""
    process = _start(job)
    try:
        _wait_for_images(moto, job, process)
        moto.freeze()
        frozen = time.monotonic()
        _, stderr = process.communicate(timeout=120)  # without deadlines, the run never ends
        took = time.monotonic() - frozen
    finally:
        process.kill()
        process.wait()
        moto.thaw()
    lines = stderr.splitlines()
    assert process.returncode == 3, stderr
    assert took < 40, took
    assert "Traceback" not in stderr, stderr
    assert UNREACHABLE.fullmatch(lines[-1]), stderr
    safe = int(UNREACHABLE.fullmatch(lines[-1])["safe"])
    said = [line for line in lines if "unreachable (" in line]
    assert len(said) <= 2, stderr  # said once when it began (not per retry, per file), not a stream
    states = _flow_run_states(job)
    assert len(states) == 1 and states[0][0] == "FAILED" and lines[-1].removeprefix("ipaflow: ") in states[0][1]
    assert safe <= len(_journaled_ok(moto, job))  # no more rows said safe than have an ok record
    _rerun_completes(moto, job)


def _journaled_ok(moto, job) -> set[str]:
    """The ids with an ``ok`` record in the run's journal (what a stopped run leaves for the next to fold)."""
    bucket, ids = job["bucket"], set()
    for key in moto.keys(bucket, "r/_ipaflow/journal/"):
        table = pd.read_parquet(io.BytesIO(moto.client.get_object(Bucket=bucket, Key=key)["Body"].read()))
        ids.update(table.loc[table["status"] == "ok", "id"])
    return ids


def _flow_run_states(job) -> list[tuple[str, str]]:
    """(state type, message) of the flow runs into the job's --out, from the Prefect API."""
    import httpx

    runs = httpx.post(f"{job['env']['PREFECT_API_URL']}/flow_runs/filter", json={}, timeout=10).json()
    out = f"s3://{job['bucket']}/r"
    return [(run["state"]["type"], run["state"]["message"] or "") for run in runs
            if run["parameters"].get("out") == out]


def test_sigterm_ends_a_render_blocked_on_a_frozen_store_within_seconds(moto, job):
    """SIGTERM is honoured like Ctrl-C whatever the threads are blocked on: exit status 143, one line."""
    job["env"]["IPAFLOW_OUTAGE_TIMEOUT"] = "120"  # the store would not be given up on before the signal
    process = _start(job)
    try:
        _wait_for_images(moto, job, process)
        moto.freeze()
        time.sleep(3)  # the workers' writes and the lease's renewal are blocked now
        process.send_signal(signal.SIGTERM)
        terminated = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        took = time.monotonic() - terminated
    finally:
        process.kill()
        process.wait()
        moto.thaw()
    assert process.returncode == 143, stderr
    assert took < 10, took
    assert stderr.splitlines()[-1] == "ipaflow: terminated; re-run the same command to resume", stderr
    assert "Traceback" not in stderr, stderr
    _rerun_completes(moto, job)


def test_a_store_down_for_less_than_the_outage_limit_loses_nothing(moto, job):
    """The S3 endpoint stopped mid-run (connections refused, open ones cut) and back 4 s later, within
    $IPAFLOW_OUTAGE_TIMEOUT: the workers wait for it, the outage is said once and its end once, and the run
    completes with every row ``ok`` exactly once."""
    gate = TcpGate(("127.0.0.1", moto.port))
    job["env"]["IPAFLOW_OUTAGE_TIMEOUT"] = "60"
    job["command"][-1] = json.dumps({"client_kwargs": {"endpoint_url": gate.endpoint}})
    process = _start(job)
    try:
        _wait_for_images(moto, job, process)
        gate.down()
        time.sleep(4)
        gate.up()
        _, stderr = process.communicate(timeout=240)
    finally:
        process.kill()
        process.wait()
        gate.close()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert len(re.findall(r"unreachable \(", stderr)) == 1, stderr
    assert len(re.findall(r"reachable again after \d+s", stderr)) == 1, stderr
    _all_ok_once(moto, job)


class _PrefectServer:
    """A Prefect API server (what ``prefect server start`` runs: uvicorn on Prefect's app) on a fixed port and
    database, stopped and started again by the test."""

    def __init__(self, home):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0", "PREFECT_API_URL": ""}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import httpx

        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "error"], env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, "the Prefect server did not start"
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def flow_run_states(self) -> list[str]:
        import httpx

        runs = httpx.post(f"{self.url}/flow_runs/filter", json={}, timeout=10).json()
        return [run["state"]["name"] for run in runs]


def test_the_prefect_api_down_mid_run_is_one_line_and_the_run_completes(tmp_path, inputs_dir, models_env):
    """The Prefect server stopped mid-run and started again 8 s later: the run completes, the terminal holds one
    line for the outage and one for its end (no stream of client errors, no "without a flow run id"), and the
    run's final state reaches the API once it is back."""
    server = _PrefectServer(tmp_path / "prefect-home")
    server.start()
    rows = [{"id": f"r{i:02d}", "spec": "sdxl-text2img", "prompt": f"p{i}", "ip_image": str(inputs_dir / "bear.png"),
             "num_inference_steps": 2} for i in range(60)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": server.url}
    render = subprocess.Popen([ipaflow_command(), "render", str(manifest), "--out", str(out), "--batch-size", "2"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_local_images(out, render, 2)
        server.stop()
        time.sleep(8)
        server.start()
        _, stderr = render.communicate(timeout=240)
        assert render.returncode == 0, stderr
        assert "Traceback" not in stderr and "failed to process item" not in stderr, stderr
        assert "without a flow run id" not in stderr, stderr
        # one WARNING while it is down and one when it is back, not a stream (a server slow to come back on a
        # loaded machine may blink once more, each blink said once)
        down = stderr.count(f"the Prefect API {server.url} is unreachable")
        assert 1 <= down <= 2 and stderr.count("the Prefect API is reachable again") <= down, stderr
        deadline = time.monotonic() + 60
        while server.flow_run_states() != ["Completed"]:  # the final state reached the API
            assert time.monotonic() < deadline, server.flow_run_states()
            time.sleep(1)
    finally:
        render.kill()
        render.wait()
        server.stop()

    records = read_records(out)
    assert sorted(records["id"]) == sorted(row["id"] for row in rows) and set(records["status"]) == {"ok"}


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs to fill up mid-run."""
    with mounted_tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


def test_a_local_out_that_fills_up_mid_run_is_one_line_and_a_rerun_completes(tmp_path, inputs_dir, models_env,
                                                                            prefect_api, small_disk):
    """The disk of a local --out fills up mid-run (another writer takes the rest of it): the run ends with one
    line naming the cause, and once space is freed a re-run completes every row exactly once."""
    from prefect.settings import PREFECT_API_URL

    rows = [{"id": f"r{i:02d}", "spec": "sdxl-text2img", "prompt": f"p{i}", "ip_image": str(inputs_dir / "bear.png"),
             "num_inference_steps": 2} for i in range(16)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = small_disk / "out"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [ipaflow_command(), "render", str(manifest), "--out", str(out), "--batch-size", "2"]
    render = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_local_images(out, render, 2)
        with open(small_disk / "filler", "wb") as handle:  # the rest of the disk
            try:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            except OSError:
                pass
        full = time.monotonic()
        _, stderr = render.communicate(timeout=240)
        took = time.monotonic() - full
    finally:
        render.kill()
        render.wait()
    assert render.returncode == 1, stderr
    assert took < 30, took  # the first shard that cannot write ends the run: no retries, no later shards
    assert stderr.splitlines()[-1] == f"ipaflow: cannot write to --out {out}: No space left on device", stderr
    assert "No space left on device" in stderr and "Traceback" not in stderr, stderr
    (small_disk / "filler").unlink()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _local_all_ok_once(out, rows)


def _worker_processes(parent_pid: int) -> list:
    """The Dask worker processes a `--workers N` render started (its Nannies spawn them: multiprocessing)."""
    import psutil

    return [child for child in psutil.Process(parent_pid).children(recursive=True)
            if any("spawn_main" in part for part in child.cmdline())]


def test_a_dask_worker_killed_mid_shard_loses_nothing(tmp_path, inputs_dir, models_env, prefect_api):
    """A Dask worker killed (SIGKILL) while it renders a shard, on a local cluster of two (`--workers 2`): the
    scheduler runs the shard again on a live worker (which skips the rows the dead one journaled), the run ends
    with an honest exit status and no traceback, and after a re-run every row is ``ok`` exactly once and the
    folder holds exactly the outputs the records name."""
    from prefect.settings import PREFECT_API_URL

    rows = [{"id": f"r{i:02d}", "spec": "sdxl-text2img", "prompt": f"p{i}", "ip_image": str(inputs_dir / "bear.png"),
             "num_inference_steps": 2} for i in range(12)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [ipaflow_command(), "render", str(manifest), "--out", str(out), "--batch-size", "1", "--shard-size",
               "3", "--workers", "2"]
    render = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_local_images(out, render, 1)
        workers = _worker_processes(render.pid)
        assert len(workers) == 2, workers
        workers[0].kill()
        _, stderr = render.communicate(timeout=240)
    finally:
        render.kill()
        render.wait()
    assert render.returncode in (0, 1), stderr  # the shard ran again elsewhere, or its rows failed with a reason
    assert "Traceback" not in stderr and "without a flow run id" not in stderr, stderr
    if render.returncode == 1:
        first = read_records(out)
        assert first.loc[first["status"] == "failed", "error"].str.len().gt(0).all()
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    _local_all_ok_once(out, rows)


def test_the_manifests_store_gone_mid_run_fails_its_rows_with_the_reason_and_a_rerun_completes(
        tmp_path, moto, inputs_dir, models_env, prefect_api):
    """The manifest and the images it names (relative paths) live on one S3 endpoint, --out is local; the
    endpoint goes down (connections refused) once the run is planned and rendering: each row whose input can no
    longer be read fails with the reason, within $IPAFLOW_INPUT_TIMEOUT, the run ends with exit status 1 and
    no traceback; with the endpoint back, a re-run renders the failed rows, every row ``ok`` exactly once and
    the folder equals the records."""
    from prefect.settings import PREFECT_API_URL

    gate = TcpGate(("127.0.0.1", moto.port))
    moto.client.create_bucket(Bucket="manifests")
    moto.client.put_object(Bucket="manifests", Key="m/bear.png", Body=(inputs_dir / "bear.png").read_bytes())
    rows = [{"id": f"r{i:02d}", "spec": "sdxl-text2img", "prompt": f"p{i}", "ip_image": "bear.png",
             "num_inference_steps": 2} for i in range(6)]
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer, index=False)
    moto.client.put_object(Bucket="manifests", Key="m/rows.parquet", Body=buffer.getvalue())
    out = tmp_path / "out"
    env = {**os.environ, **LIMITS, "PREFECT_API_URL": PREFECT_API_URL.value(), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    command = [ipaflow_command(), "render", "s3://manifests/m/rows.parquet", "--out", str(out), "--batch-size", "1",
               "--shard-size", "1", "--storage-options", json.dumps({"client_kwargs": {"endpoint_url": gate.endpoint}})]
    render = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_local_images(out, render, 1)
        gate.down()
        gone = time.monotonic()
        _, stderr = render.communicate(timeout=120)
        took = time.monotonic() - gone
        gate.up()
        first = read_records(out)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:
        render.kill()
        render.wait()
        gate.close()
    assert render.returncode == 1, stderr
    assert took < 5 * 3 + 15, took  # each row left waits its input at most $IPAFLOW_INPUT_TIMEOUT
    assert "Traceback" not in stderr, stderr
    failed = first[first["status"] == "failed"]
    assert len(failed) and failed["error"].str.contains("bear.png").all(), failed["error"].tolist()
    assert done.returncode == 0, done.stderr
    _local_all_ok_once(out, rows)
