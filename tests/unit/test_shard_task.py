"""The shard task's Prefect side: its retry policy (no retry once --out cannot be written at all, or the run lost
its lease on it) and its threads' log lines naming the flow run (as in a Dask worker's process, where the flow's
own stamp is not)."""

from __future__ import annotations

import errno
import logging
import threading

import pytest
from prefect import flow, task

from ipaflow.core.lease import LeaseLost
from ipaflow.tasks.prefect_tasks import render_shard, thread_logs_of_this_run, worth_retrying


@pytest.mark.parametrize(("error", "tries"), [
    (OSError(errno.ENOSPC, "No space left on device"), 1),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 1),
    (OSError(errno.EROFS, "Read-only file system"), 1),
    (LeaseLost("/out", "run b", 2), 1),  # another run took --out over: every try would stop alike
    (OSError(errno.EIO, "Input/output error"), 3),  # a worker's trouble: tried again
    (RuntimeError("CUDA error"), 3),
])
def test_a_shard_is_not_retried_once_out_cannot_be_written(prefect_api, error, tries):
    assert render_shard.retry_condition_fn is worth_retrying and render_shard.retries == 2
    attempts = []

    @task(retries=render_shard.retries, retry_delay_seconds=0, retry_condition_fn=render_shard.retry_condition_fn)
    def shard():
        attempts.append(1)
        raise error

    @flow
    def run():
        shard()

    with pytest.raises(type(error)):
        run()
    assert len(attempts) == tries


def test_a_shards_threads_log_with_its_flow_run_id(prefect_api):
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger("ipaflow.storage")
    logger.addHandler(handler)

    @task
    def shard():
        with thread_logs_of_this_run():
            thread = threading.Thread(target=logger.warning, args=("from a thread of the shard",))
            thread.start()
            thread.join()

    @flow
    def run():
        from prefect.runtime import flow_run

        shard()
        return flow_run.id

    try:
        flow_run_id = run()
    finally:
        logger.removeHandler(handler)
    said = [record for record in seen if record.getMessage() == "from a thread of the shard"]
    assert [getattr(record, "flow_run_id", None) for record in said] == [str(flow_run_id)]
