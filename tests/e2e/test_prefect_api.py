"""What the Prefect UI shows of a run, read back from a real API (the session's test harness) while the run is
going and after it: the flow run's final state, its shard task runs (and their inputs), tags, the progress /
failed-rows / summary artifacts (escaped), the run logger's lines; plus the contact sheet and what the
command line shows on stderr."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import pty
import re
import socket
import sys
import threading
import time

import PIL.Image
import pytest
from util import artifact_role, markdown_table, write_manifest

TAGS = {"ipaflow", "manifest:nightly-set", "spec:sdxl-text2img"}
HOSTILE_SPEC = "<b>bold</b><script>alert(4)</script>"
HOSTILE_PATH = '"><img src=x onerror=alert(1)>.png'
HOSTILE_OUT = "out <i>1</i> *2* [3](x) `4` | 5"


def poll(read, ready, timeout=30.0):
    """The server records task runs and logs asynchronously: read until ``ready`` or the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ready(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@pytest.fixture(scope="module")
def run_logs_at_info():
    """The tests run Prefect at WARNING; the run logger's INFO lines reach the API only at INFO."""
    import prefect.main  # noqa: F401 - configures Prefect's logging, which would reset a level set before

    logger = logging.getLogger("prefect")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


def _rows(inputs_dir, folder):
    """Two shards of sdxl-text2img (4 rows each at batch size 2), slow enough (24 steps) to be watched: the first
    row of the first shard cannot be decoded (it fails in the worker), and four rows fail before rendering with
    text that markdown or HTML would take for markup."""
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # exists (passes the up-front check), cannot decode
    row = {"spec": "sdxl-text2img", "ip_image": str(inputs_dir / "diner.png"), "num_inference_steps": 24}
    good = [{**row, "id": f"row-{i}", "prompt": f"picture {i} | *not* _emphasis_"} for i in range(7)]
    return [{**row, "id": "bad-decode", "prompt": "x", "ip_image": str(corrupt)}, *good,
            {**row, "id": "html-spec", "spec": HOSTILE_SPEC},
            {**row, "id": "dash", "spec": "-"},
            {**row, "id": "html-path", "ip_image": str(folder / HOSTILE_PATH)},
            {**row, "id": "width", "width": 100}]


class Observer:
    """Reads the run's artifacts from the API every 0.1 s while the flow runs, with the time of each reading."""

    def __init__(self):
        self.run_id = None
        self.readings: list[tuple[float, dict]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def listener(self, snapshot):  # called in the flow's thread: learn the flow run's id there
        from prefect.runtime import flow_run

        if self.run_id is None and flow_run.id:
            self.run_id = flow_run.id
            self.thread.start()

    def _watch(self):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs = FlowRunFilter(id=FlowRunFilterId(any_=[self.run_id]))
        with get_client(sync_client=True) as client:
            while not self.stop.wait(0.1):
                seen = {artifact_role(a): (a.data, a.description) for a in client.read_artifacts(flow_run_filter=runs)}
                self.readings.append((time.time(), seen))


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, inputs_dir, models_env, prefect_api, run_logs_at_info):
    """A run of the hostile manifest, watched through the API, with live updates every 0.3 s (the flow looks at
    the shards' reports every 0.1 s)."""
    from ipaflow.flows import progress
    from ipaflow.flows import render as render_module
    from ipaflow.flows.render import render_manifest

    folder = tmp_path_factory.mktemp("watched")
    manifest = write_manifest(folder / "nightly-set.parquet", _rows(inputs_dir, folder))
    observer = Observer()
    progress.add_listener(observer.listener)
    os.environ["IPAFLOW_LIVE_UPDATES"] = "0.3"
    tick, render_module.TICK_SECONDS = render_module.TICK_SECONDS, 0.1
    try:
        state = render_manifest(str(manifest), out=str(folder / HOSTILE_OUT),
                                options={"batch_size": 2, "shard_size": 4}, return_state=True)
    finally:
        render_module.TICK_SECONDS = tick
        os.environ.pop("IPAFLOW_LIVE_UPDATES")
        progress.remove_listener(observer.listener)
        observer.stop.set()
    return state, observer, folder


def test_final_state_names_the_failures(watched_run):
    from prefect.client.orchestration import get_client

    state, _, _ = watched_run
    summary = state.result()
    assert (summary.rendered, summary.failed, summary.skipped) == (7, 5, 0)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state.is_completed() and run.state.name == "Completed with failures"
    assert run.state.message == "7 ok, 5 failed, 0 skipped"
    assert run.name.startswith("nightly-set-") and TAGS <= set(run.tags)
    assert {shard.worker for shard in summary.shards} == {f"{socket.gethostname()}:{os.getpid()}"}


def test_failed_rows_and_progress_are_live(watched_run):
    """The failed-rows artifact holds the worker's failure while that very shard still renders; the progress
    artifact moves within a shard (every batch), with rows/s and an ETA."""
    state, observer, _ = watched_run
    shards = sorted(state.result().shards, key=lambda s: s.started_at)
    failing = next(s for s in shards if s.failed)
    assert failing.rows == 4 and len(shards) == 2

    early = [seen for at, seen in observer.readings if failing.started_at < at < failing.finished_at]
    assert any("bad-decode" in json.dumps(seen.get("failed-rows")) for seen in early), "no live failed-rows artifact"
    descriptions = [seen["progress"][1] for _, seen in observer.readings if "progress" in seen]
    pattern = re.compile(r"^ETA (\d+m)?\d+s, rendering: (\d+)/12 rows \([\d.]+%\), (\d+) ok, (\d+) failed, 0 skipped, "
                         r"([\d.]+) rows/s, elapsed")
    live = [match for text in descriptions if (match := pattern.search(text.replace("\\", "")))]
    assert live, descriptions
    done_counts = {int(match.group(2)) for match in live}
    assert done_counts - {4, 8, 12}, f"progress moved only at shard boundaries: {sorted(set(descriptions))}"
    assert all(float(match.group(5)) > 0 for match in live)
    assert [float(seen["progress"][0]) for _, seen in observer.readings if "progress" in seen][-1] == 100


def test_artifacts_as_the_api_holds_them(watched_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    state, _, folder = watched_run
    run_id = state.state_details.flow_run_id
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
    with get_client(sync_client=True) as client:
        artifacts = {artifact_role(a): a for a in client.read_artifacts(flow_run_filter=runs)}
        assert set(artifacts) == {"progress", "failed-rows", "summary"}  # out is local: no image artifact
        assert artifacts["progress"].key == "nightly-set-progress" and float(artifacts["progress"].data) == 100
        assert artifacts["failed-rows"].key == "nightly-set-failed-rows"
        assert {artifacts["failed-rows"].type, artifacts["summary"].type} == {"markdown"}  # shown alike in both UIs
        assert artifacts["failed-rows"].description.startswith("5 failed rows, 4 reasons")
        failed = markdown_table(artifacts["failed-rows"].data)
        assert [int(row["rows"]) for row in failed] == [2, 1, 1, 1]  # both unknown specs under one reason
        by_sample = {re.sub(r" \(manifest row \d+\)", "", _shown_text(row["sample rows"])).strip(): row
                     for row in failed}
        assert by_sample["bad-decode"]["specs"].replace("\\", "") == "sdxl-text2img"
        assert by_sample["html-spec, dash"]["specs"] == "(unknown spec)"
        assert f"unknown spec '{HOSTILE_SPEC}'" in _shown_text(by_sample["html-spec, dash"]["reason (first row's)"])
        assert by_sample["width"]["specs"].replace("\\", "") == "sdxl-text2img"  # a failed check keeps its spec
        assert HOSTILE_PATH in _shown_text(by_sample["html-path"]["reason (first row's)"])

        shown = _shown_text(artifacts["summary"].data)
        assert "ipaflow run" in shown and "Completed with failures" in shown
        assert "rows: 12 = 7 rendered + 0 skipped (already done) + 5 failed" in shown
        assert re.search(r"time: \S+ in all = \S+ start-up .* \S+ planning \+ \S+ rendering", shown), shown
        assert re.search(rf"{re.escape(socket.gethostname())}:{os.getpid()}\s+2\s+8\s", shown), shown

        logs = poll(lambda: client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))),
                    lambda found: any("done: 7 rendered" in log.message for log in found))
        warnings = [log.message for log in logs if log.level == logging.WARNING]
        for row in ("bad-decode", "dash", "html-spec", "html-path", "width"):
            assert any(message.startswith(f"row {row} failed: ") for message in warnings), (row, warnings)
        assert any("render-sdxl-text2img-1 on " in log.message for log in logs)


def test_previews_are_embedded_labelled_sheets(watched_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    state, _, folder = watched_run
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        markdown = next(a for a in client.read_artifacts(flow_run_filter=runs) if artifact_role(a) == "summary").data
    [uri] = re.findall(r"\((data:image/jpeg;base64,[A-Za-z0-9+/=]+)\)", markdown)
    jpeg = base64.b64decode(uri.split(",", 1)[1])
    assert len(jpeg) < 100_000
    preview = PIL.Image.open(io.BytesIO(jpeg))
    assert preview.format == "JPEG" and preview.width == 7 * 96  # up to 8 per spec; 7 rendered
    sheet = PIL.Image.open(folder / HOSTILE_OUT / "contact-sheet.png")
    assert sheet.size == (7 * 128, 128 + 13)
    label = sheet.crop((0, 128, 128, 128 + 13)).convert("L")
    assert min(label.getdata()) < 100, "the first thumbnail carries its row id"


def _rendered_html(markdown: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)


def _shown_text(markdown: str) -> str:
    """What a reader sees of rendered markdown: its text, tags gone, entities decoded."""
    import html

    return html.unescape(re.sub(r"<[^>]+>", " ", _rendered_html(markdown)))


def test_manifest_text_is_escaped_in_every_artifact(watched_run):
    """Rendered as the UI renders them (markdown with HTML), the artifacts show the manifest's text as text:
    no element comes from it, and the text reads as it was written."""
    import html

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    state, _, folder = watched_run
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = {artifact_role(a): a for a in client.read_artifacts(flow_run_filter=runs)}
    texts = [artifacts["summary"].data, artifacts["progress"].description, artifacts["failed-rows"].description,
             artifacts["failed-rows"].data]
    shown = "\n".join(_rendered_html(text) for text in texts)
    tags = set(re.findall(r"<(\w+)", shown))
    assert tags <= {"p", "h1", "h2", "h3", "ul", "li", "table", "thead", "tbody", "tr", "th", "td", "img"}, tags
    assert all(src.startswith("data:image/jpeg") for src in re.findall(r'<img src="([^"]*)"', shown))
    text = html.unescape(re.sub(r"<[^>]+>", "", shown))
    for written in (HOSTILE_SPEC, HOSTILE_PATH, HOSTILE_OUT, "(unknown spec)", "sdxl-text2img", "not a decodable image"):
        assert written in text, written
    cells = [html.unescape(re.sub(r"<[^>]+>", "", _rendered_html(row["specs"])).strip())
             for row in markdown_table(artifacts["failed-rows"].data)]
    assert "(unknown spec)" in cells  # a spec that names no known spec


def test_no_task_run_input_references_another_task_run(watched_run):
    """Shards are independent: the UI must draw no edge between them (Prefect infers edges from returned
    objects that reappear in later inputs)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    state, _, _ = watched_run
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        tasks = poll(lambda: client.read_task_runs(flow_run_filter=runs),
                     lambda found: len(found) == 2 and all(t.state and t.state.is_completed() for t in found))
    assert sorted(t.name for t in tasks) == ["render-sdxl-text2img-0", "render-sdxl-text2img-1"]
    assert not any(t.tags for t in tasks)  # tags on the flow run only (RunMonitor.tag_flow_run says why)
    assert all(inputs == [] for t in tasks for inputs in t.task_inputs.values()), [t.task_inputs for t in tasks]


def _terminal_output(monkeypatch, make_stream, every: float = 30.0) -> str:
    """What terminal_progress shows on ``sys.stderr`` (the given stream) through a start-up phase and a
    snapshot of a run."""
    from ipaflow.flows import progress

    stream, read = make_stream()
    monkeypatch.setattr(sys, "stderr", stream)
    progress.mark_command_start()  # as the command line does first
    logger = logging.getLogger("tests.terminal")  # a log handler on the same stream, as Prefect's console one
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        with progress.terminal_progress(every=every):
            progress.set_phase("importing torch, diffusers and Prefect")
            time.sleep(0.3)  # a few of rich's refreshes
            progress.publish(progress.Snapshot(phase="rendering", total=40, done=12, ok=9, failed=3, rate=2.5,
                                               eta=11.2, elapsed=7))
            logger.warning("row r-7 failed: [spec x]")
            time.sleep(0.5)
        assert logger.handlers == [handler]  # put back
    finally:
        logger.removeHandler(handler)
    stream.flush()
    return read()


def test_progress_on_a_terminal_and_off_it(monkeypatch):
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
    monkeypatch.setenv("COLUMNS", "200")
    shown = _terminal_output(monkeypatch, terminal)
    assert "importing torch, diffusers and Prefect" in shown  # the start-up, before any row
    assert "rendering" in shown and "12/40" in shown and "2.5 rows/s" in shown and "3 failed" in shown
    assert "ETA 11s" in shown
    assert "\x1b[2Krow r-7 failed: [spec x]" in shown  # the bar's line cleared first: the log line goes above it

    assert _terminal_output(monkeypatch, pipe) == "row r-7 failed: [spec x]\n"  # no status line in a short command
    lines = _terminal_output(monkeypatch, pipe, every=0.2).splitlines()
    assert lines and all(line.startswith("ipaflow: ") for line in lines if "r-7" not in line)
    shown = "\n".join(lines)
    assert re.search(r"^ipaflow: importing torch, diffusers and Prefect, elapsed \ds$", shown, re.M)  # no rows yet
    assert re.search(r"^ipaflow: ETA 11s, rendering: 12/40 rows \(30.0%\), 9 ok, 3 failed, 0 skipped, 2.5 rows/s, "
                     r"elapsed \ds$",
                     shown, re.M)


def test_a_contact_sheet_at_an_http_url_becomes_an_image_artifact(prefect_api):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from ipaflow.flows.monitoring import RunMonitor
    from ipaflow.tasks.counts import RowCounts

    sheet = "https://renders.example.com/nightly/contact-sheet.png"

    @flow
    def finish_a_run():
        monitor = RunMonitor(name="web")
        monitor.start()
        monitor.planned(1)
        monitor.counts.add(RowCounts(ok=1, images=1))
        summary = monitor.summary(run_id="r", manifest="m.parquet", out="https://renders.example.com/nightly",
                                  gallery="https://renders.example.com/nightly/index.html", contact_sheet=sheet,
                                  metadata_bytes_written=0, first_shard_s=None)
        return monitor.finish(summary, {}, max_failures=None)

    state = finish_a_run(return_state=True)
    assert (state.name, state.message) == ("Completed", "1 ok, 0 failed, 0 skipped")
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = {a.type: a for a in client.read_artifacts(flow_run_filter=runs)}
    assert artifacts["image"].data == sheet and artifacts["image"].key == "web-contact-sheet"
    assert f"![contact sheet]({sheet})" in artifacts["markdown"].data
