"""How far a run is, for people: one snapshot (phase, rows done of total, failed, rows/s, ETA) that the run
monitor publishes, and the ways ``ipaflow render`` shows it on stderr (stdout keeps the run summary, clean for
pipes): a rich progress bar on a terminal, else a plain status line every 30 s (cron, nohup, CI logs).

Imports nothing heavy: the command line shows its start-up phases (starting Prefect's API server, importing
torch and diffusers, loading the first pipeline) before torch, diffusers or Prefect are imported.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

STATUS_EVERY_S = 30.0  # off a terminal


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
    """One line, the same in the Prefect UI (the progress artifact's description, whose card shows its start:
    the ETA first), the logs and off a terminal:
    ``ETA 4m35s, rendering 120/1000 rows (12.0%), 100 ok, 10 failed, 10 skipped, 3.21 rows/s, elapsed 1m02s``."""
    if snapshot.total is None:
        return f"{snapshot.phase}, elapsed {format_duration(snapshot.elapsed)}"
    return (f"ETA {format_duration(snapshot.eta)}, {snapshot.phase}: {snapshot.done}/{snapshot.total} rows "
            f"({snapshot.percent:.1f}%), {snapshot.ok} ok, {snapshot.failed} failed, {snapshot.skipped} skipped, "
            f"{format_rate(snapshot.rate)}, elapsed {format_duration(snapshot.elapsed)}")


class ProgressEstimator:
    """The one rate and ETA of a run, that the terminal and the Prefect UI both show (``Snapshot.rate``,
    ``Snapshot.eta``).

    Fed the rows the workers have finished so far (``observe``), as their shards report after every batch. Each
    increase is a batch completed at a time; the rows of a batch are spread over the interval since the one
    before it (a piecewise-constant rate), and the rate is that curve's exponentially weighted mean. Its time
    constant is an eighth of the time rendered so far, at least ``TAU_BATCHES`` mean intervals between the latest
    batches and ``TAU_MIN`` seconds, at most ``TAU_MAX``: recent batches weigh most, one batch more or less moves it
    little, and a run whose speed changed is followed within a few time constants (``benchmarks/eta.py``). The
    first batch only starts the clock (it carries the pipeline's load).

    The rate is read at the last batch, not at ``now``, so it does not sag between batches; once the wait since
    the last batch is longer than twice the mean interval between the latest ``TAU_BATCHES`` batches (a stall),
    the wait counts as time without rows and the rate falls. The ETA counts down from the last batch:
    ``last + remaining / rate - now``.
    """

    TAU_SHARE, TAU_BATCHES, TAU_MIN, TAU_MAX = 1 / 8, 8, 5.0, 600.0
    MAX_EVENTS = 2048  # past this, the older half of the batches is merged pairwise: each read stays O(2048)

    def __init__(self) -> None:
        self.start: float | None = None  # the first batch
        self.events: deque[tuple[float, int]] = deque()  # (time, rows) of every batch after the first
        self.seen = 0  # rows finished so far (the largest count observed)

    def observe(self, done: int, now: float) -> None:
        """``done``: the rows the workers have finished (rendered or failed) in this run so far; a count lower
        than one seen before (a retried shard starts again) is ignored until it passes it."""
        if done <= self.seen:
            return
        if self.start is None or now <= self.start:
            self.start = now  # the first batch (or one at the same instant) starts the clock
        elif self.events and now <= self.events[-1][0]:
            self.events[-1] = (self.events[-1][0], self.events[-1][1] + done - self.seen)
        else:
            self.events.append((now, done - self.seen))
            while len(self.events) > 1 and now - self.events[0][0] > self.TAU_MAX * 8:  # weigh under e^-8
                self.start = self.events.popleft()[0]
            if len(self.events) > self.MAX_EVENTS:  # many workers' batches: two old ones read as one longer one
                self._merge_older_half()
        self.seen = done

    def _merge_older_half(self) -> None:
        """Merge the older half of the batches pairwise: two batches ending at t1 < t2 become one of their rows
        ending at t2, spread over both intervals. The recent half, which weighs most, stays as it was."""
        events = list(self.events)
        half = len(events) // 2 // 2 * 2
        merged = [(events[i + 1][0], events[i][1] + events[i + 1][1]) for i in range(0, half, 2)]
        self.events = deque(merged + events[half:])

    def _read_at(self, now: float) -> tuple[float, float] | None:
        """(rate, time of the last batch); None until two batches are done."""
        if not self.events or self.start is None:
            return None
        last = self.events[-1][0]
        if last <= self.start:
            return None
        recent = min(len(self.events), self.TAU_BATCHES)  # the mean interval between the latest batches
        gap = (last - (self.events[-recent - 1][0] if recent < len(self.events) else self.start)) / recent
        end = max(last, now - 2 * gap)  # a wait past twice the usual interval is time without rows
        tau = min(max((end - self.start) * self.TAU_SHARE, self.TAU_MIN, self.TAU_BATCHES * gap), self.TAU_MAX)
        weighted, before = 0.0, self.start
        for at, rows in self.events:
            if at > before:  # rows spread over (before, at]: their weight is the integral of e^-(end-s)/tau there
                weighted += rows / (at - before) * (math.exp(-(end - at) / tau) - math.exp(-(end - before) / tau))
            before = at
        window = 1.0 - math.exp(-(end - self.start) / tau)
        return weighted / window, last

    def rate(self, now: float) -> float | None:
        """Rows per second; None until two batches are done."""
        read = self._read_at(now)
        return read[0] if read else None

    def eta(self, remaining: int, now: float) -> float | None:
        """Seconds until ``remaining`` more rows are done; 0 with none left; None while the rate is unknown."""
        if remaining <= 0:
            return 0.0
        read = self._read_at(now)
        if read is None or read[0] <= 0:
            return None
        rate, last = read
        return max(0.0, last + remaining / rate - now)


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
