"""Keeping credentials out of every message, log line, record and artifact ipaflow writes.

A ``Redactor`` knows the secret values of one set of storage options (keys whose names say secret, token,
password, key, ...) and, at each call, the ``AWS_*`` credentials in the environment. It is an object, made
with the options it guards and handed to whatever writes text (``Storage.redactor`` is the usual one): no
process-wide registry fills up as a side effect.

Two strengths:

- ``redact`` removes every known secret value, URL user-info and signed query strings: for messages.
- ``redact_url`` removes only what a URI itself carries (user-info, a signed query), so the URI stays usable:
  for the outputs named in metadata, where replacing a short known value (a key ``admin``) inside a bucket or
  file name would break the name.
"""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_KEYS = re.compile(r"(secret|token|password|passwd|key|credential|signature|auth)", re.I)
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
MIN_SECRET_CHARS = 4  # shorter values would blank out ordinary words
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SIGNED_QUERY = re.compile(r"(?i)((?:x-amz-(?:signature|credential|security-token)|signature|sig|token)=)[^&\s]+")


def secret_values(options: Any, parent_key: str = "") -> set[str]:
    """The values in (nested) storage options held under a key that names a secret."""
    found: set[str] = set()
    if isinstance(options, dict):
        for key, value in options.items():
            found |= secret_values(value, str(key))
    elif isinstance(options, (list, tuple)):
        for value in options:
            found |= secret_values(value, parent_key)
    elif isinstance(options, str) and len(options) >= MIN_SECRET_CHARS and SECRET_KEYS.search(parent_key):
        found.add(options)
    return found


def redact_url(uri: Any) -> str:
    """A URI without the credentials a URI itself may carry (user-info, a signed query), otherwise intact."""
    return _SIGNED_QUERY.sub(r"\1***", _USERINFO.sub(r"\g<scheme>***@", str(uri)))


class Redactor:
    """Removes the secrets of one set of storage options (and the environment's AWS credentials) from text."""

    def __init__(self, options: Any = None, extra: set[str] | frozenset[str] = frozenset()):
        self._secrets = frozenset(secret_values(options) | set(extra))

    def __repr__(self) -> str:
        return f"Redactor({len(self._secrets)} secret value(s))"

    def merged(self, other: Redactor) -> Redactor:
        """A redactor that knows the secrets of both."""
        return Redactor(extra=self._secrets | other._secrets)

    def secrets(self) -> list[str]:
        """Every value to hide, longest first (so that a secret containing another is hidden whole)."""
        values = set(self._secrets)
        values.update(v for v in (os.environ.get(name) for name in SECRET_ENV) if v and len(v) >= MIN_SECRET_CHARS)
        return sorted(values, key=len, reverse=True)

    def __call__(self, text: Any) -> str:
        return self.redact(text)

    def redact(self, text: Any) -> str:
        """``text`` with known secret values, URL user-info and signed query strings replaced by ``***``."""
        text = str(text)
        for secret in self.secrets():
            text = text.replace(secret, "***")
        return redact_url(text)

    @staticmethod
    def redact_url(uri: Any) -> str:
        return redact_url(uri)
