"""What an operator sees of a run in Prefect, while it runs and at the end: the counts of ``flows.run_counter``
published as artifacts, log lines, tags and the final state.

While it runs (every few seconds, not once per shard): the progress artifact (rows done / total, ok, failed,
skipped, rows/s, ETA), the failed-rows artifact (failed rows grouped by reason, counted, with sample ids, as
img2dataset counts a shard's errors by message), a WARNING line in the run's log per failed row (at most
``run_counter.FAILURE_LOG_LIMIT`` per shard, then one line counting the rest), and snapshots for the command line's bar
(``ipaflow.flows.progress``). At the end: the summary artifact with per-spec previews, the final state
("Completed", "Completed with failures", or "Failed" past ``--max-failures``, with counts as its message).

Shards report while they render (``ipaflow.tasks.worker.ShardProgress``, delivered by
``ipaflow.tasks.prefect_tasks``: in-process, or as Dask events). Reports only update counters here; the
flow's thread turns them into API writes in ``tick``, at most one round every ``live_interval()`` seconds,
so the API load does not grow with the number of rows, batches or workers (a SQLite-backed server refuses
writes that come too fast: "database is locked").

Manifest text reaches artifacts as escaped markdown (``markdown_text``), in markdown artifacts and descriptions
only: both of Prefect 3.9's UIs render those as markdown, so the escaped text shows as written in each, and no
manifest HTML becomes an element. A table artifact is not used: the classic UI renders its cells as markdown, the
new one as plain text, so no one cell text shows right in both (``scripts/ui_check.py`` checks both in Chromium).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from ipaflow.flows.progress import Snapshot, format_duration, format_rate, status_line
from ipaflow.flows.run_counter import FailureGroups, RunCounter, artifact_key
from ipaflow.flows.runners import is_dask
from ipaflow.flows.summary import RunSummary, ShardLine, TooManyFailures
from ipaflow.tasks.counts import RowCounts

LIVE_UPDATES_ENV = "IPAFLOW_LIVE_UPDATES"  # seconds between live writes to the Prefect API; 0: start and end only
DEFAULT_LIVE_INTERVAL = 5.0
TICK_SECONDS = 1.0  # how often the flow's thread looks at the reports (the terminal bar moves this often)
MAX_REASONS = 50  # rows of the failed-rows artifact; the rest are summed in one
CLOSE_TIMEOUT_S = 3.0  # how long an interrupted command waits for its run to be marked Cancelled


def live_interval() -> float:
    """Seconds between live updates of the Prefect API (``$IPAFLOW_LIVE_UPDATES``, default 5; 0 switches them
    off: the artifacts are written at the start and the end only, and shards send no reports)."""
    text = os.environ.get(LIVE_UPDATES_ENV, "")
    try:
        return max(0.0, float(text)) if text else DEFAULT_LIVE_INTERVAL
    except ValueError:
        return DEFAULT_LIVE_INTERVAL


# -- markdown -------------------------------------------------------------------------------------------------

_INLINE = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\\": "\\\\", "`": "\\`", "*": "\\*", "_": "\\_",
                         "[": "\\[", "]": "\\]", "|": "\\|", "~": "\\~", "#": "\\#", "$": "\\$"})
_BLOCK_START = re.compile(r"^(\d{1,9})([.)])")


def markdown_text(value: Any) -> str:
    """``value`` as markdown that displays as the same text, on one line: HTML characters as entities,
    inline marks (emphasis, code, links, images, strikethrough, table pipes) backslash-escaped, and a start
    that would open a block (``-``, ``+``, ``=``, ``1.``) escaped too."""
    text = " ".join(str(value).split()).translate(_INLINE)
    if match := _BLOCK_START.match(text):
        return f"{match.group(1)}\\{match.group(2)}{text[match.end():]}"
    return "\\" + text if text[:1] in ("-", "+", "=") else text


FAILURE_COLUMNS = ("rows", "column", "reason (first row's)", "specs", "sample rows")


def failure_table(groups: FailureGroups) -> list[dict]:
    """The failed-rows artifact's rows, most frequent reason first, every text cell escaped."""
    ranked = sorted(groups.groups.values(), key=lambda g: (-g.rows, g.column, g.example))
    table = [{"rows": g.rows, "column": markdown_text(g.column), "reason (first row's)": markdown_text(g.example),
              "specs": markdown_text(", ".join(sorted(g.specs))), "sample rows": markdown_text(", ".join(g.sample))}
             for g in ranked[:MAX_REASONS]]
    if rest := ranked[MAX_REASONS:]:
        table.append({"rows": sum(g.rows for g in rest), "column": "",
                      "reason (first row's)": f"{len(rest)} other reasons", "specs": "", "sample rows": ""})
    return table


def failure_markdown(groups: FailureGroups) -> str:
    """The failed-rows artifact: ``failure_table`` as a markdown table (its cells escaped already)."""
    lines = ["| " + " | ".join(FAILURE_COLUMNS) + " |", "| ---: | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(str(row[name]) for name in FAILURE_COLUMNS) + " |" for row in failure_table(groups)]
    return "\n".join(lines)


# -- the run ----------------------------------------------------------------------------------------------------

def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run
        return logging.getLogger("ipaflow.flow")


class RunMonitor(RunCounter):
    """The run's counts (``RunCounter``) shown as they change: the Prefect artifacts and the flow run's tags and
    final state, written from the flow's thread at most every ``interval`` seconds.

    Args:
        name: the run's name (the manifest's): the artifacts' keys.
        redact: the run's storage redactor: artifacts and logs carry no credentials.
        interval: seconds between live writes (default: ``$IPAFLOW_LIVE_UPDATES``, else 5; 0: start and end only).
    """

    def __init__(self, name: str, redact: Callable[[str], str] = str, interval: float | None = None):
        super().__init__(name, redact, _run_logger())
        self.interval = live_interval() if interval is None else interval
        self._progress_id = None
        self._failed_id = None
        self._written: tuple = ()
        self._failures_written = 0
        self._last_write = float("-inf")
        self._warned_api = False
        self.flow_run_id = None
        self._context: contextvars.Context | None = None  # the flow's (its API settings), for close_interrupted

    # -- what happens ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """The progress artifact, at 0, so the run shows one from its first second."""
        from prefect.artifacts import create_progress_artifact
        from prefect.runtime import flow_run

        global _in_flight
        self.flow_run_id = flow_run.id
        self._context = contextvars.copy_context()
        _in_flight = self
        snapshot = self.snapshot()
        self._progress_id = create_progress_artifact(progress=0.0, key=artifact_key(f"{self.name}-progress"),
                                                     description=markdown_text(status_line(snapshot)))
        self._written = (snapshot.phase, snapshot.done, snapshot.failed, snapshot.total)  # no update of the same
        self.tick()

    def tag_flow_run(self, tags: list[str]) -> None:
        """Add ``tags`` to this flow run, so the UI's run list filters by manifest and spec.

        The shard task runs stay untagged. A tagged task run makes Prefect take a tag concurrency slot first: a
        write that a SQLite-backed server (the temporary one, `prefect server start`'s default) often refuses as
        "database is locked" while the previous shard's results land, and the client retries ~2 s later
        (measured before every other shard here; PrefectHQ/prefect#18934). Task names carry the spec."""
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run

        if not flow_run.id:
            return
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run.id).tags
            client.update_flow_run(flow_run.id, tags=sorted(set(current) | set(tags)))

    # -- showing --------------------------------------------------------------------------------------------

    def tick(self, force: bool = False) -> None:
        """``update``, then write to the API when due (every ``interval`` seconds, when something changed) or
        when ``force``d."""
        snapshot = self.update()
        changed = (snapshot.phase, snapshot.done, snapshot.failed, snapshot.total) != self._written
        due = self.interval > 0 and time.monotonic() - self._last_write >= self.interval
        if force or (changed and due):
            self._write(snapshot)

    def _write(self, snapshot: Snapshot) -> None:
        """Progress and failed rows to the API. A refused write is retried at the next round, never fatal."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        started = time.monotonic()
        try:
            with get_client(sync_client=True) as client:
                if self._progress_id is not None:
                    client.update_artifact(self._progress_id, ArtifactUpdate(
                        data=snapshot.percent, description=markdown_text(status_line(snapshot))))
                if self.recorded != self._failures_written:
                    self._write_failed_rows(client, final=False)
        except Exception as exc:  # noqa: BLE001 - the render goes on; the next round writes again
            if not self._warned_api:
                self.log.warning("live update of the Prefect UI failed (retried every %.0fs): %s", self.interval,
                                 self.redact(f"{type(exc).__name__}: {exc}"))
                self._warned_api = True
            return
        finally:
            self.api_writes += 1
            self.api_seconds += time.monotonic() - started
            self._last_write = time.monotonic()
        self._written = (snapshot.phase, snapshot.done, snapshot.failed, snapshot.total)

    def _write_failed_rows(self, client, final: bool) -> None:
        from prefect.artifacts import create_markdown_artifact
        from prefect.client.schemas.actions import ArtifactUpdate

        count = self.recorded
        reasons = len(self.groups.groups)
        when = "" if final else f" so far (at {datetime.now(timezone.utc):%H:%M:%S} UTC)"
        description = (f"{count} failed row{'s' if count != 1 else ''}{when}, {reasons} "
                       f"reason{'s' if reasons != 1 else ''}; every row's reason is in the metadata and the gallery")
        table = failure_markdown(self.groups)
        if self._failed_id is None:
            self._failed_id = create_markdown_artifact(markdown=table, key=artifact_key(f"{self.name}-failed-rows"),
                                                       description=description)
        else:
            client.update_artifact(self._failed_id, ArtifactUpdate(data=table, description=description))
        self._failures_written = count

    @contextlib.contextmanager
    def listening(self, runner, run_id: str) -> Iterator[None]:
        """While in this block, shard tasks of ``run_id`` report to this monitor: directly when they run in this
        process, through Dask events when they run on a Dask worker. With live updates off, they do not."""
        from ipaflow.tasks.prefect_tasks import progress_topic, receive_progress

        if self.interval <= 0:
            yield
            return
        client = runner.client if is_dask(runner) else None
        with receive_progress(run_id, self.report):
            if client is None:
                yield
                return
            topic = progress_topic(run_id)
            client.subscribe_topic(topic, lambda event: self.report(event[1]))
            try:
                yield
            finally:
                client.unsubscribe_topic(topic)

    # -- the end ----------------------------------------------------------------------------------------------

    def finish(self, summary: RunSummary, previews: dict[str, str], max_failures: int | None):
        """The final artifacts (progress at 100, failed rows, the summary with its previews, the contact sheet
        when the UI can load it) and the run's final state, whose data is ``summary``."""
        from prefect.artifacts import create_image_artifact, create_markdown_artifact
        from prefect.client.orchestration import get_client
        from prefect.states import Completed, Failed

        global _in_flight
        _in_flight = None  # ended in a state of its own
        self.set_phase("finished")
        snapshot = self.snapshot()  # self.times holds every stage now
        self._write(snapshot)
        with get_client(sync_client=True) as client:
            if self.failures:
                self._write_failed_rows(client, final=True)
        sheet = summary.contact_sheet
        if sheet and shown_in_ui(sheet):
            create_image_artifact(image_url=sheet, key=artifact_key(f"{self.name}-contact-sheet"),
                                  description="the first outputs by row id")
        message = f"{summary.rendered} ok, {summary.failed} failed, {summary.skipped} skipped"
        stopped = max_failures is not None and summary.failed >= max_failures
        if stopped:
            state = Failed(message=f"{message} (stopped at --max-failures {max_failures})")
        elif summary.failed:
            state = Completed(name="Completed with failures", message=message)
        else:
            state = Completed(message=message)
        create_markdown_artifact(markdown=summary_markdown(summary, self.per_spec, previews, state.name, self.redact),
                                 key=artifact_key(f"{self.name}-summary"), description="ipaflow run summary")
        state.data = TooManyFailures(state.message, summary) if stopped else summary
        emit_run_events(summary, state.name, self.flow_run_id)
        return state

    def cancel(self, how: str) -> str:
        """End this run's flow run and every task run of it still open as Cancelled, saying how far it got; the
        progress artifact's last word says the same. Runs in any thread (the command's exit path); returns the
        message."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate
        from prefect.states import Cancelled

        snapshot = self.snapshot()
        counts = (f"{snapshot.ok} ok, {snapshot.failed} failed, {snapshot.skipped} skipped" if snapshot.total
                  is not None else "before any row was planned")
        where = f" after {snapshot.done}/{snapshot.total} rows" if snapshot.total is not None else ""
        message = f"{how}{where}: {counts}; re-run the same command to resume"
        # a client of its own (other httpx settings than the flow's, which may be closed by now)
        with get_client(sync_client=True, httpx_settings={"timeout": CLOSE_TIMEOUT_S}) as client:
            state = client.read_flow_run(self.flow_run_id).state if self.flow_run_id is not None else None
            if state is not None and state.is_final() and not state.is_crashed():
                return message  # it ended on its own (Completed, Failed) before the signal
            if self._progress_id is not None:
                client.update_artifact(self._progress_id, ArtifactUpdate(
                    data=snapshot.percent, description=markdown_text(message)))
            if self.flow_run_id is not None:
                close_flow_run(client, self.flow_run_id, lambda: Cancelled(message=message))
        return message


# -- events an automation can trigger on --------------------------------------------------------------------

FINISHED_EVENT = "ipaflow.run.finished"
FAILED_ROWS_EVENT = "ipaflow.run.failed-rows"


def run_event_resources(flow_run_id, out: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """An event's resource (the flow run) and related resources (its deployment, if any, and the ``--out``,
    already redacted)."""
    from prefect.runtime import deployment, flow_run

    resource = {"prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
                "prefect.resource.name": flow_run.name or ""}
    related = [{"prefect.resource.id": f"ipaflow.out.{out}", "prefect.resource.role": "out",
                "prefect.resource.name": out}]
    if deployment.id:
        related.insert(0, {"prefect.resource.id": f"prefect.deployment.{deployment.id}",
                           "prefect.resource.role": "deployment", "prefect.resource.name": deployment.name or ""})
    return resource, related


def emit_run_events(summary: RunSummary, state_name: str, flow_run_id) -> None:
    """At a run's end: ``ipaflow.run.finished`` with its counts, and ``ipaflow.run.failed-rows`` when any row
    failed (a "Completed with failures" run is Completed: an automation on Failed never sees it)."""
    from prefect.events import emit_event

    if flow_run_id is None:
        return
    resource, related = run_event_resources(flow_run_id, summary.out)
    payload = {"state": state_name, "rows": summary.rows, "rendered": summary.rendered, "skipped": summary.skipped,
               "updated": summary.updated, "failed": summary.failed, "manifest": summary.manifest,
               "out": summary.out, "gallery": summary.gallery}
    emit_event(FINISHED_EVENT, resource=resource, related=related, payload=payload)
    if summary.failed:
        emit_event(FAILED_ROWS_EVENT, resource=resource, related=related, payload=payload)


def close_flow_run(client, flow_run_id, state_of) -> None:
    """End a flow run and every task run of it not yet in a final state in ``state_of()`` (forced): nothing of
    it is left Running in the UI."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))):
        if task_run.state is None or not task_run.state.is_final():
            client.set_task_run_state(task_run.id, state_of(), force=True)
    client.set_flow_run_state(flow_run_id, state_of(), force=True)


def last_progress(client, flow_run_id) -> tuple[Any, str]:
    """A flow run's progress artifact (None if it has none) and its last description (its status line)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    found = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    return (found[-1], found[-1].description or "") if found else (None, "")


def mark_crashed(flow_run_id: str, message: str) -> None:
    """A run that died without a word (kill -9, a lost machine), found by the run that took over its ``--out``
    lease: it and its task runs, if still open in Prefect, are marked Crashed with ``message``. Never raises."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    log = _run_logger()
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return
            close_flow_run(client, run.id, lambda: Crashed(message=message))
        log.warning("marked flow run %s (%s) Crashed: %s", run.name, flow_run_id, message)
    except Exception as exc:  # noqa: BLE001 - that run may be on another Prefect server, or gone
        log.warning("could not mark the earlier run %s Crashed: %s", flow_run_id, f"{type(exc).__name__}: {exc}")


_in_flight: RunMonitor | None = None  # the run this process renders, until it ends in a state of its own


def close_interrupted(how: str, timeout: float = CLOSE_TIMEOUT_S) -> None:
    """The command is ending on a signal (``how``: "interrupted", "terminated"): the run in flight, if any, is
    marked Cancelled with its task runs (``RunMonitor.cancel``), waiting at most ``timeout`` seconds for the
    API; nothing is left Running. A failure to reach the API is logged, never raised."""
    monitor = _in_flight
    if monitor is None or monitor._context is None:
        return

    def close() -> None:
        try:
            monitor._context.copy().run(monitor.cancel, how)
        except Exception as exc:  # noqa: BLE001 - the command ends anyway
            logging.getLogger("ipaflow.flow").warning("could not mark the run cancelled in Prefect: %s",
                                                      monitor.redact(f"{type(exc).__name__}: {exc}"))

    closing = threading.Thread(target=close, name="ipaflow-close-run", daemon=True)
    closing.start()
    closing.join(timeout)


def shown_in_ui(uri: str) -> bool:
    """The Prefect UI displays image artifacts by URL, fetched by the browser: only http(s) works."""
    return uri.startswith(("http://", "https://"))


def summary_markdown(summary: RunSummary, per_spec: dict[str, RowCounts], previews: dict[str, str], state_name: str,
                     redact: Callable[[str], str] = str) -> str:
    md = markdown_text
    times = summary.times
    sheet = summary.contact_sheet
    if not sheet:
        sheet_line = "- contact sheet: none (no image rendered yet)"
    elif shown_in_ui(sheet):
        sheet_line = f"- contact sheet: ![contact sheet]({sheet})"
    else:
        sheet_line = f"- contact sheet: {md(redact(sheet))}"
    rate = times.render_rate
    lines = [
        f"# ipaflow run {md(summary.run_id)}: {md(state_name)}",
        "",
        f"- manifest: {md(redact(summary.manifest))}",
        f"- outputs: {md(redact(summary.out))}; gallery {md(redact(summary.gallery or '(none)'))}",
        f"- rows: {summary.rows} = {summary.rendered} rendered + {summary.skipped} skipped (already done"
        + (f"; {summary.updated} records updated" if summary.updated else "")
        + f") + {summary.failed} failed" + (" (the failed-rows artifact groups them by reason)" if summary.failed
                                          else ""),
        *([_without_record_line(summary)] if summary.without_record else []),
        f"- time: {format_duration(summary.seconds)} in all = {format_duration(times.startup)} start-up"
        f" (before the flow: Prefect's API, imports, the first pipeline) + {format_duration(times.planning)}"
        f" planning + {format_duration(times.rendering)} rendering + {format_duration(times.finishing)}"
        " metadata, gallery and previews",
        f"- images: {summary.images}" + (f", {md(format_rate(rate))} while rendering" if rate else ""),
        sheet_line,
        "",
        "| spec | rows | ok | failed | images | worker seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for spec in sorted(per_spec):
        t = per_spec[spec]
        lines.append(f"| {md(spec)} | {t.rows} | {t.ok} | {t.failed} | {t.images} | {t.seconds:.1f} |")
    lines += ["", "| worker | shards | rows | busy seconds |", "| --- | ---: | ---: | ---: |"]
    for worker, done in sorted(_by_worker(summary.shards).items()):
        lines.append(f"| {md(worker)} | {len(done)} | {sum(s.rows for s in done)} | "
                     f"{sum(s.seconds for s in done):.1f} |")
    if previews:
        lines += ["", "## Previews", "", "The first outputs of each spec, by row id (the gallery has them all).", ""]
        for spec, uri in previews.items():
            lines += [f"### {md(spec)}", "", f"![{md(spec)}]({uri})", ""]
    return "\n".join(lines)


UNRECORDED_NAMED = 20  # rows without a record named in the summary artifact


def _without_record_line(summary: RunSummary) -> str:
    """The failed rows that have no record of their own, by manifest row (the first ``UNRECORDED_NAMED``)."""
    named = [line.row for line in summary.failures if not line.recorded][:UNRECORDED_NAMED]
    more = f", and {summary.without_record - len(named)} more" if summary.without_record > len(named) else ""
    return (f"- of them without a record of their own (an unusable id, a second row of an id): "
            f"{summary.without_record}: {markdown_text(', '.join(named))}{more}")


def _by_worker(shards: list[ShardLine]) -> dict[str, list[ShardLine]]:
    grouped: dict[str, list[ShardLine]] = {}
    for shard in shards:
        grouped.setdefault(shard.worker, []).append(shard)
    return grouped
