"""How far a run is, for people: one snapshot (phase, rows done of total, failed, rows/s, ETA) that the run
monitor publishes, and the ways ``ipaflow render`` shows it on stderr (stdout keeps the run summary, clean for
pipes): a rich progress bar on a terminal, else a plain status line every 30 s (cron, nohup, CI logs).

Imports nothing heavy: the command line shows its start-up phases (starting Prefect's API server, importing
torch and diffusers, loading the first pipeline) before torch, diffusers or Prefect are imported.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

STATUS_EVERY_S = 30.0  # off a terminal
RATE_WINDOW_S = 60.0  # rows/s over the last minute: a pipeline load or a slow first batch fades out


@dataclass(frozen=True)
class Snapshot:
    """A run's progress. ``total`` is None until the rows are planned; ``rate`` (rows/s) and ``eta`` (seconds)
    are None until measured; ``elapsed`` counts from the command's start when there is one (start-up
    included), else from the flow's."""

    phase: str = "starting"
    total: int | None = None
    done: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    rate: float | None = None
    eta: float | None = None
    elapsed: float = 0.0

    @property
    def percent(self) -> float:
        """Rows done, in percent to one decimal (the UI shows the number as it is given)."""
        return round(100.0 * self.done / self.total, 1) if self.total else 0.0


def format_duration(seconds: float | None) -> str:
    """``42s``, ``4m05s``, ``3h07m``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "? rows/s"
    return f"{rate:.3g} rows/s" if rate < 100 else f"{rate:.0f} rows/s"


def status_line(snapshot: Snapshot) -> str:
    """One line, the same in the Prefect UI (the progress artifact's description), the logs and off a terminal:
    ``rendering: 120/1000 rows, 110 ok, 10 failed, 0 skipped, 3.2 rows/s, ETA 4m35s, elapsed 1m02s``."""
    if snapshot.total is None:
        return f"{snapshot.phase}, elapsed {format_duration(snapshot.elapsed)}"
    return (f"{snapshot.phase}: {snapshot.done}/{snapshot.total} rows, {snapshot.ok} ok, {snapshot.failed} failed, "
            f"{snapshot.skipped} skipped, {format_rate(snapshot.rate)}, ETA {format_duration(snapshot.eta)}, "
            f"elapsed {format_duration(snapshot.elapsed)}")


class RateMeter:
    """Rows per second over a sliding window of (time, rows done) samples, and the ETA it gives."""

    def __init__(self, window: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window, self.clock = window, clock
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, done: int) -> None:
        now = self.clock()
        self.samples.append((now, done))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()  # keep one sample at or before the window's start

    def rate(self) -> float | None:
        """None until a row is done and a second has passed; 0.0 when nothing finished within the window."""
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        if t1 - t0 < 1.0 or d1 == 0:
            return None
        return (d1 - d0) / (t1 - t0)

    def eta(self, remaining: int) -> float | None:
        rate = self.rate()
        if remaining <= 0:
            return 0.0
        return remaining / rate if rate else None


# -- who hears about progress -------------------------------------------------------------------------------

Listener = Callable[[Snapshot], None]
_listeners: list[Listener] = []
_latest = Snapshot()
_command_started: float | None = None  # time.monotonic() at the command's start


def add_listener(listener: Listener) -> None:
    _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def publish(snapshot: Snapshot) -> None:
    """Hand a snapshot to every listener (called by the run monitor, in the flow's thread)."""
    global _latest
    _latest = snapshot
    for listener in list(_listeners):
        listener(snapshot)


def set_phase(phase: str) -> None:
    """What the command is doing before the flow runs, or between its stages."""
    publish(replace(_latest, phase=phase, elapsed=elapsed_since_start(time.monotonic())))


def mark_command_start() -> None:
    """The command line calls this first, so that the run's times include its start-up."""
    global _command_started, _latest
    _command_started = time.monotonic()
    _latest = Snapshot()


def command_started() -> float | None:
    """time.monotonic() at the command's start, when the flow runs inside ``ipaflow render`` / ``demo``."""
    return _command_started


def elapsed_since_start(now: float, fallback: float | None = None) -> float:
    start = _command_started if _command_started is not None else fallback
    return now - start if start is not None else 0.0


# -- on stderr ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def terminal_progress(every: float = STATUS_EVERY_S) -> Iterator[None]:
    """A progress bar while in this block when stderr is a terminal, else a status line every ``every`` s."""
    if sys.stderr.isatty():
        with _bar():
            yield
    else:
        with _status_lines(every):
            yield


@contextlib.contextmanager
def _bar() -> Iterator[None]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
               TextColumn("ETA {task.fields[eta]}"))
    terminal = sys.stderr
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar, \
            _logs_above_the_bar(terminal, bar.console) as route:
        task = bar.add_task(_latest.phase, total=None, rate=format_rate(None), failed=0, eta="?")

        def listener(snapshot: Snapshot) -> None:
            route()
            bar.update(task, description=snapshot.phase, completed=snapshot.done, total=snapshot.total,
                       rate=format_rate(snapshot.rate), failed=snapshot.failed, eta=format_duration(snapshot.eta))

        add_listener(listener)
        try:
            yield
        finally:
            remove_listener(listener)


@contextlib.contextmanager
def _logs_above_the_bar(terminal, console) -> Iterator[Callable[[], None]]:
    """While the bar is drawn, log handlers that write onto ``terminal`` (Prefect's console handler, set up when
    Prefect is imported, after the bar appears) are stood in for by one that prints through the bar's console,
    so that their lines go above the bar instead of through it; ``route()`` looks for new ones. The same level,
    format and filters; put back at the end, with any filter added meanwhile."""
    import logging

    from rich.text import Text

    class AboveTheBar(logging.StreamHandler):  # a StreamHandler still, for code that filters those
        def emit(self, record: logging.LogRecord) -> None:
            try:
                console.print(Text(self.format(record)), soft_wrap=True)  # Text: log text is never markup
            except Exception:  # noqa: BLE001 - as logging.StreamHandler does
                self.handleError(record)

    swapped: list[tuple[logging.Logger, logging.Handler, logging.Handler]] = []

    def route() -> None:
        loggers = [logging.getLogger(), *(v for v in list(logging.Logger.manager.loggerDict.values())
                                          if isinstance(v, logging.Logger))]
        for logger in loggers:
            for handler in list(logger.handlers):
                stream = getattr(handler, "stream", None)
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, AboveTheBar) and terminal in (
                        stream, getattr(stream, "rich_proxied_file", None)):  # set up before the bar, or during it
                    stand_in = AboveTheBar(sys.stderr)
                    stand_in.setLevel(handler.level)
                    stand_in.setFormatter(handler.formatter)
                    for log_filter in handler.filters:
                        stand_in.addFilter(log_filter)
                    logger.removeHandler(handler)
                    logger.addHandler(stand_in)
                    swapped.append((logger, handler, stand_in))

    try:
        yield route
    finally:
        for logger, handler, stand_in in swapped:
            logger.removeHandler(stand_in)
            for log_filter in stand_in.filters:  # one added meanwhile stays
                if log_filter not in handler.filters:
                    handler.addFilter(log_filter)
            logger.addHandler(handler)


@contextlib.contextmanager
def _status_lines(every: float) -> Iterator[None]:
    stop = threading.Event()
    stream = sys.stderr

    def report() -> None:
        while not stop.wait(every):
            snapshot = replace(_latest, elapsed=elapsed_since_start(time.monotonic(), fallback=None) or _latest.elapsed)
            print(f"ipaflow: {status_line(snapshot)}", file=stream, flush=True)

    thread = threading.Thread(target=report, name="ipaflow-status", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
