"""A store that cannot be reached is one outage per store and process: said once when it begins, then every
30 s, and once when it ends; retried until $IPAFLOW_OUTAGE_TIMEOUT, then StorageUnreachable (exit status 3, one
line); a store that answers with refusals still fails a call after its tries."""

from __future__ import annotations

import logging
import pickle
import re
import time
import uuid

import pytest

from ipaflow.core import outages
from ipaflow.core.deadlines import Timeouts
from ipaflow.core.errors import EXIT_NOTHING_RAN, EXIT_STORAGE_UNREACHABLE, UserError
from ipaflow.core.lease import OutputInUse, OutputUnusable
from ipaflow.core.outages import StorageUnreachable, duration_text
from ipaflow.core.storage import Storage, TransientStorageError


def _uri() -> str:
    return f"s3://bucket-{uuid.uuid4().hex[:8]}/r/x.parquet"  # a store of its own per test


def _refused():
    raise ConnectionRefusedError(111, "Connection refused")


def test_an_outage_past_its_limit_stops_with_one_line(caplog):
    storage = Storage(backoff_s=0.01, timeouts=Timeouts(outage=0.3))
    uri = _uri()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "ipaflow.storage"), pytest.raises(StorageUnreachable) as caught:
        storage.retry("write x", _refused, uri=uri)
    assert 0.3 <= time.monotonic() - started < 2
    error = caught.value
    assert isinstance(error, UserError) and error.exit_code == EXIT_STORAGE_UNREACHABLE == 3
    assert re.fullmatch(r"s3://b/r unreachable for \ds \(ConnectionRefusedError\); 14 rows are safe, re-run to resume",
                        str(error.at("s3://b/r", safe=14)))
    said = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(said) == 1, said  # once, not once per try
    # the process gave up on the store: its calls now fail at once (the run is stopping), without a try
    calls = []
    with pytest.raises(StorageUnreachable):
        storage.retry("read y", lambda: calls.append(1), uri=uri)
    assert calls == [] and storage.gave_up(uri) is not None


def test_a_short_outage_is_waited_out_and_its_end_said(caplog):
    storage = Storage(backoff_s=0.01, timeouts=Timeouts(outage=30))
    back = time.monotonic() + 0.3

    def flaky():
        if time.monotonic() < back:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "done"

    with caplog.at_level(logging.WARNING, "ipaflow.storage"):
        assert storage.retry("write x", flaky, uri=_uri()) == "done"
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "unreachable (" in m]) == 1
    assert len([m for m in messages if "reachable again after" in m]) == 1


def test_the_outage_is_said_again_every_30_seconds(monkeypatch, caplog):
    monkeypatch.setattr(outages.Outage, "SAY_EVERY_S", 0.1)
    storage = Storage(backoff_s=0.01, timeouts=Timeouts(outage=0.45))
    with caplog.at_level(logging.WARNING, "ipaflow.storage"), pytest.raises(StorageUnreachable):
        storage.retry("write x", _refused, uri=_uri())
    said = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert 3 <= len(said) <= 6, said  # at start, then about every 0.1 s: not every try (~every 0.01 s)


def test_a_store_that_answers_with_refusals_fails_the_call_after_its_tries():
    storage = Storage(retries=2, backoff_s=0.001, timeouts=Timeouts(outage=30))

    def unavailable():
        raise OSError(16, "Service Unavailable (503)")  # s3fs's EBUSY: the store answered

    with pytest.raises(TransientStorageError, match="still failing after 3 tries"):
        storage.retry("write x", unavailable, uri=_uri())


def test_storage_unreachable_crosses_processes_whole():
    error = StorageUnreachable("s3://b/r", 300, "EndpointConnectionError", 14)
    again = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert str(again) == str(error) == ("s3://b/r unreachable for 5m (EndpointConnectionError); 14 rows are safe, "
                                        "re-run to resume")


def test_durations_and_lease_errors():
    assert [duration_text(s) for s in (8, 59.6, 300, 330, 7500)] == ["8s", "1m", "5m", "5m30s", "2h5m"]
    assert OutputInUse.exit_code == OutputUnusable.exit_code == EXIT_NOTHING_RAN
    assert issubclass(OutputInUse, UserError) and issubclass(OutputUnusable, UserError)
