"""What the command line leaves on the terminal: a failure the user must fix is said in one line
(``one_line``), and Prefect's console lines that repeat it, or its traceback, are kept off the terminal
(``quiet_console``); the Prefect API (the UI) still gets them."""

from __future__ import annotations

import errno
import logging
import os

from ipaflow.core.errors import UserError
from ipaflow.flows.prefect_api import APIBlinks, APIServerError

# OS errors that mean the output (or another place ipaflow must write) cannot be written; inputs never raise
# them this far (a row's input problem fails the row).
_UNWRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                         errno.EISDIR, errno.EFBIG})


def one_line(exc: BaseException, out: str | None = None) -> str | None:
    """The one line a failure that is not a ``UserError`` is told in (the Prefect API server failing to start,
    an output that cannot be written); None for the others (a traceback then helps whoever fixes ipaflow)."""
    if isinstance(exc, APIServerError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _UNWRITABLE:
        where = f" to --out {out}" if out else f" {exc.filename}" if exc.filename else ""
        return f"cannot write{where}: {os.strerror(exc.errno)}"
    return None


# Prefect's console lines that repeat what the CLI says: an interrupted run's crash, and the notice of its
# event queue draining at exit after a run that ended early.
# Also a task run cancelled by the task runner as a run that stops leaves it (an unreachable store).
_PREFECT_NOISE = ("Crash detected! Execution was aborted by an interrupt signal", "Still processing items:")
_CANCELLED_TASK = "Task run cancelled by the task runner"


class OneLineFailures(logging.Filter):
    """Keeps off the terminal what the CLI says itself in one line: Prefect's traceback of a flow that failed
    that way (an unusable or busy --out, a bad manifest or spec), and its "Crash detected!" of an interrupted
    one, and the notice of its event queue draining at exit. The Prefect API (the UI) still gets the first two."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (KeyboardInterrupt, UserError)) or (error and one_line(error)):
            return False
        message = record.getMessage()
        return (not str(record.msg).startswith(_PREFECT_NOISE) and _CANCELLED_TASK not in message
                and not _ends_in_a_user_error(message))


def _ends_in_a_user_error(message: str) -> bool:
    """Prefect's "Finished in state Failed('Task run encountered an exception LeaseLost: ...')" of a task run
    stopped by an error the CLI says in its own line."""
    if not message.startswith("Finished in state Failed("):
        return False
    kinds, names = [UserError], set()
    while kinds:
        kind = kinds.pop()
        names.add(kind.__name__)
        kinds.extend(kind.__subclasses__())
    return any(f"exception {name}:" in message for name in names)


_api_blinks = APIBlinks()  # one for the process: the API's blink is said once, whichever handler sees it


def quiet_console() -> None:
    """Add the filter to Prefect's console handlers (Prefect configures its logging when first imported)."""
    import prefect.logging.handlers  # noqa: F401 - configures Prefect's logging first

    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                                       if name.startswith("prefect")]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                    isinstance(f, OneLineFailures) for f in handler.filters):
                handler.addFilter(OneLineFailures())
                handler.addFilter(_api_blinks)
