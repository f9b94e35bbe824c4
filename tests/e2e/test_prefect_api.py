"""What the Prefect UI shows of a run, read back from a real API (the session's test harness): the flow run,
its shard task runs and tags, the progress / failed-rows / summary artifacts, the run logger's lines; plus the
contact sheet and the terminal progress bar."""

from __future__ import annotations

import json
import logging
import os
import pty
import socket
import sys
import time

import PIL.Image
import pytest
from util import write_manifest

TAGS = {"ipaflow", "manifest:nightly-set", "spec:sdxl-text2img"}


def poll(read, ready, timeout=30.0):
    """The server records task runs and logs asynchronously: read until ``ready`` or the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ready(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def _rows(inputs_dir, tmp_path):
    good = [{"id": f"row-{i}", "spec": "sdxl-text2img", "prompt": f"picture {i}",
             "ip_image": str(inputs_dir / ("diner.png", "bear.png")[i % 2]), "num_inference_steps": 1}
            for i in range(4)]
    bad = {**good[0], "id": "bad-0", "ip_image": str(tmp_path / "missing.png")}
    return good + [bad]


@pytest.fixture
def run_logs_at_info():
    """The tests run Prefect at WARNING; the run logger's INFO lines reach the API only at INFO."""
    import prefect.main  # noqa: F401 - configures Prefect's logging, which would reset a level set before

    logger = logging.getLogger("prefect")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


def test_the_api_holds_run_tasks_tags_artifacts_and_logs(tmp_path, inputs_dir, models_env, prefect_api,
                                                         run_logs_at_info):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.runtime import flow_run

    from ipaflow.flows.monitoring import add_listener, remove_listener
    from ipaflow.flows.render import render_manifest

    manifest = write_manifest(tmp_path / "nightly-set.parquet", _rows(inputs_dir, tmp_path))
    client = get_client(sync_client=True)
    progress_seen = []  # (rows done, rows in all, the progress artifact as the API holds it at that moment)

    def listener(done, total):
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        artifact = next(a for a in client.read_artifacts(flow_run_filter=runs) if a.type == "progress")
        progress_seen.append((done, total, float(artifact.data)))

    add_listener(listener)
    try:
        with client:
            state = render_manifest(str(manifest), out=str(tmp_path / "out"),
                                    options={"batch_size": 2, "shard_size": 2}, return_state=True)
    finally:
        remove_listener(listener)
    summary = state.result()
    run_id = state.state_details.flow_run_id
    assert (summary["rendered"], summary["failed"]) == (4, 1)
    assert {shard["worker"] for shard in summary["shards"]} == {f"{socket.gethostname()}:{os.getpid()}"}
    assert [p for _, _, p in progress_seen] == [pytest.approx(100 * d / t) for d, t, _ in progress_seen]
    assert progress_seen[0][2] == 0 and progress_seen[-1][2] == 100
    assert any(0 < p < 100 for _, _, p in progress_seen), "the progress artifact moves while shards finish"

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        assert run.state.is_completed() and run.name.startswith("nightly-set-")
        assert TAGS <= set(run.tags)

        runs = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        tasks = poll(lambda: client.read_task_runs(flow_run_filter=runs),
                     lambda found: len(found) == 2 and all(t.state and t.state.is_completed() for t in found))
        assert sorted(t.name for t in tasks) == ["render-sdxl-text2img-0", "render-sdxl-text2img-1"]
        assert not any(t.tags for t in tasks)  # tags on the flow run only (flows/render.py says why)

        artifacts = {a.type: a for a in client.read_artifacts(flow_run_filter=runs)}
        assert set(artifacts) == {"progress", "table", "markdown"}  # out is local: no image artifact
        assert artifacts["progress"].key == "nightly-set-progress" and float(artifacts["progress"].data) == 100
        failed = json.loads(artifacts["table"].data)
        assert [(r["id"], r["spec"]) for r in failed] == [("bad-0", "sdxl-text2img")]
        assert "ip_image" in failed[0]["error"]
        markdown = artifacts["markdown"].data
        assert "rows: 5 = 4 rendered + 0 skipped (already done) + 1 failed" in markdown
        assert "images/s" in markdown and "| sdxl-text2img | 5 | 4 | 1 | 4 |" in markdown
        assert f"{tmp_path / 'out' / 'contact-sheet.png'}` (open it from storage" in markdown
        assert f"| {socket.gethostname()}:{os.getpid()} | 2 | 4 |" in markdown

        logs = poll(lambda: client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))),
                    lambda found: any("done: 4 rendered" in log.message for log in found))
        messages = [log.message for log in logs]
        assert any("done: 4 rendered, 0 skipped, 1 failed" in message for message in messages), messages
        assert any("render-sdxl-text2img-1 on " in message for message in messages)

    sheet = PIL.Image.open(tmp_path / "out" / "contact-sheet.png")
    assert sheet.size == (4 * 128, 128)  # four outputs, one row
    assert len(set(sheet.crop((0, 0, 128, 128)).getdata())) > 1


def _terminal_output(monkeypatch, make_stream) -> str:
    """Run a monitor through terminal_progress with ``sys.stderr`` on the given stream; what it showed."""
    from ipaflow.flows.monitoring import RunMonitor
    from ipaflow.flows.progress import terminal_progress
    from ipaflow.tasks.worker import ShardStats

    stats = ShardStats(name="render-x-0", spec="x", worker="here", rows=2, ok=2, images=2, seconds=0.1,
                       started_at=0.0, finished_at=0.1)
    stream, read = make_stream()
    monkeypatch.setattr(sys, "stderr", stream)
    monitor = RunMonitor(name="m", total=4)
    with terminal_progress():
        monitor.shard_finished(stats)
        time.sleep(0.3)  # a few of rich's refreshes
    stream.flush()
    return read()


def test_progress_bar_on_a_terminal_only(monkeypatch):
    import io

    def terminal():
        main, side = pty.openpty()
        os.set_blocking(main, False)
        stream = open(side, "w", closefd=True)

        def read():
            chunks = []
            while True:
                try:
                    chunks.append(os.read(main, 65536))
                except BlockingIOError:
                    stream.close()
                    os.close(main)
                    return b"".join(chunks).decode(errors="replace")

        return stream, read

    def pipe():
        stream = io.StringIO()
        return stream, stream.getvalue

    monkeypatch.setenv("TERM", "xterm")
    shown = _terminal_output(monkeypatch, terminal)
    assert "rendering" in shown and "2/4" in shown
    assert _terminal_output(monkeypatch, pipe) == ""


def test_a_contact_sheet_at_an_http_url_becomes_an_image_artifact(prefect_api):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from ipaflow.flows.monitoring import RunMonitor

    sheet = "https://renders.example.com/nightly/contact-sheet.png"
    summary = {"run_id": "r", "manifest": "m.parquet", "out": "https://renders.example.com/nightly",
               "gallery": "https://renders.example.com/nightly/index.html", "contact_sheet": sheet, "rows": 1,
               "rendered": 1, "skipped": 0, "failed": 0, "images": 1, "seconds": 1.0, "shards": []}

    @flow
    def finish_a_run():
        monitor = RunMonitor(name="web", total=1)
        monitor.start()
        monitor.finish(summary)

    state = finish_a_run(return_state=True)
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = {a.type: a for a in client.read_artifacts(flow_run_filter=runs)}
    assert artifacts["image"].data == sheet and artifacts["image"].key == "web-contact-sheet"
    assert f"![contact sheet]({sheet})" in artifacts["markdown"].data
