"""Storage I/O through fsspec: local paths, file://, s3:// (s3fs), http(s)://, and any other fsspec protocol.

- Every request is retried with backoff on transient errors (connection resets, timeouts, 5xx, throttling).
  On S3, botocore retries first (its own config: AWS_MAX_ATTEMPTS, AWS_RETRY_MODE or ``config_kwargs``);
  what still fails after that, and what http(s) and other protocols raise, is retried here.
- No wait is unbounded (``ipaflow.core.deadlines``): each request for ipaflow's own files has a deadline
  ($IPAFLOW_CALL_TIMEOUT), the SDK's own retries included, so a silent (frozen) store fails like a refusing one.
- A store that cannot be reached (refused, timed out, cut) is an outage (``ipaflow.core.outages``), shared by the
  process's threads: said once, then every 30 s, and retried until it has lasted $IPAFLOW_OUTAGE_TIMEOUT; then
  every call to it raises ``StorageUnreachable``, which stops a run in one line (exit status 3). A store that answers
  but refuses (503, throttling) fails a call after ``retries`` tries (``TransientStorageError``).
- Writes carry a content type on S3 (image/png, image/gif, text/html, parquet, ...).
- Writes are atomic: an object appears whole or not at all (object stores PUT atomically; local files are
  written aside and renamed into place).
- Credentials come the standard ways (AWS_* variables, ``--storage-options``, fsspec config); each Storage
  carries the ``Redactor`` of its options, and every message it writes goes through it.
- Inputs are read bounded (``ipaflow.core.input_reads``, whose reads ``Storage`` has).
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import logging
import os
import posixpath
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ipaflow.core.deadlines import (
    INPUT_TIMEOUT_ENV,
    Timeouts,
    is_timeout,
    timed,
)
from ipaflow.core.input_reads import InputReads, InputRefused, InputTimeout
from ipaflow.core.outages import StorageUnreachable, is_unreachable, outage
from ipaflow.core.redaction import Redactor

log = logging.getLogger("ipaflow.storage")
T = TypeVar("T")
MAX_BACKOFF_S = 5.0  # the longest pause between tries while a store is unreachable

CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".html": "text/html; charset=utf-8",
    ".parquet": "application/vnd.apache.parquet",
    ".json": "application/json",
}


class TransientStorageError(OSError):
    """Storage kept failing after every retry."""


def describe_error(exc: BaseException) -> str:
    """One line saying why storage failed: never empty, without the exception's chain or traceback."""
    if isinstance(exc, (InputRefused, InputTimeout, TransientStorageError)):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(exc, NotADirectoryError):
        return "a part of the path is a file, not a folder"
    if is_timeout(exc):
        return "timed out (no answer in time)"
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return os.strerror(exc.errno)  # "Connection refused", "Permission denied", "No space left on device"
    text = " ".join(str(exc).split())[:300]  # some messages quote what the server sent
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(root: str, *parts: str) -> str:
    """Join path parts under a URI or path root (always with '/')."""
    return posixpath.join(root.rstrip("/"), *parts) if root else posixpath.join(*parts)


# Exception classes (matched by name anywhere in the class hierarchy, so that botocore, aiohttp and urllib3 need
# not be imported) that mean the connection failed or was cut: the request may succeed when sent again.
_TRANSIENT_TYPES = frozenset({
    "ConnectionError", "TimeoutError", "EndpointConnectionError", "HTTPClientError", "ConnectionClosedError",
    "ReadTimeoutError", "ConnectTimeoutError", "ClientConnectionError", "ClientPayloadError", "ServerTimeoutError",
    "IncompleteRead", "ResponseStreamingError", "FSTimeoutError", "ProtocolError",
})
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# s3fs turns S3's 503 SlowDown / ServiceUnavailable into EBUSY and 500 InternalError into EREMOTEIO.
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                               errno.ECONNREFUSED, errno.EPIPE, errno.EAGAIN})
_TRANSIENT_WORDS = ("timeout", "timed out", "reset by peer", "throttl", "slow down", "slowdown", "internalerror",
                    "internal error", "serviceunavailable", "service unavailable", "bad gateway", "temporarily")


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying (the network or the service), not a final answer."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    if any(cls.__name__ in _TRANSIENT_TYPES for cls in type(exc).__mro__):
        return True
    if getattr(exc, "status", None) in _TRANSIENT_STATUS:  # aiohttp's ClientResponseError (http inputs)
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, OSError) and any(word in text for word in _TRANSIENT_WORDS)


# OS errors that mean --out cannot take another byte now (disk full, over quota, read-only): every later write
# fails the same way, so retrying a shard or starting the next one cannot help.
_OUT_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def is_out_unwritable(exc: BaseException) -> bool:
    """Whether an error means --out cannot be written at all now (disk full, over quota, read-only)."""
    return isinstance(exc, OSError) and exc.errno in _OUT_FULL_ERRNOS



FILESYSTEM_CACHE_SIZE = 16  # distinct (protocol, options, environment) a process keeps clients for
_filesystems: OrderedDict[str, fsspec.AbstractFileSystem] = OrderedDict()
_filesystems_lock = threading.Lock()


def _filesystem(protocol: str, options: dict) -> fsspec.AbstractFileSystem:
    """The process's filesystem for a protocol, its options and the AWS_* environment, without a listings cache.

    fsspec caches one instance per protocol and options, and each instance caches listings: a long-lived
    process (a Dask worker, ``serve``, a test running the flow twice) would see a bucket as it was when first
    listed, and keep the endpoint and credentials the environment had then. A new instance per run would
    avoid both but costs a new S3 client (botocore loads its service models again) for every shard task.
    At most FILESYSTEM_CACHE_SIZE are kept, least recently used dropped first: a long-lived worker that sees
    many option sets (``serve`` over months, rotating credentials) does not grow without bound.
    """
    environment = sorted((name, value) for name, value in os.environ.items() if name.startswith("AWS_"))
    token = json.dumps([protocol, options, environment, os.getpid()], sort_keys=True, default=repr)
    key = hashlib.sha256(token.encode()).hexdigest()
    with _filesystems_lock:
        if key in _filesystems:
            _filesystems.move_to_end(key)
        else:
            cls = fsspec.get_filesystem_class(protocol)
            _filesystems[key] = cls(**{**options, "skip_instance_cache": True, "use_listings_cache": False})
            while len(_filesystems) > FILESYSTEM_CACHE_SIZE:
                _filesystems.popitem(last=False)
        return _filesystems[key]


@dataclass
class Storage(InputReads):
    """fsspec access with ipaflow's retry, atomic-write and redaction rules.

    ``options`` are fsspec keyword arguments in fsspec's own forms: flat (``{"key": ..., "client_kwargs":
    {"endpoint_url": ...}}``), keyed by protocol (``{"s3": {...}, "http": {...}}``), or both, the protocol's
    own dict winning. Flat keys serve object stores; http(s) only gets its own dict, because HTTPFileSystem
    passes unknown kwargs on to every request.

    Filesystems come from ``_filesystem``: shared in the process, but never serving a stale listing.

    Args:
        options: fsspec keyword arguments, as above; may hold credentials, which ``redact`` removes from every
            message, record and artifact.
        retries: how many times a transient failure (throttling, a 503, a reset connection) is tried again.
        backoff_s: the first pause between tries; it doubles each time, with jitter.
        local_staging: where local writes are staged before their atomic rename (default: beside the target).
        redactor: what ``redact`` removes; by default built from ``options`` and the environment.
        timeouts: the connect, read, input, per-request and outage limits (default: ``$IPAFLOW_*_TIMEOUT``).

    Every request for ipaflow's own files (``read_bytes``, ``write_atomic``, ``list_files``, ``delete``, ...) is
    cut at the per-request deadline; a store that stops answering starts an outage (``core/outages.py``), and past
    the outage limit the request raises ``StorageUnreachable``. Row inputs are read through ``InputReads``.
    """

    options: dict = field(default_factory=dict, repr=False)  # may hold credentials
    retries: int = 5
    backoff_s: float = 0.2
    local_staging: str | None = None  # where local writes are staged before their rename
    redactor: Redactor = field(default=None, repr=False)  # default: the redactor of ``options``
    timeouts: Timeouts = field(default_factory=Timeouts.from_environment)

    def __post_init__(self) -> None:
        if self.redactor is None:
            self.redactor = Redactor(self.options)

    def redact(self, text) -> str:
        """``text`` without the credentials of this storage's options or the environment."""
        return self.redactor.redact(text)

    def options_for(self, protocol: str) -> dict:
        """The fsspec kwargs for one protocol (see the class docstring), with the connect and read timeouts
        where the user's options do not set them."""
        if protocol in ("file", "local"):
            return {}
        names = fsspec.get_filesystem_class(protocol).protocol
        names = (names,) if isinstance(names, str) else names
        protocols = set(fsspec.available_protocols())
        chosen = {} if "http" in names else {
            k: v for k, v in self.options.items() if not (k in protocols and isinstance(v, dict))
        }
        for name in sorted(names, key=lambda n: n == protocol):  # the URI's own spelling last, so it wins
            chosen.update(self.options.get(name) or {})
        return self._with_timeouts(names, chosen)

    def _with_timeouts(self, names: tuple[str, ...], chosen: dict) -> dict:
        if "http" in names:  # aiohttp's own default waits 300 s for a silent server, per request
            import aiohttp

            client = dict(chosen.get("client_kwargs") or {})
            timeout = client.get("timeout")
            if isinstance(timeout, dict):  # JSON storage options: the fields of aiohttp.ClientTimeout
                try:
                    client["timeout"] = aiohttp.ClientTimeout(**timeout)
                except TypeError as exc:
                    raise ValueError(f"storage options: http client_kwargs.timeout takes total, connect, "
                                     f"sock_connect, sock_read ({exc})") from None
            elif timeout is None:
                client["timeout"] = aiohttp.ClientTimeout(total=self.timeouts.input, sock_connect=self.timeouts.connect,
                                                          sock_read=self.timeouts.read)
            return {**chosen, "client_kwargs": client}
        if "s3" in names:  # botocore's Config
            config = {"connect_timeout": self.timeouts.connect, "read_timeout": self.timeouts.read,
                      **(chosen.get("config_kwargs") or {})}
            return {**chosen, "config_kwargs": config}
        return chosen

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol = fsspec.utils.get_protocol(uri)
        cls = fsspec.get_filesystem_class(protocol)
        if issubclass(cls, LocalFileSystem):
            return fsspec.core.url_to_fs(uri)
        fs = _filesystem(protocol, self.options_for(protocol))
        return fs, fs._strip_protocol(uri)

    def retry(self, what: str, fn: Callable[[], T], deadline: float | None = None, prefix: bool = True,
              uri: str | None = None) -> T:
        """Run ``fn``, retrying transient storage errors with jittered exponential backoff; with a
        ``deadline`` (``time.monotonic()``), no try starts after it. ``what`` names the operation in the log
        and, with ``prefix``, in the final error (an input's reason names its URI itself).

        With ``uri`` (ipaflow's own files: outputs, records, the lease), a failure to reach the store counts
        toward its ``Outage`` (``ipaflow.core.outages``) and is retried for as long as the outage lasts, up to
        $IPAFLOW_OUTAGE_TIMEOUT; then (and at once for a while after the process gave up on the store) it raises
        StorageUnreachable."""
        spell = outage(uri) if uri is not None and not is_local(uri) else None
        if spell is not None and spell.stopping():
            raise spell.give_up(self.timeouts.outage)
        attempt = 0
        while True:
            tried = time.monotonic()
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                if spell is not None and is_unreachable(exc):
                    if spell.failed(exc, self.timeouts.outage, tried) >= self.timeouts.outage:
                        raise spell.give_up(self.timeouts.outage) from exc
                    time.sleep(min(self.backoff_s * 2 ** min(attempt, 8), MAX_BACKOFF_S) * (0.5 + random.random()))
                    attempt += 1
                    continue
                if not is_transient(exc):
                    raise
                now = time.monotonic()
                delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
                out_of_time = deadline is not None and now + delay >= deadline  # no time left for another try
                if out_of_time and is_timeout(exc):
                    raise InputTimeout(f"no complete answer within {self.timeouts.input:g} s "
                                       f"(${INPUT_TIMEOUT_ENV})") from None
                if out_of_time or attempt >= self.retries:
                    # cut by the deadline, the number of tries depends on the backoff's jitter: say the limit
                    spent = (f"retries within {self.timeouts.input:g} s (${INPUT_TIMEOUT_ENV})" if out_of_time
                             else f"{attempt + 1} tries")
                    raise TransientStorageError(
                        f"{what + ': ' if prefix else ''}still failing after {spent}: {self.redact(describe_error(exc))}"
                    ) from None
                log.warning("%s failed (%s); retrying in %.2fs", what, self.redact(describe_error(exc)), delay)
                time.sleep(delay)
                attempt += 1
            else:
                if spell is not None:
                    spell.succeeded()
                return result

    def _call(self, what: str, uri: str, method: str, *args, **kwargs):
        """One request for ipaflow's own files (``fs.<method>``), retried (``retry`` with ``uri``); on an async
        filesystem each try is cancelled at $IPAFLOW_CALL_TIMEOUT, the SDK's own retries included, so that a
        store that accepts connections and never answers fails like one that refuses them."""
        fs, path = self.fs(uri)
        if fs.async_impl:
            def run():
                return timed(fs, time.monotonic() + self.timeouts.call, getattr(fs, "_" + method)(path, *args, **kwargs))
        else:
            def run():
                return getattr(fs, method)(path, *args, **kwargs)
        return self.retry(f"{what} {self.redact(uri)}", run, uri=uri)

    def gave_up(self, uri: str) -> StorageUnreachable | None:
        """The outage this process gave up on, of the store ``uri`` lives in, while it is stopping."""
        spell = outage(uri) if not is_local(uri) else None
        return spell.give_up(self.timeouts.outage) if spell is not None and spell.stopping() else None

    def _deadline(self) -> float:
        return time.monotonic() + self.timeouts.input

    # -- reading ipaflow's own files -------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        """A whole file ipaflow wrote itself (metadata, outputs); inputs go through ``read_input``."""
        return self._call("read", uri, "cat_file")

    def read_tail(self, uri: str, size: int) -> bytes:
        """The last ``size`` bytes of a file ipaflow wrote itself (a Parquet footer), each request bounded."""
        length = self._call("stat", uri, "size")
        return self._call("read", uri, "cat_file", start=max(0, length - size))

    def exists(self, uri: str) -> bool:
        return self._call("stat", uri, "exists")

    def list_files(self, folder_uri: str) -> list[str]:
        """Every file under a folder (recursively) as a path relative to it; [] when the folder is missing."""
        root = self.fs(folder_uri)[1].rstrip("/")
        try:
            found = self._call("list", folder_uri.rstrip("/"), "find")
        except FileNotFoundError:
            return []
        return sorted(posixpath.relpath(name, root) for name in found)

    def resolved(self, uri: str) -> str:
        """The name two spellings of one input share: a local path made absolute with links resolved
        (``odd/x.png``, ``./odd//x.png``); any other URI as written (``a//b`` and ``a/b`` are different keys)."""
        if not is_local(uri):
            return uri
        return os.path.realpath(uri.removeprefix("file://"))

    # -- writing -----------------------------------------------------------------------------------------
    def write_atomic(self, uri: str, data: bytes) -> None:
        """Write ``data`` so that readers see either nothing or the whole object, never a part of it.

        Object stores publish a PUT whole. Local files are written into ``local_staging`` (on the same
        filesystem) and renamed into place.
        """
        fs, path = self.fs(uri)
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            staging = fs._strip_protocol(self.local_staging) if self.local_staging else os.path.dirname(path)
            os.makedirs(staging, exist_ok=True)
            temp = os.path.join(staging, f".{uuid.uuid4().hex}.partial")
            try:
                with open(temp, "wb") as handle:
                    handle.write(data)
                os.replace(temp, path)
            finally:
                if os.path.exists(temp):
                    os.unlink(temp)
            return
        kwargs = {}
        content_type = CONTENT_TYPES.get(posixpath.splitext(path)[1].lower())
        if content_type and fsspec.utils.get_protocol(uri) in ("s3", "s3a"):
            kwargs["ContentType"] = content_type
        self._call("write", uri, "pipe_file", data, **kwargs)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Write ``data`` at ``uri`` only if nothing is there; False when something is. Local files are linked
        into place (atomic, fails when the name exists); object stores use a conditional PUT where the
        filesystem offers one (S3's If-None-Match), else a check then a write."""
        fs, path = self.fs(uri)
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temp = os.path.join(os.path.dirname(path), f".{uuid.uuid4().hex}.partial")
            try:
                with open(temp, "wb") as handle:
                    handle.write(data)
                os.link(temp, path)
                return True
            except FileExistsError:
                return False
            finally:
                if os.path.exists(temp):
                    os.unlink(temp)
        if "mode" in inspect.signature(fs.pipe_file).parameters and fsspec.utils.get_protocol(uri) in ("s3", "s3a"):
            try:
                self._call("write", uri, "pipe_file", data, mode="create")
                return True
            except OSError:
                if self.exists(uri):  # s3fs reports the failed precondition as an OSError
                    return False
                raise
        if self.exists(uri):
            return False
        self.write_atomic(uri, data)
        return True

    def clean_staging(self) -> int:
        """Remove the partial files a killed run left in ``local_staging``; returns how many."""
        if not self.local_staging or not is_local(self.local_staging):
            return 0
        folder = fsspec.core.url_to_fs(self.local_staging)[1]
        if not os.path.isdir(folder):
            return 0
        stale = [name for name in os.listdir(folder) if name.endswith(".partial")]
        for name in stale:
            os.unlink(os.path.join(folder, name))
        return len(stale)

    def delete(self, uri: str) -> None:
        try:
            self._call("delete", uri, "rm_file")
        except FileNotFoundError:
            pass
