"""A quantity that threads share and wait for: bytes of input being read, pixels of images being decoded.

What one thread takes, others cannot take until it is given back, so the total in use stays near the
capacity whatever the inputs are. A request larger than the whole capacity is not refused: it waits until
nothing else is held and then runs alone (one input may be as large as the per-input limits allow), and a
caller may let a request through at once (``now``) when waiting for others could never end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Budget:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held = 0
        # re-entrant: ``give`` may run from a weakref finalizer while this thread is inside ``take``
        self._changed = threading.Condition(threading.RLock())

    def take(self, amount: int, now: Callable[[], bool] = lambda: False,
             make_room: Callable[[int], None] | None = None) -> None:
        """Wait until ``amount`` fits (or nothing else is held, or ``now()`` says go), then hold it.
        ``make_room(amount)`` is called before each wait, outside the lock (it may let go of what a cache
        holds, whose holders then ``give``)."""
        while True:
            if make_room is not None:
                make_room(amount)
            with self._changed:
                if self.held == 0 or self.held + amount <= self.capacity or now():
                    self.held += amount
                    return
                self._changed.wait(timeout=1.0)  # also re-checks ``now`` when a waker forgot to call wake()

    def give(self, amount: int) -> None:
        with self._changed:
            self.held -= amount
            self._changed.notify_all()

    def wake(self) -> None:
        """Re-check every waiter's ``now`` (call after changing what it reads)."""
        with self._changed:
            self._changed.notify_all()

    @contextmanager
    def holding(self, amount: int) -> Iterator[None]:
        self.take(amount)
        try:
            yield
        finally:
            self.give(amount)
