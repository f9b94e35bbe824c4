"""Redaction: secrets of the storage options in use, the environment's AWS credentials, URL user-info and
signed query strings never reach a message; URIs named in records stay usable."""

from __future__ import annotations

import pytest

from ipaflow.core.redaction import Redactor, redact_url, secret_values
from ipaflow.core.storage import Storage

KEY, SECRET = "AKIAUNITTESTKEY0", "unit-test-secret-value"


def test_secret_values_are_found_by_key_name_at_any_depth():
    options = {"s3": {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": "http://h:9000"}},
               "https": {"headers": {"Authorization": "Bearer tok-123456"}}, "anon": False, "token": "abc"}
    assert secret_values(options) == {KEY, SECRET, "Bearer tok-123456"}  # "abc": too short to hide safely


def test_redact_hides_option_secrets_env_credentials_userinfo_and_signatures(monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-session-token")
    redactor = Redactor({"key": KEY, "secret": SECRET})
    text = (f"failed {KEY}:{SECRET} token env-session-token "
            f"s3://user:pass@bucket/x.png https://h/x?X-Amz-Signature=abcdef&X-Amz-Credential=cred&v=1")
    shown = redactor.redact(text)
    for hidden in (KEY, SECRET, "env-session-token", "user:pass", "abcdef", "cred"):
        assert hidden not in shown, (hidden, shown)
    assert "s3://***@bucket/x.png" in shown and "v=1" in shown


def test_a_secret_containing_another_is_hidden_whole():
    assert Redactor({"key": "abcd", "secret": "abcdefgh"}).redact("abcdefgh") == "***"


def test_redactors_are_objects_not_a_process_registry():
    Storage(options={"secret": SECRET})  # constructing storage registers nothing anywhere
    assert Redactor().redact(SECRET) == SECRET
    assert Storage(options={"secret": SECRET}).redact(f"x {SECRET}") == "x ***"
    merged = Redactor({"secret": SECRET}).merged(Redactor({"password": "other-pass"}))
    assert merged.redact(f"{SECRET} other-pass") == "*** ***"


@pytest.mark.parametrize("uri, expected", [
    ("s3://admin-bucket/images/a.png", "s3://admin-bucket/images/a.png"),  # a short key inside a name stays
    ("s3://key:secret@bucket/a.png", "s3://***@bucket/a.png"),
    ("https://h/a.png?sig=xyz&x=1", "https://h/a.png?sig=***&x=1"),
])
def test_redact_url_keeps_uris_usable(uri, expected):
    assert redact_url(uri) == expected
    assert Redactor({"key": "admin"}).redact_url(uri) == expected
