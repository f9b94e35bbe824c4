"""ipaflow's log lines from threads of its own (storage retries and outages, the lease's heartbeat, uploads) reach
the flow run's log in the Prefect API, in the flow's process and in a Dask worker's alike.

Prefect's API log handler finds the flow run from the calling thread's context; a thread ipaflow started has
none, and Prefect then warns ("attempted to send logs to the API without a flow run id") instead of sending
the line. While a run holds ``for_run``, every ipaflow logger stamps its records with the run's id, so they
reach the run's log from any thread of the process. The flow holds it for the whole run; a shard task holds it
too (``ipaflow.tasks.prefect_tasks``), for the threads it starts in a Dask worker's process, where the flow's
filters are not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class _StampRun(logging.Filter):
    def __init__(self, flow_run_id: str):
        super().__init__()
        self.flow_run_id = flow_run_id

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "flow_run_id", None) is None:
            record.flow_run_id = self.flow_run_id
        return True


@contextmanager
def for_run(flow_run_id) -> Iterator[None]:
    """Stamp the records of every ``ipaflow.*`` logger with ``flow_run_id`` while the block runs (a logger's
    filter sees only its own records, so each logger gets one)."""
    if not flow_run_id:
        yield
        return
    stamp = _StampRun(str(flow_run_id))
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "ipaflow" or name.startswith("ipaflow.")]
    for logger in loggers:
        logger.addFilter(stamp)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(stamp)
