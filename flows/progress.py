"""A terminal progress bar for ``ipaflow render`` (rich), drawn on stderr and only when stderr is a terminal
(stdout keeps the run summary, clean for pipes)."""

from __future__ import annotations

import contextlib
import sys

from ipaflow.flows.monitoring import add_listener, remove_listener


@contextlib.contextmanager
def terminal_progress():
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("rendering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("rows", total=None)

        def listener(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)

        add_listener(listener)
        try:
            yield
        finally:
            remove_listener(listener)
