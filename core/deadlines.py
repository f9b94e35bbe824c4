"""How long storage may make ipaflow wait: the time limits, read from the environment, and the one way to run
an async filesystem's request under a deadline.

| setting | default | bounds |
| --- | --- | --- |
| ``$IPAFLOW_CONNECT_TIMEOUT`` | 10 s | opening a connection |
| ``$IPAFLOW_READ_TIMEOUT`` | 30 s | the next bytes of an answer (a silent server) |
| ``$IPAFLOW_INPUT_TIMEOUT`` | 60 s | one input in all, retries included (a trickling server) |
| ``$IPAFLOW_CALL_TIMEOUT`` | 120 s | one request for ipaflow's own files (write, read, listing, delete), |
| | | the SDK's own retries included |
| ``$IPAFLOW_OUTAGE_TIMEOUT`` | 300 s | how long the output's store may stay unreachable before the run stops |

fsspec's own options win for what they cover (``config_kwargs`` of s3, ``client_kwargs.timeout`` of http).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import fsspec.asyn
from fsspec.exceptions import FSTimeoutError

log = logging.getLogger("ipaflow.storage")

CONNECT_TIMEOUT_ENV = "IPAFLOW_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "IPAFLOW_READ_TIMEOUT"
INPUT_TIMEOUT_ENV = "IPAFLOW_INPUT_TIMEOUT"
CALL_TIMEOUT_ENV = "IPAFLOW_CALL_TIMEOUT"
OUTAGE_TIMEOUT_ENV = "IPAFLOW_OUTAGE_TIMEOUT"


@dataclass(frozen=True)
class Timeouts:
    """How long storage may make ipaflow wait, in seconds (the table in this module's docstring)."""

    connect: float = 10.0
    read: float = 30.0
    input: float = 60.0
    call: float = 120.0
    outage: float = 300.0

    @classmethod
    def from_environment(cls) -> Timeouts:
        values = {}
        for name, variable in (("connect", CONNECT_TIMEOUT_ENV), ("read", READ_TIMEOUT_ENV), ("input", INPUT_TIMEOUT_ENV),
                               ("call", CALL_TIMEOUT_ENV), ("outage", OUTAGE_TIMEOUT_ENV)):
            if (value := seconds_from_environment(variable)) is not None:
                values[name] = value
        return cls(**values)


def seconds_from_environment(variable: str) -> float | None:
    """A finite number of seconds above 0 from an environment variable; None (with a warning when it was set
    to something else) where it is not one."""
    text = os.environ.get(variable)
    if not text:
        return None
    try:
        value = float(text)
        if 0 < value < float("inf"):
            return value
    except ValueError:
        pass
    log.warning("ignoring %s=%r: not a number of seconds above 0", variable, text)
    return None


_TIMEOUT_TYPES = ("TimeoutError", "FSTimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "ServerTimeoutError")


def is_timeout(exc: BaseException) -> bool:
    """Whether an error is some library's timeout (asyncio, fsspec, aiohttp, botocore), judged by class name."""
    return any(cls.__name__ in _TIMEOUT_TYPES for cls in type(exc).__mro__)


def timed(fs, deadline: float, coroutine):
    """Run a coroutine of an async filesystem on its loop, cancelled at ``deadline`` (``time.monotonic()``): a
    server that trickles bytes forever, a silent one, or a client's own retries cannot outlast it."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        coroutine.close()
        raise FSTimeoutError

    async def run():
        return await coroutine

    return fsspec.asyn.sync(fs.loop, run, timeout=remaining)
