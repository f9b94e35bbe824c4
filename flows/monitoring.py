"""What a run shows while in flight and at the end: Prefect artifacts (progress, failed rows, summary, contact
sheet), tags on the flow run, the run logger, and an optional in-process listener (the CLI's progress bar)."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ipaflow.core.problems import FailedRow
from ipaflow.core.storage import Storage, join
from ipaflow.tasks.worker import ShardStats

UNKNOWN_SPEC = "(unknown spec)"  # a failed row whose spec cell names no known spec
CONTACT_SHEET_IMAGES = 64  # the first outputs by id
CONTACT_SHEET_CELL = 128  # pixels per thumbnail
CONTACT_SHEET_COLUMNS = 8

ProgressListener = Callable[[int, int], None]  # (rows finished, rows to finish)
_listeners: list[ProgressListener] = []


def add_listener(listener: ProgressListener) -> None:
    _listeners.append(listener)


def remove_listener(listener: ProgressListener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def _artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    cleaned = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(part for part in cleaned.split("-") if part)[:100] or "ipaflow"


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run
        return logging.getLogger("ipaflow.flow")


@dataclass
class SpecTally:
    rows: int = 0
    ok: int = 0
    failed: int = 0
    images: int = 0
    seconds: float = 0.0


@dataclass
class RunMonitor:
    """Counts rows as shards finish and mirrors the count to Prefect and to listeners."""

    name: str
    total: int
    redact: Callable[[str], str] = str  # the run's storage redactor: artifacts and logs carry no credentials
    done: int = 0
    ok: int = 0
    failed: int = 0
    images: int = 0
    failures: list[FailedRow] = field(default_factory=list)
    per_spec: dict[str, SpecTally] = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)  # per finished shard: where, when, how many rows
    _artifact_id: object = None

    @property
    def log(self):
        return _logger()

    def start(self) -> None:
        from prefect.artifacts import create_progress_artifact

        self._artifact_id = create_progress_artifact(
            progress=0.0, key=_artifact_key(f"{self.name}-progress"), description=self._progress_text()
        )
        self._notify()

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

    def _progress_text(self) -> str:
        return f"{self.done}/{self.total} rows finished ({self.ok} ok, {self.failed} failed)"

    def _notify(self) -> None:
        for listener in list(_listeners):
            listener(self.done, self.total)

    def row_failed(self, failed: FailedRow) -> None:
        """A row that failed outside a finished shard: before reaching a worker (validation, missing input),
        or in a shard task that failed after its retries or never started."""
        self.done += 1
        self.failed += 1
        self.failures.append(failed)
        tally = self.per_spec.setdefault(failed.spec or UNKNOWN_SPEC, SpecTally())
        tally.rows += 1
        tally.failed += 1

    def shard_finished(self, stats: ShardStats) -> None:
        from prefect.artifacts import update_progress_artifact

        tally = self.per_spec.setdefault(stats.spec, SpecTally())
        tally.rows += stats.rows
        tally.ok += stats.ok + stats.skipped
        tally.failed += stats.failed
        tally.images += stats.images
        tally.seconds += stats.seconds
        self.done += stats.ok + stats.failed + stats.skipped
        self.ok += stats.ok + stats.skipped
        self.failed += stats.failed
        self.images += stats.images
        self.failures.extend(stats.failures)
        self.shards.append(stats.model_dump(include={"name", "spec", "worker", "rows", "ok", "failed", "seconds",
                                                     "started_at", "finished_at"}))
        self.log.info("%s on %s: %d ok, %d failed in %.1fs", stats.name, stats.worker, stats.ok, stats.failed,
                      stats.seconds)
        if self._artifact_id is not None and self.total:
            update_progress_artifact(self._artifact_id, progress=100.0 * self.done / self.total,
                                     description=self._progress_text())
        self._notify()

    def finish(self, summary: dict) -> None:
        """Final artifacts: failed rows as a table, the run summary as markdown, and the contact sheet as an
        image where the UI can load it (an http(s) URL; it cannot read s3:// or local files)."""
        from prefect.artifacts import (
            create_image_artifact,
            create_markdown_artifact,
            create_table_artifact,
            update_progress_artifact,
        )

        if self._artifact_id is not None:
            update_progress_artifact(self._artifact_id, progress=100.0, description=self._progress_text())
        if self.failures:
            create_table_artifact(
                table=[{"id": f.row, "spec": f.spec or UNKNOWN_SPEC, "error": self.redact(f.error)}
                       for f in self.failures[:1000]],
                key=_artifact_key(f"{self.name}-failed-rows"),
                description=f"{len(self.failures)} failed rows" + (" (first 1000)" if len(self.failures) > 1000 else ""),
            )
        sheet = summary["contact_sheet"]
        if sheet and shown_in_ui(sheet):
            create_image_artifact(image_url=sheet, key=_artifact_key(f"{self.name}-contact-sheet"),
                                  description=f"the first {CONTACT_SHEET_IMAGES} outputs")
        create_markdown_artifact(markdown=summary_markdown(summary, self.per_spec, self.redact),
                                 key=_artifact_key(f"{self.name}-summary"), description="ipaflow run summary")


def shown_in_ui(uri: str) -> bool:
    """The Prefect UI displays image artifacts by URL, fetched by the browser: only http(s) works."""
    return uri.startswith(("http://", "https://"))


def summary_markdown(summary: dict, per_spec: dict[str, SpecTally], redact: Callable[[str], str] = str) -> str:
    rate = summary["images"] / summary["seconds"] if summary["seconds"] else 0.0
    sheet = summary["contact_sheet"]
    if not sheet:
        sheet_line = "- contact sheet: none (no image rendered yet)"
    elif shown_in_ui(sheet):
        sheet_line = f"- contact sheet: ![contact sheet]({sheet})"
    else:
        sheet_line = f"- contact sheet: `{redact(sheet)}` (open it from storage: the UI shows only http(s) images)"
    lines = [
        f"# ipaflow run `{summary['run_id']}`",
        "",
        f"- manifest: `{redact(summary['manifest'])}`",
        f"- outputs: `{redact(summary['out'])}`, gallery `{redact(summary['gallery'] or '-')}`",
        f"- rows: {summary['rows']} = {summary['rendered']} rendered + {summary['skipped']} skipped (already done)"
        f" + {summary['failed']} failed",
        f"- images: {summary['images']} in {summary['seconds']:.1f}s ({rate:.2f} images/s)",
        sheet_line,
        "",
        "| spec | rows | ok | failed | images | worker seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for spec in sorted(per_spec):
        t = per_spec[spec]
        lines.append(f"| {spec} | {t.rows} | {t.ok} | {t.failed} | {t.images} | {t.seconds:.1f} |")
    lines += ["", "| worker | shards | rows | busy seconds |", "| --- | ---: | ---: | ---: |"]
    for worker, done in sorted(_by_worker(summary["shards"]).items()):
        lines.append(f"| {worker} | {len(done)} | {sum(s['rows'] for s in done)} | "
                     f"{sum(s['seconds'] for s in done):.1f} |")
    return "\n".join(lines)


def _by_worker(shards: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for shard in shards:
        grouped.setdefault(shard["worker"], []).append(shard)
    return grouped


def write_contact_sheet(storage: Storage, out: str, records: list[dict]) -> str | None:
    """``<out>/contact-sheet.png``: the first outputs (by row id) as one PNG grid, to judge a run at a glance
    in any image viewer or bucket browser; the first frame of a video. None when nothing is rendered."""
    import PIL.Image
    import PIL.ImageOps

    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: r["id"])
    uris = [uri for record in ok for uri in record["outputs"]][:CONTACT_SHEET_IMAGES]

    def thumbnail(uri: str):
        try:
            with PIL.Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
                return PIL.ImageOps.contain(image.convert("RGB"), (CONTACT_SHEET_CELL, CONTACT_SHEET_CELL))
        except Exception as exc:  # noqa: BLE001 - one unreadable output must not cost the sheet
            _logger().warning("contact sheet: skipping %s: %s", storage.redact(uri), storage.redact(exc))
            return None

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="ipaflow-sheet") as pool:  # remote reads overlap
        thumbs = [thumb for thumb in pool.map(thumbnail, uris) if thumb is not None]
    if not thumbs:
        return None
    columns = min(CONTACT_SHEET_COLUMNS, len(thumbs))
    cell = CONTACT_SHEET_CELL
    sheet = PIL.Image.new("RGB", (columns * cell, math.ceil(len(thumbs) / columns) * cell), "white")
    for number, thumb in enumerate(thumbs):
        row, column = divmod(number, columns)
        sheet.paste(thumb, (column * cell + (cell - thumb.width) // 2, row * cell + (cell - thumb.height) // 2))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    uri = join(out, "contact-sheet.png")
    storage.write_atomic(uri, buffer.getvalue())
    return uri
