"""Which storage errors are retried (the network or the service may answer differently next time) and which
are final; the retry loop around them."""

from __future__ import annotations

import errno

import pytest

from ipaflow.core.storage import Storage, TransientStorageError, is_transient


def _named(name: str, base=Exception):
    return type(name, (base,), {})


class _Response(Exception):
    def __init__(self, status):
        super().__init__(f"status {status}")
        self.status = status


@pytest.mark.parametrize("error, transient", [
    (FileNotFoundError("x"), False),
    (PermissionError("denied"), False),
    (IsADirectoryError("dir"), False),
    (ConnectionResetError("reset"), True),
    (TimeoutError("slow"), True),
    (OSError(errno.EBUSY, "SlowDown"), True),
    (OSError(errno.EREMOTEIO, "InternalError"), True),
    (OSError(errno.ENOSPC, "no space"), False),
    (_named("EndpointConnectionError")("could not connect"), True),  # botocore, matched by class name
    (_named("ClientPayloadError")("cut"), True),  # aiohttp
    (_Response(503), True),
    (_Response(429), True),
    (_Response(404), False),
    (OSError("Please reduce your request rate (SlowDown)"), True),
    (OSError("service temporarily unavailable"), True),
    (ValueError("timeout"), False),  # words count only on OSErrors
    (OSError("bad request"), False),
])
def test_is_transient(error, transient):
    assert is_transient(error) is transient


def test_transient_errors_are_retried_until_they_pass():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "done"

    assert Storage(backoff_s=0.001).retry("read x", flaky) == "done" and len(calls) == 3


def test_final_errors_are_not_retried():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/x.png")

    with pytest.raises(FileNotFoundError):
        Storage(backoff_s=0.001).retry("read x", missing)
    assert len(calls) == 1


def test_retries_give_up_with_a_redacted_reason():
    storage = Storage(options={"secret": "s3cr3t-value"}, retries=2, backoff_s=0.001)

    def down():
        raise ConnectionRefusedError("refused for s3cr3t-value")

    with pytest.raises(TransientStorageError) as caught:
        storage.retry("read s3://b/x", down)
    assert "still failing after 3 tries" in str(caught.value) and "s3cr3t-value" not in str(caught.value)
