"""Counting a run's rows as they finish: shards' reports (any thread) and results, rows that fail before
rendering, rows already done; the failed rows kept, grouped by reason and logged; the stage times; the run
summary (``flows.summary``), every count from ``RunCounter.counts``. Nothing here talks to Prefect's API: the
monitor (``flows.monitoring``) publishes what is counted here."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipaflow.core.problems import FailedRow
from ipaflow.flows import progress
from ipaflow.flows.progress import ProgressEstimator, Snapshot
from ipaflow.flows.summary import FailureLine, LiveUpdates, RunSummary, RunTimes, ShardLine
from ipaflow.tasks.counts import RowCounts
from ipaflow.tasks.worker import ShardProgress, ShardStats

UNKNOWN_SPEC = "(unknown spec)"  # a failed row whose spec cell names no known spec
FAILURE_LOG_LIMIT = 10  # WARNING lines per shard (and for the rows that fail before rendering)
FAILURES_KEPT = 1000  # failed rows kept whole for the summary (every one is counted, grouped and journaled)
SAMPLE_IDS = 5  # per reason in the failed-rows artifact
PLANNING, RENDERING, FINISHING = "planning rows", "rendering", "writing the metadata, gallery and previews"


# what varies from row to row within one reason: quoted values, paths and URIs, numbers
_VARYING = re.compile(r"""'[^']*'|"[^"]*"|(?:[A-Za-z][\w+.-]*://|~?/|\.{1,2}/|[A-Za-z]:\\)\S*|\d+""")


@dataclass
class ReasonGroup:
    column: str
    example: str  # the reason of the group's first row, as it was
    rows: int = 0
    specs: set[str] = field(default_factory=set)
    sample: list[str] = field(default_factory=list)


def _group_key(problem) -> tuple[str, str]:
    """The group a problem counts in: its column and its reason with the varying parts (paths, numbers) masked."""
    return problem.column, _VARYING.sub("…", problem.reason)


class FailureGroups:
    """Failed rows grouped by problem: the same column and the same reason but for quoted values, paths, URIs
    and numbers ("ip_image: not found: <path>" is one group, whatever the path). Each group shows its first
    row's reason as it was. A row with two problems counts under both."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], ReasonGroup] = {}

    def add(self, failed: FailedRow, redact: Callable[[str], str], label: str | None = None) -> None:
        """Count ``failed`` under each of its problems; ``label`` names it in the samples (default: its id)."""
        for problem in failed.problems:
            key = _group_key(problem)
            group = self.groups.setdefault(key, ReasonGroup(problem.column, redact(problem.reason)))
            group.rows += 1
            group.specs.add(failed.spec or UNKNOWN_SPEC)
            if len(group.sample) < SAMPLE_IDS:
                group.sample.append(label or failed.row)

    def discard(self, failed: FailedRow, label: str | None = None) -> None:
        """Take back a row ``add`` counted (a retried shard rendered it after all)."""
        for problem in failed.problems:
            key = _group_key(problem)
            group = self.groups.get(key)
            if group is None:
                continue
            group.rows -= 1
            if (label or failed.row) in group.sample:
                group.sample.remove(label or failed.row)
            if group.rows <= 0:
                del self.groups[key]


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    cleaned = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(part for part in cleaned.split("-") if part)[:100] or "ipaflow"



class RunCounter:
    """Counts the rows of a run as they finish. Every method but ``report`` runs in the flow's thread.

    Args:
        name: the run's name (the manifest's), as its artifacts and log lines say it.
        redact: the run's storage redactor: what is logged carries no credentials.
        log: where failed rows are said (the run's logger).
    """

    def __init__(self, name: str, redact: Callable[[str], str] = str, log: logging.Logger | None = None):
        self.name = name
        self.redact = redact
        self.log = log or logging.getLogger("ipaflow.flow")
        self.started = self._phase_start = time.monotonic()
        self.phase = PLANNING
        self.total: int | None = None
        # finished shards, rows failed outside shards, rows already done (and updated) before this run
        self.counts = RowCounts()
        self.failures: list[FailureLine] = []  # the first FAILURES_KEPT failed rows, in the order seen
        self.recorded = 0  # every failed row, counted once
        self.without_record = 0  # failed rows with no record of their own (an unusable id, a duplicate id's second)
        self.place: Callable[[int], str | None] = lambda index: None  # a folder manifest's file and row
        self.groups = FailureGroups()
        self.per_spec: dict[str, RowCounts] = {}
        self.shards: list[ShardLine] = []  # per finished shard: where, when, how many rows
        self.times: dict[str, float] = {}  # the run's stages, seconds
        self.reports = 0  # reports received from running shards
        self.api_writes = 0  # live-update rounds written, and the flow-thread seconds they took (the monitor's)
        self.api_seconds = 0.0
        self._lock = threading.Lock()
        self._inbox: list[tuple[float, ShardProgress | dict]] = []
        self._live: dict[str, ShardProgress] = {}  # running shards' latest reports
        self._finished: set[str] = set()
        self._seen: set[tuple[str, int | None]] = set()  # failed rows of shards, counted
        self._reported: dict[str, dict[tuple[str, int | None], FailedRow]] = {}  # running shards' failed rows
        self._duplicate_ids: set[str] = set()  # ids of rows failed as duplicates (the first one's record stands)
        self._logged: dict[str, int] = {}  # WARNING lines per shard
        self._unlogged: dict[str, int] = {}
        self.estimator = ProgressEstimator()  # the one rate and ETA (the terminal's and the UI's)
        self._instant = 0  # rows failed without a worker (planning, lost shards): not in the rate

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
        self._instant += 1
        self.per_spec.setdefault(failed.spec or UNKNOWN_SPEC, RowCounts()).add(RowCounts(rows=1, failed=1))
        self._record_failure(failed, "planning")

    def report(self, report: ShardProgress | dict) -> None:
        """A running shard's report (any thread: a task's thread, or the Dask client's)."""
        with self._lock:
            self._inbox.append((time.monotonic(), report))  # the batch's time, for the estimator

    def shard_finished(self, stats: ShardStats) -> None:
        self._drain()
        self._finished.add(stats.name)
        self._live.pop(stats.name, None)
        counted = stats.run_counts()
        self.per_spec.setdefault(stats.spec, RowCounts()).add(counted)
        self._add_shard(counted)
        for failed in stats.failures:
            self._record_failure(failed, stats.name)
        self._take_back(stats.name, {(f.row, f.index) for f in stats.failures})
        self.shards.append(ShardLine.model_validate(stats.model_dump(include=set(ShardLine.model_fields))))
        self.log.info("%s on %s: %d ok, %d failed in %.1fs", stats.name, stats.worker, stats.ok, stats.failed,
                      stats.seconds)
        self.close_log(stats.name)
        self.tick()

    def shard_lost(self, name: str, ok: set[str], failed: set[str]) -> None:
        """A shard task that failed after its retries: the rows it journaled count, ``ok`` and ``failed`` ids
        (its reports may name rows whose records were never written: the flow fails those, ``row_failed``)."""
        self._drain()
        self._finished.add(name)
        self._live.pop(name, None)
        self._take_back(name, None, keep=failed - ok)
        self._add_shard(RowCounts(ok=len(ok), failed=len(failed - ok)))

    def _take_back(self, shard: str, final: set[tuple[str, int | None]] | None, keep: set[str] = frozenset()) -> None:
        """Failed rows a shard reported that are not failed in the end: not in its ``final`` failures (a retry
        rendered them), or, for a lost shard, not journaled failed (``keep``; the flow fails them again)."""
        for key, failed in self._reported.pop(shard, {}).items():
            if key not in final if final is not None else failed.row not in keep:
                self._seen.discard(key)
                self.recorded -= 1
                self.without_record -= self._has_no_record(failed, taking_back=True)
                self.groups.discard(failed, self._label(failed))
                self.failures = [line for line in self.failures if (line.id, line.index) != key]

    def _add_shard(self, counted: RowCounts) -> None:
        """A shard's rows into the run's counts (not its rows: the run counts manifest rows, ``planned``)."""
        self.counts.add(counted.model_copy(update={"rows": 0, "seconds": 0.0}))

    def close_log(self, where: str) -> None:
        """One line for the failed rows of ``where`` that were not logged one by one."""
        if count := self._unlogged.pop(where, 0):
            self.log.warning("%s: %d more failed rows (the %s artifact groups them by reason)", where, count,
                             artifact_key(f"{self.name}-failed-rows"))

    # -- counting -------------------------------------------------------------------------------------------

    def _label(self, failed: FailedRow) -> str:
        """A failed row as the artifacts list it: its id and where it lies in the manifest (``a (manifest row
        3)``, ``a (part-0.parquet row 3)``); a row whose id is unusable by where it lies alone."""
        if failed.index is None:
            return failed.row
        where = self.place(failed.index) or f"manifest row {failed.index}"
        return where if failed.row.startswith("#") else f"{failed.row} ({where})"

    def _has_no_record(self, failed: FailedRow, taking_back: bool = False) -> bool:
        """An unusable id has no record; of rows sharing an id, the first one failed holds it. (Shards never
        fail a row for its id: taking one of their rows back is about unusable ids alone.)"""
        if failed.row.startswith("#"):
            return True
        if not taking_back and any(p.column == "id" and p.reason.startswith("duplicate id") for p in failed.problems):
            if failed.row in self._duplicate_ids:
                return True
            self._duplicate_ids.add(failed.row)
        return False

    def _record_failure(self, failed: FailedRow, where: str) -> None:
        if where != "planning":  # a retried shard reports its failed rows again (planning reports each row once)
            key = (failed.row, failed.index)
            if key in self._seen:
                return
            self._seen.add(key)
            if where not in self._finished:  # reported by a running shard: taken back if a retry renders it
                self._reported.setdefault(where, {})[key] = failed
        self.recorded += 1
        label = self._label(failed)
        unrecorded = self._has_no_record(failed)
        self.without_record += unrecorded
        if len(self.failures) < FAILURES_KEPT:  # all are counted and grouped; the first ones are kept whole
            self.failures.append(FailureLine(id=failed.row, spec=failed.spec, error=self.redact(failed.error),
                                             index=failed.index, row=label, recorded=not unrecorded))
        self.groups.add(failed, self.redact, label)
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
        for arrived, report in reports:
            if isinstance(report, dict):
                report = ShardProgress.model_validate(report)
            if report.shard in self._finished:  # a late report; the shard's stats count
                continue
            self._live[report.shard] = report
            for failed in report.new_failures:
                self._record_failure(failed, report.shard)
            if self.total is not None:
                self.estimator.observe(self._worker_done(), arrived)

    def _worker_done(self) -> int:
        """Rows the workers have finished in this run (rendered or failed): the estimator's count."""
        live = sum((p.run_counts() for p in self._live.values()), RowCounts())
        return self.counts.ok + self.counts.failed + live.ok + live.failed - self._instant

    def snapshot(self, now: float | None = None) -> Snapshot:
        now = time.monotonic() if now is None else now
        live = list(self._live.values())
        now_counts = sum((p.run_counts() for p in live), self.counts.counts())
        ok, failed = now_counts.ok, now_counts.failed
        done = self.counts.skipped + ok + failed
        phase = self.phase
        if phase == RENDERING and live and all(p.phase == "loading pipeline" for p in live):
            phase = f"loading pipeline {live[0].spec}"
        known = self.total is not None
        return Snapshot(phase=phase, total=self.total, done=done, ok=ok, failed=failed, skipped=self.counts.skipped,
                        rate=self.estimator.rate(now), eta=self.estimator.eta(self.total - done, now) if known else None,
                        elapsed=progress.elapsed_since_start(now, fallback=self.started))

    def update(self) -> Snapshot:
        """Apply the shards' reports, feed the progress estimator and tell the listeners (``flows.progress``)."""
        self._drain()
        now = time.monotonic()
        if self.total is not None:
            self.estimator.observe(self._worker_done(), now)  # a finished shard's last rows
        snapshot = self.snapshot(now)
        progress.publish(snapshot)
        return snapshot

    def tick(self, force: bool = False) -> None:
        """What the flow's thread calls every ``TICK_SECONDS`` and at each phase: ``update`` (the monitor also
        writes to the Prefect API)."""
        self.update()

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
            without_record=self.without_record, failures=self.failures,
            shards=self.shards,
            live_updates=LiveUpdates(shard_reports=self.reports, api_writes=self.api_writes,
                                     api_seconds=round(self.api_seconds, 3)))
