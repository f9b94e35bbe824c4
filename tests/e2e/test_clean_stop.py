"""Stopping and refusing cleanly: Ctrl-C ends a render within seconds with exit status 130 and one line (the
temporary Prefect server, in a process group of its own, records the run and its task runs as cancelled and
then goes); a second run into an --out in use is refused in one line; an --out that is a file, read-only or
full is said in one line, never a traceback."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from util import mounted_tmpfs, read_records, slow_manifest, start_until_first_image, write_manifest

INTERRUPTED = "ipaflow: interrupted; re-run the same command to resume\n"
# the status line off a terminal, every 30 s: the rows, or the phase before the first row (a loaded machine)
PROGRESS = re.compile(r"ipaflow: ([^;]*: \d+/\d+ rows \(|[A-Za-z' ]+, elapsed \d)")


def _processes_with(marker: str) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
    return found


def test_ctrl_c_stops_a_render_within_seconds(tmp_path, models_env, inputs_dir, prefect_api):
    """A new user's run (no PREFECT_API_URL: ipaflow starts the temporary server) interrupted from its terminal:
    the test starts it in a session of its own and sends SIGINT to that whole process group, as a terminal
    does on Ctrl-C."""
    manifest = slow_manifest(tmp_path / "m.parquet", inputs_dir)
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(home)
    out = tmp_path / "out"
    render = start_until_first_image(["render", str(manifest), "--out", str(out), "--batch-size", "2"], env, out)
    servers = [pid for pid in _processes_with(f"PREFECT_HOME={home}") if pid != render.pid]
    assert servers, "no temporary server"

    os.killpg(render.pid, signal.SIGINT)
    interrupted = time.monotonic()
    stdout, stderr = render.communicate(timeout=60)
    assert render.returncode == 130
    assert time.monotonic() - interrupted < 10
    # one line: no traceback, no connection refused (before it, the bar's line every 30 s on a slow machine)
    assert [line for line in stderr.splitlines(keepends=True) if not PROGRESS.match(line)] == [INTERRUPTED], stderr
    deadline = time.monotonic() + 10
    while _processes_with(f"PREFECT_HOME={home}"):
        assert time.monotonic() < deadline, "the temporary server outlived the interrupted command"
        time.sleep(0.1)
    with sqlite3.connect(home / "prefect.db") as database:  # the server heard of the interrupt before it went
        states = database.execute("select state_type, state_name from flow_run").fetchall()
        tasks = database.execute("select state_type from task_run").fetchall()
    assert states == [("CANCELLED", "Cancelled")]  # nothing left Running (tests/e2e/test_no_orphaned_runs.py)
    assert tasks and ("RUNNING",) not in tasks and ("PENDING",) not in tasks, tasks

    from ipaflow.flows.render import render_manifest

    summary = render_manifest(str(manifest), out=str(out), options={"limit": 2})  # --out is free again
    assert summary["failed"] == 0


@pytest.fixture
def cli(models_env, prefect_api, capfd):
    """``ipaflow`` in this process; returns (exit status, stderr lines)."""
    from ipaflow.flows.cli import main

    def run(*args: str) -> tuple[int, list[str]]:
        capfd.readouterr()
        code = main(list(args))
        return code, capfd.readouterr().err.splitlines()

    return run


def test_a_second_run_into_an_out_in_use_is_refused(tmp_path, inputs_dir, cli):
    from ipaflow.core.lease import OutputLease
    from ipaflow.core.storage import Storage

    manifest = write_manifest(tmp_path / "m.parquet", [
        {"id": "a", "spec": "sdxl-text2img", "prompt": "p", "ip_image": str(inputs_dir / "bear.png"),
         "num_inference_steps": 1}])
    out = tmp_path / "out"
    with OutputLease(Storage(), str(out), run="nightly-2026-12-01"):  # another run, alive
        code, lines = cli("render", str(manifest), "--out", str(out))
        assert code == 2 and len(lines) == 1, lines  # nothing ran
        assert lines[0].startswith(f"ipaflow: --out {out} is in use by run nightly-2026-12-01 on ")
        assert not (out / "metadata").exists() and not (out / "images").exists()  # nothing touched
    code, lines = cli("render", str(manifest), "--out", str(out))  # that run ended
    assert code == 0 and set(read_records(out)["status"]) == {"ok"}


def test_an_out_that_is_a_file_is_said_in_one_line(tmp_path, inputs_dir, cli):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "spec": "sdxl-text2img",
                                                         "ip_image": str(inputs_dir / "bear.png")}])
    (tmp_path / "taken").write_text("a file")
    assert cli("render", str(manifest), "--out", str(tmp_path / "taken")) == (
        2, [f"ipaflow: cannot write to --out {tmp_path / 'taken'}: it is a file, not a folder"])
    assert cli("render", str(tmp_path / "nothing.parquet"), "--out", str(tmp_path / "o")) == (
        2, [f"ipaflow: {tmp_path / 'nothing.parquet'}: manifest not found"])  # nothing ran; no Prefect traceback


@pytest.fixture
def small_filesystem(tmp_path):
    """A 256 KiB tmpfs: filled up, or remounted read-only."""
    with mounted_tmpfs(tmp_path / "mnt", "256k") as mount:
        yield mount


def test_a_full_or_read_only_out_is_said_in_one_line(tmp_path, inputs_dir, cli, small_filesystem):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "spec": "sdxl-text2img",
                                                         "ip_image": str(inputs_dir / "bear.png")}])
    with open(small_filesystem / "filler", "wb") as handle:
        with contextlib.suppress(OSError):
            handle.write(b"\0" * (512 * 1024))
    assert cli("render", str(manifest), "--out", str(small_filesystem / "out")) == (
        2, [f"ipaflow: cannot write to --out {small_filesystem / 'out'}: No space left on device"])

    (small_filesystem / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    assert cli("render", str(manifest), "--out", str(small_filesystem / "out")) == (
        2, [f"ipaflow: cannot write to --out {small_filesystem / 'out'}: Read-only file system"])
