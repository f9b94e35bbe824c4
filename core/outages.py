"""A store that cannot be reached: one outage per store and process, shared by every thread that meets it.

An outage begins with the first request that cannot reach the store (refused, timed out, cut), is said once,
then every 30 s while it lasts, and once when the store answers again. ``ipaflow.core.storage.Storage.retry``
retries ipaflow's own requests for as long as it lasts, up to $IPAFLOW_OUTAGE_TIMEOUT; then it raises
``StorageUnreachable``: the run stops in one line, exit status 3. A store that answers with refusals (503,
throttling) is not an outage.
"""

from __future__ import annotations

import errno
import logging
import threading
import time

from ipaflow.core.deadlines import OUTAGE_TIMEOUT_ENV
from ipaflow.core.errors import EXIT_STORAGE_UNREACHABLE, UserError

log = logging.getLogger("ipaflow.storage")


def duration_text(seconds: float) -> str:
    """``45s``, ``5m``, ``5m30s``, ``2h5m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m" if minutes else f"{hours}h"


class StorageUnreachable(UserError):
    """A store stayed unreachable past $IPAFLOW_OUTAGE_TIMEOUT: the run stops; what it wrote is safe."""

    exit_code = EXIT_STORAGE_UNREACHABLE

    def __init__(self, where: str, seconds: float, cause: str, safe: int | None = None):
        self.where, self.seconds, self.cause, self.safe = where, seconds, cause, safe
        rows = "what was written is safe" if safe is None else f"{safe} row{'s are' if safe != 1 else ' is'} safe"
        super().__init__(f"{where} unreachable for {duration_text(seconds)} ({cause}); {rows}, re-run to resume")

    def __reduce__(self):  # raised in a Dask worker, read in the flow's process
        return StorageUnreachable, (self.where, self.seconds, self.cause, self.safe)

    def at(self, where: str, safe: int | None = None) -> StorageUnreachable:
        """The same outage said of ``where`` (the run's --out), with the count of rows that are safe."""
        return StorageUnreachable(where, self.seconds, self.cause, self.safe if safe is None else safe)


# Errors (matched by class name, as below) and errnos that mean the store could not be reached at all, as
# opposed to a store that answered with a refusal (503, throttling).
_UNREACHABLE_TYPES = frozenset({
    "ConnectionError", "TimeoutError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "ClientConnectionError", "ServerTimeoutError", "FSTimeoutError", "ProtocolError",
})
_UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                                 errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE})


def is_unreachable(exc: BaseException) -> bool:
    """Whether an error means the store could not be reached (nothing answered), not that it refused."""
    if any(cls.__name__ in _UNREACHABLE_TYPES for cls in type(exc).__mro__):
        return True
    return isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS


def store_of(uri: str) -> str:
    """The store a URI lives in, as outages are tracked: ``s3://bucket``; '' for local paths."""
    if "://" not in uri or uri.startswith("file://"):
        return ""
    protocol, rest = uri.split("://", 1)
    return f"{protocol}://{rest.split('/', 1)[0]}"


class Outage:
    """One store's unreachable spell, shared by every thread of the process: when it began, what it is said
    as. Said once when it begins, then every ``SAY_EVERY_S`` while it lasts, and once when it ends."""

    SAY_EVERY_S = 30.0
    GIVEN_UP_S = 60.0  # after giving up, calls fail at once for this long (the run is stopping), then try again

    def __init__(self, store: str):
        self.store = store
        self.since: float | None = None  # time.monotonic() of the spell's first failure
        self.given_up: float | None = None
        self.reached: float | None = None  # time.monotonic() of the last request that reached it
        self.cause = ""
        self._said: float | None = None
        self._lock = threading.Lock()

    def failed(self, exc: BaseException, limit: float, tried: float) -> float:
        """Count a failure to reach the store of a try that began at ``tried``; returns how long the store has
        been unreachable. A try that began before the store was last reached (sent during an outage that has
        ended since) starts no new one."""
        with self._lock:
            now = time.monotonic()
            if self.since is None and self.reached is not None and tried < self.reached:
                return 0.0
            self.cause = type(exc).__name__
            if self.since is None:
                self.since, self._said = now, now
                log.warning("%s unreachable (%s); retrying, for up to %s ($%s)", self.store, self.cause,
                            duration_text(limit), OUTAGE_TIMEOUT_ENV)
            elif now - self._said >= self.SAY_EVERY_S:
                self._said = now
                log.warning("%s unreachable for %s (%s); retrying, for up to %s", self.store,
                            duration_text(now - self.since), self.cause, duration_text(limit))
            return now - self.since

    def succeeded(self) -> None:
        self.reached = time.monotonic()
        if self.since is None:  # the common case: no lock taken
            return
        with self._lock:
            if self.since is not None:
                log.warning("%s reachable again after %s", self.store, duration_text(time.monotonic() - self.since))
            self.since = self.given_up = self._said = None

    def give_up(self, limit: float) -> StorageUnreachable:
        with self._lock:
            now = time.monotonic()
            self.given_up = self.given_up or now
            return StorageUnreachable(self.store, max(limit, now - (self.since or now)), self.cause)

    def stopping(self) -> bool:
        """Whether the process gave up on the store moments ago (calls then fail without trying)."""
        given_up = self.given_up
        return given_up is not None and time.monotonic() - given_up < self.GIVEN_UP_S


_outages: dict[str, Outage] = {}
_outages_lock = threading.Lock()


def outage(uri: str) -> Outage:
    """The process's outage record of the store ``uri`` lives in."""
    store = store_of(uri)
    with _outages_lock:
        return _outages.setdefault(store, Outage(store))
