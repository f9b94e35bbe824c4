"""What a run shows while in flight and at the end: Prefect artifacts (progress, failed rows, summary), the run
logger, and an optional in-process listener (the CLI's terminal progress bar)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from tasks.storage import redact

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
    done: int = 0
    ok: int = 0
    failed: int = 0
    images: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (id, spec, reason)
    per_spec: dict[str, SpecTally] = field(default_factory=dict)
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

    def _progress_text(self) -> str:
        return f"{self.done}/{self.total} rows finished ({self.ok} ok, {self.failed} failed)"

    def _notify(self) -> None:
        for listener in list(_listeners):
            listener(self.done, self.total)

    def row_failed(self, row_id: str, spec: str, reason: str) -> None:
        """A row that failed before reaching a worker (validation, missing input)."""
        self.done += 1
        self.failed += 1
        self.failures.append((row_id, spec, redact(reason)))
        self.per_spec.setdefault(spec, SpecTally()).failed += 1

    def shard_finished(self, stats: dict) -> None:
        from prefect.artifacts import update_progress_artifact

        tally = self.per_spec.setdefault(stats["spec"], SpecTally())
        tally.rows += stats["rows"]
        tally.ok += stats["ok"] + stats["skipped"]
        tally.failed += stats["failed"]
        tally.images += stats["images"]
        tally.seconds += stats["seconds"]
        self.done += stats["ok"] + stats["failed"] + stats["skipped"]
        self.ok += stats["ok"] + stats["skipped"]
        self.failed += stats["failed"]
        self.images += stats["images"]
        self.failures.extend((row_id, stats["spec"], reason) for row_id, reason in stats["failures"])
        self.log.info("%s: %d ok, %d failed in %.1fs", stats["name"], stats["ok"], stats["failed"], stats["seconds"])
        if self._artifact_id is not None and self.total:
            update_progress_artifact(self._artifact_id, progress=100.0 * self.done / self.total,
                                     description=self._progress_text())
        self._notify()

    def finish(self, summary: dict) -> None:
        """Final artifacts: failed rows as a table, the run summary as markdown."""
        from prefect.artifacts import create_markdown_artifact, create_table_artifact, update_progress_artifact

        if self._artifact_id is not None:
            update_progress_artifact(self._artifact_id, progress=100.0, description=self._progress_text())
        if self.failures:
            create_table_artifact(
                table=[{"id": i, "spec": s, "error": e} for i, s, e in self.failures[:1000]],
                key=_artifact_key(f"{self.name}-failed-rows"),
                description=f"{len(self.failures)} failed rows" + (" (first 1000)" if len(self.failures) > 1000 else ""),
            )
        create_markdown_artifact(markdown=summary_markdown(summary, self.per_spec),
                                 key=_artifact_key(f"{self.name}-summary"), description="ipaflow run summary")


def summary_markdown(summary: dict, per_spec: dict[str, SpecTally]) -> str:
    rate = summary["images"] / summary["seconds"] if summary["seconds"] else 0.0
    lines = [
        f"# ipaflow run `{summary['run_id']}`",
        "",
        f"- manifest: `{redact(summary['manifest'])}`",
        f"- outputs: `{redact(summary['out'])}`, gallery `{redact(summary['gallery'] or '-')}`",
        f"- rows: {summary['rows']} = {summary['rendered']} rendered + {summary['skipped']} skipped (already done)"
        f" + {summary['failed']} failed",
        f"- images: {summary['images']} in {summary['seconds']:.1f}s ({rate:.2f} images/s)",
        "",
        "| spec | rows | ok | failed | images | worker seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for spec in sorted(per_spec):
        t = per_spec[spec]
        lines.append(f"| {spec} | {t.rows} | {t.ok} | {t.failed} | {t.images} | {t.seconds:.1f} |")
    return "\n".join(lines)
