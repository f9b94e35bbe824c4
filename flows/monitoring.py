"""What an operator sees of a run, while it runs and at the end.

While it runs (every few seconds, not once per shard): the progress artifact (rows done / total, ok, failed,
skipped, rows/s, ETA), the failed-rows artifact (failed rows grouped by reason, counted, with sample ids, as
img2dataset counts a shard's errors by message), a WARNING line in the run's log per failed row (at most
FAILURE_LOG_LIMIT per shard, then one line counting the rest), and snapshots for the command line's bar
(``ipaflow.flows.progress``). At the end: the summary artifact with per-spec previews, the final state
("Completed", "Completed with failures", or "Failed" past ``--max-failures``, with counts as its message).

Shards report while they render (``ipaflow.tasks.worker.ShardProgress``, delivered by
``ipaflow.tasks.prefect_tasks``: in-process, or as Dask events). Reports only update counters here; the
flow's thread turns them into API writes in ``tick``, at most one round every ``live_interval()`` seconds,
so the API load does not grow with the number of rows, batches or workers (a SQLite-backed server refuses
writes that come too fast: "database is locked").

Manifest text reaches artifacts as escaped markdown (``markdown_text``): the UI renders table cells and
markdown artifacts as markdown with HTML, and manifests are untrusted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ipaflow.core.problems import FailedRow
from ipaflow.flows import progress
from ipaflow.flows.progress import RateMeter, Snapshot, format_duration, format_rate, status_line
from ipaflow.flows.runners import is_dask
from ipaflow.flows.summary import FailureLine, LiveUpdates, RunSummary, RunTimes, ShardLine, TooManyFailures
from ipaflow.tasks.counts import RowCounts
from ipaflow.tasks.worker import ShardProgress, ShardStats

UNKNOWN_SPEC = "(unknown spec)"  # a failed row whose spec cell names no known spec
LIVE_UPDATES_ENV = "IPAFLOW_LIVE_UPDATES"  # seconds between live writes to the Prefect API; 0: start and end only
DEFAULT_LIVE_INTERVAL = 5.0
TICK_SECONDS = 1.0  # how often the flow's thread looks at the reports (the terminal bar moves this often)
FAILURE_LOG_LIMIT = 10  # WARNING lines per shard (and for the rows that fail before rendering)
FAILURES_KEPT = 1000  # failed rows kept whole for the summary (every one is counted, grouped and journaled)
SAMPLE_IDS = 5  # per reason in the failed-rows artifact
MAX_REASONS = 50  # rows of the failed-rows artifact; the rest are summed in one
PLANNING, RENDERING, FINISHING = "planning rows", "rendering", "writing the metadata, gallery and previews"


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


# -- failed rows ----------------------------------------------------------------------------------------------

# what varies from row to row within one reason: quoted values, paths and URIs, numbers
_VARYING = re.compile(r"""'[^']*'|"[^"]*"|(?:[A-Za-z][\w+.-]*://|~?/|\.{1,2}/|[A-Za-z]:\\)\S*|\d+""")


@dataclass
class ReasonGroup:
    column: str
    example: str  # the reason of the group's first row, as it was
    rows: int = 0
    specs: set[str] = field(default_factory=set)
    sample: list[str] = field(default_factory=list)


class FailureGroups:
    """Failed rows grouped by problem: the same column and the same reason but for quoted values, paths, URIs
    and numbers ("ip_image: not found: <path>" is one group, whatever the path). Each group shows its first
    row's reason as it was. A row with two problems counts under both."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], ReasonGroup] = {}

    def add(self, failed: FailedRow, redact: Callable[[str], str]) -> None:
        for problem in failed.problems:
            key = (problem.column, _VARYING.sub("…", problem.reason))
            group = self.groups.setdefault(key, ReasonGroup(problem.column, redact(problem.reason)))
            group.rows += 1
            group.specs.add(failed.spec or UNKNOWN_SPEC)
            if len(group.sample) < SAMPLE_IDS:
                group.sample.append(failed.row)

    def table(self) -> list[dict]:
        """The artifact's rows, most frequent reason first, every text cell escaped."""
        ranked = sorted(self.groups.values(), key=lambda g: (-g.rows, g.column, g.example))
        table = [{"rows": g.rows, "column": markdown_text(g.column), "reason (first row's)": markdown_text(g.example),
                  "specs": markdown_text(", ".join(sorted(g.specs))), "sample ids": markdown_text(", ".join(g.sample))}
                 for g in ranked[:MAX_REASONS]]
        if rest := ranked[MAX_REASONS:]:
            table.append({"rows": sum(g.rows for g in rest), "column": "",
                          "reason (first row's)": f"{len(rest)} other reasons", "specs": "", "sample ids": ""})
        return table


# -- the run ----------------------------------------------------------------------------------------------------

def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run
        return logging.getLogger("ipaflow.flow")


def _artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    cleaned = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(part for part in cleaned.split("-") if part)[:100] or "ipaflow"


class RunMonitor:
    """Counts the rows of a run as they finish and shows the count: the Prefect artifacts and run log, and the
    snapshots of ``ipaflow.flows.progress``. Every method but ``report`` runs in the flow's thread."""

    def __init__(self, name: str, redact: Callable[[str], str] = str, interval: float | None = None):
        self.name = name
        self.redact = redact  # the run's storage redactor: artifacts and logs carry no credentials
        self.interval = live_interval() if interval is None else interval
        self.log = _run_logger()
        self.started = self._phase_start = time.monotonic()
        self.phase = PLANNING
        self.total: int | None = None
        # finished shards, rows failed outside shards, rows already done (and updated) before this run
        self.counts = RowCounts()
        self.failures: list[FailedRow] = []  # the first FAILURES_KEPT failed rows, in the order seen
        self.recorded = 0  # every failed row, counted once
        self.groups = FailureGroups()
        self.per_spec: dict[str, RowCounts] = {}
        self.shards: list[ShardLine] = []  # per finished shard: where, when, how many rows
        self.times: dict[str, float] = {}  # the run's stages, seconds
        self.api_writes = 0  # live-update rounds written, and the flow-thread seconds they took
        self.api_seconds = 0.0
        self.reports = 0  # reports received from running shards
        self._lock = threading.Lock()
        self._inbox: list[ShardProgress] = []
        self._live: dict[str, ShardProgress] = {}  # running shards' latest reports
        self._finished: set[str] = set()
        self._seen: set[tuple[str, int | None]] = set()
        self._logged: dict[str, int] = {}  # WARNING lines per shard
        self._unlogged: dict[str, int] = {}
        self._meter = RateMeter()
        self._worker_rows = 0  # rows rendered or failed by shards (the rate's count)
        self._progress_id = None
        self._failed_id = None
        self._written: tuple = ()
        self._failures_written = 0
        self._last_write = float("-inf")
        self._warned_api = False

    # -- what happens ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """The progress artifact, at 0, so the run shows one from its first second."""
        from prefect.artifacts import create_progress_artifact

        snapshot = self.snapshot()
        self._progress_id = create_progress_artifact(progress=0.0, key=_artifact_key(f"{self.name}-progress"),
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

    def planned(self, total: int) -> None:
        """The rows the run will judge (rows already done are counted as the manifest streams)."""
        self.total = self.counts.rows = total
        self.set_phase(RENDERING)

    def set_phase(self, phase: str) -> None:
        now = time.monotonic()
        self.times[self.phase] = self.times.get(self.phase, 0.0) + now - self._phase_start
        self.phase, self._phase_start = phase, now
        self.tick()

    def stage_times(self) -> dict[str, float]:
        """Seconds: ``startup`` (from the command's start to the flow's, when a command runs the flow),
        ``planning``, ``rendering``, ``finishing`` (so far), and ``seconds`` in all (start-up included)."""
        now = time.monotonic()
        times = {**self.times, self.phase: self.times.get(self.phase, 0.0) + now - self._phase_start}
        command = progress.command_started()
        startup = self.started - command if command is not None and command <= self.started else 0.0
        return {"startup": round(startup, 3), "planning": round(times.get(PLANNING, 0.0), 3),
                "rendering": round(times.get(RENDERING, 0.0), 3), "finishing": round(times.get(FINISHING, 0.0), 3),
                "seconds": round(progress.elapsed_since_start(now, fallback=self.started), 3)}

    @property
    def failed_so_far(self) -> int:
        """Failed rows, running shards' included (what ``--max-failures`` counts)."""
        return self.counts.failed + sum(p.failed for p in self._live.values())

    def row_failed(self, failed: FailedRow) -> None:
        """A row that failed outside a finished shard: before reaching a worker (validation, missing input),
        or in a shard task that failed after its retries or never started."""
        self.counts.failed += 1
        self.per_spec.setdefault(failed.spec or UNKNOWN_SPEC, RowCounts()).add(RowCounts(rows=1, failed=1))
        self._record_failure(failed, "planning")

    def report(self, report: ShardProgress | dict) -> None:
        """A running shard's report (any thread: a task's thread, or the Dask client's)."""
        with self._lock:
            self._inbox.append(report)

    def shard_finished(self, stats: ShardStats) -> None:
        self._drain()
        self._finished.add(stats.name)
        self._live.pop(stats.name, None)
        counted = stats.run_counts()
        self.per_spec.setdefault(stats.spec, RowCounts()).add(counted)
        self._add_shard(counted, stats)
        for failed in stats.failures:
            self._record_failure(failed, stats.name)
        self.shards.append(ShardLine.model_validate(stats.model_dump(include=set(ShardLine.model_fields))))
        self.log.info("%s on %s: %d ok, %d failed in %.1fs", stats.name, stats.worker, stats.ok, stats.failed,
                      stats.seconds)
        self.close_log(stats.name)
        self.tick()

    def shard_lost(self, name: str) -> None:
        """A shard task that failed after its retries: its last report's counts stand (its journaled rows
        are done; the flow fails the others, ``row_failed``)."""
        self._drain()
        self._finished.add(name)
        if last := self._live.pop(name, None):
            self._add_shard(last.run_counts(), last)

    def _add_shard(self, counted: RowCounts, shard: ShardStats | ShardProgress) -> None:
        """A shard's rows into the run's counts (not its rows: the run counts manifest rows, ``planned``)."""
        self.counts.add(counted.model_copy(update={"rows": 0, "seconds": 0.0}))
        self._worker_rows += shard.ok + shard.failed

    def close_log(self, where: str) -> None:
        """One line for the failed rows of ``where`` that were not logged one by one."""
        if count := self._unlogged.pop(where, 0):
            self.log.warning("%s: %d more failed rows (the %s artifact groups them by reason)", where, count,
                             _artifact_key(f"{self.name}-failed-rows"))

    # -- counting -------------------------------------------------------------------------------------------

    def _record_failure(self, failed: FailedRow, where: str) -> None:
        if where != "planning":  # a retried shard reports its failed rows again (planning reports each row once)
            key = (failed.row, failed.index)
            if key in self._seen:
                return
            self._seen.add(key)
        self.recorded += 1
        if len(self.failures) < FAILURES_KEPT:  # all are counted and grouped; the first ones are kept whole
            self.failures.append(failed)
        self.groups.add(failed, self.redact)
        logged = self._logged.get(where, 0)
        if logged < FAILURE_LOG_LIMIT:
            self._logged[where] = logged + 1
            spec = f" [spec {failed.spec}]" if failed.spec else ""
            self.log.warning("row %s failed: %s%s", failed.row, self.redact(failed.error), spec)
        else:
            self._unlogged[where] = self._unlogged.get(where, 0) + 1

    def _drain(self) -> None:
        with self._lock:
            reports, self._inbox = self._inbox, []
        self.reports += len(reports)
        for report in reports:
            if isinstance(report, dict):
                report = ShardProgress.model_validate(report)
            if report.shard in self._finished:  # a late report; the shard's stats count
                continue
            self._live[report.shard] = report
            for failed in report.new_failures:
                self._record_failure(failed, report.shard)

    def snapshot(self) -> Snapshot:
        live = list(self._live.values())
        now_counts = sum((p.run_counts() for p in live), self.counts.counts())
        ok, failed = now_counts.ok, now_counts.failed
        done = self.counts.skipped + ok + failed
        phase = self.phase
        if phase == RENDERING and live and all(p.phase == "loading pipeline" for p in live):
            phase = f"loading pipeline {live[0].spec}"
        remaining = self.total - done if self.total is not None else 0
        now = time.monotonic()
        return Snapshot(phase=phase, total=self.total, done=done, ok=ok, failed=failed, skipped=self.counts.skipped,
                        rate=self._meter.rate(), eta=self._meter.eta(remaining) if self.total is not None else None,
                        elapsed=progress.elapsed_since_start(now, fallback=self.started))

    # -- showing --------------------------------------------------------------------------------------------

    def tick(self, force: bool = False) -> None:
        """Apply the shards' reports, tell the listeners, and write to the API when due (every ``interval``
        seconds, when something changed) or when ``force``d."""
        self._drain()
        if self.total is not None:
            live_rows = sum(p.ok + p.failed for p in self._live.values())
            self._meter.add(self._worker_rows + live_rows)
        snapshot = self.snapshot()
        progress.publish(snapshot)
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
        from prefect.artifacts import create_table_artifact
        from prefect.client.schemas.actions import ArtifactUpdate

        count = self.recorded
        reasons = len(self.groups.groups)
        when = "" if final else f" so far (at {datetime.now(timezone.utc):%H:%M:%S} UTC)"
        description = (f"{count} failed row{'s' if count != 1 else ''}{when}, {reasons} "
                       f"reason{'s' if reasons != 1 else ''}; every row's reason is in the metadata and the gallery")
        table = self.groups.table()
        if self._failed_id is None:
            self._failed_id = create_table_artifact(table=table, key=_artifact_key(f"{self.name}-failed-rows"),
                                                    description=description)
        else:
            client.update_artifact(self._failed_id, ArtifactUpdate(data=json.dumps(table), description=description))
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

    def summary(self, **where: Any) -> RunSummary:
        """The run summary: every count from this monitor's ``counts``; ``where`` names the run and its files
        (``run_id``, ``manifest``, ``out``, ``gallery``, ``contact_sheet``, ``metadata_bytes_written``,
        ``first_shard_s``)."""
        times = self.stage_times()
        seconds = times.pop("seconds")  # from the command's start when a command runs the flow
        rendered = self.counts.ok
        rate = round(rendered / times["rendering"], 4) if times["rendering"] else None
        return RunSummary(
            **where, rows=self.counts.rows, rendered=rendered, skipped=self.counts.skipped,
            updated=self.counts.updated, failed=self.counts.failed, images=self.counts.images, seconds=seconds,
            times=RunTimes(**times, render_rate=rate),
            failures=[FailureLine(id=f.row, spec=f.spec, error=f.error) for f in self.failures],
            shards=self.shards,
            live_updates=LiveUpdates(shard_reports=self.reports, api_writes=self.api_writes,
                                     api_seconds=round(self.api_seconds, 3)))

    def finish(self, summary: RunSummary, previews: dict[str, str], max_failures: int | None):
        """The final artifacts (progress at 100, failed rows, the summary with its previews, the contact sheet
        when the UI can load it) and the run's final state, whose data is ``summary``."""
        from prefect.artifacts import create_image_artifact, create_markdown_artifact
        from prefect.client.orchestration import get_client
        from prefect.states import Completed, Failed

        self.set_phase("finished")
        snapshot = self.snapshot()  # self.times holds every stage now
        self._write(snapshot)
        with get_client(sync_client=True) as client:
            if self.failures:
                self._write_failed_rows(client, final=True)
        sheet = summary.contact_sheet
        if sheet and shown_in_ui(sheet):
            create_image_artifact(image_url=sheet, key=_artifact_key(f"{self.name}-contact-sheet"),
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
                                 key=_artifact_key(f"{self.name}-summary"), description="ipaflow run summary")
        state.data = TooManyFailures(state.message, summary) if stopped else summary
        return state


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


def _by_worker(shards: list[ShardLine]) -> dict[str, list[ShardLine]]:
    grouped: dict[str, list[ShardLine]] = {}
    for shard in shards:
        grouped.setdefault(shard.worker, []).append(shard)
    return grouped
