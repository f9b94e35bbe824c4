"""The run summary: what ``render_manifest`` returns, what the command line prints, what the summary artifact and
the flow run's final state carry, and what the benchmarks read. Every count in it comes from one place, the
run monitor's ``RowCounts`` (``flows.monitoring``); no text in it holds a credential (the flow redacts it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class RunTimes(BaseModel):
    """Seconds spent in each stage of a run."""

    startup: float = Field(0.0, description="from the command's start to the flow's (0 when the flow is called)")
    planning: float = Field(0.0, description="judging rows and cutting shards before rendering started")
    rendering: float = Field(0.0, description="from the first shard submitted to the last one finished")
    finishing: float = Field(0.0, description="the metadata fold, the gallery and the previews")
    render_rate: float | None = Field(None, description="rows rendered per second of rendering (None: none)")


class FailureLine(BaseModel):
    """One failed row as the summary lists it."""

    id: str = Field(description="the row's id, or #<manifest index> when the id itself is unusable")
    spec: str | None = Field(None, description="the row's spec, when it names a known one")
    error: str = Field(description="every problem, 'column: reason; ...', as its record's error")
    index: int | None = Field(None, description="its 0-based manifest row, when known")
    row: str = Field("", description="how the artifacts and the gallery name it: id and manifest row (file and "
                                     "row in a folder manifest); the manifest row alone for an unusable id")
    recorded: bool = Field(True, description="False when it has no record of its own (an unusable id, or a second "
                                             "row of a duplicate id): `ipaflow records` has no line for it")


class ShardLine(BaseModel):
    """One finished shard: where and when it ran, and its counts."""

    name: str
    spec: str
    worker: str = Field(description="host:pid, or the Dask worker's address")
    rows: int
    ok: int
    failed: int
    seconds: float
    started_at: float = Field(description="wall-clock time (time.time())")
    finished_at: float


class LiveUpdates(BaseModel):
    """What the live updates of the Prefect UI cost."""

    shard_reports: int = Field(description="progress reports received from running shards")
    api_writes: int = Field(description="rounds of writes to the Prefect API")
    api_seconds: float = Field(description="seconds the flow's thread spent on them")


class RunSummary(BaseModel):
    """What a run did. ``rows = rendered + skipped + failed`` for a run that was not stopped part-way.

    Mapping access (``summary["rendered"]``) reads the same fields, for scripts written when the summary was a
    dict; read attributes in new code.
    """

    run_id: str = Field(description="this run's id: records, journal files and parts carry it")
    manifest: str = Field(description="the manifest's URI")
    out: str = Field(description="the output folder's URI, {date} and {datetime} filled in")
    gallery: str | None = Field(description="the URI of index.html")
    contact_sheet: str | None = Field(description="the URI of the contact sheet (None: no image rendered yet)")
    rows: int = Field(description="manifest rows judged (up to --limit)")
    rendered: int = Field(description="rows rendered by this run (an ok record written)")
    skipped: int = Field(description="rows already done in --out, not rendered again")
    updated: int = Field(description="done rows whose records took new passthrough values (not rendered again)")
    failed: int = Field(description="rows that failed, before or while rendering")
    without_record: int = Field(0, description="failed rows with no record of their own (an unusable id, or a "
                                               "second row of a duplicate id): the records hold failed - this")
    images: int = Field(description="outputs written (images, or one video per row)")
    seconds: float = Field(description="the run's seconds, from the command's start when a command ran it")
    times: RunTimes
    failures: list[FailureLine] = Field(description="the first failed rows (every one is in the metadata)")
    shards: list[ShardLine]
    metadata_bytes_written: int = Field(description="bytes of metadata parts this run's fold wrote")
    first_shard_s: float | None = Field(description="seconds from the run's start to its first shard submitted")
    live_updates: LiveUpdates

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


class TooManyFailures(RuntimeError):
    """The run stopped at ``--max-failures``: the data of its Failed state (``render_manifest(...)`` raises it;
    ``.summary`` is the run summary)."""

    def __init__(self, message: str, summary: RunSummary):
        super().__init__(message)
        self.summary = summary

    def __reduce__(self):
        return type(self), (self.args[0], self.summary)


def summary_of(state) -> RunSummary:
    """The run summary a finished render flow's state holds (its Failed state's too)."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, TooManyFailures):
        return result.summary
    if isinstance(result, BaseException):  # the flow itself failed: its exception, as a plain call raises it
        raise result
    return result
