"""Storage I/O through fsspec: local paths, file://, s3:// (s3fs), http(s)://, and any other fsspec protocol.

- Every request is retried with backoff on transient errors (connection resets, timeouts, 5xx, throttling).
  On S3, botocore retries first (its own config: AWS_MAX_ATTEMPTS, AWS_RETRY_MODE or ``config_kwargs``);
  what still fails after that, and what http(s) and other protocols raise, is retried here.
- Writes carry a content type on S3 (image/png, image/gif, text/html, parquet, ...).
- Writes are atomic: an object appears whole or not at all (object stores PUT atomically; local files are
  written aside and renamed into place).
- Credentials come the standard ways (AWS_* variables, ``--storage-options``, fsspec config); each Storage
  carries the ``Redactor`` of its options, and every message it writes goes through it.
"""

from __future__ import annotations

import errno
import hashlib
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

from ipaflow.core.redaction import Redactor

log = logging.getLogger("ipaflow.storage")
T = TypeVar("T")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".html": "text/html; charset=utf-8",
    ".parquet": "application/vnd.apache.parquet",
    ".json": "application/json",
}


class TransientStorageError(OSError):
    """Storage kept failing after every retry."""


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


def _identity(info: dict) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "crc32c"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}:{info.get('size')}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if mtime is not None:
        return f"mtime:{mtime}:{info.get('size')}"
    return None


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
class Storage:
    """fsspec access with ipaflow's retry, atomic-write and redaction rules.

    ``options`` are fsspec keyword arguments in fsspec's own forms: flat (``{"key": ..., "client_kwargs":
    {"endpoint_url": ...}}``), keyed by protocol (``{"s3": {...}, "http": {...}}``), or both, the protocol's
    own dict winning. Flat keys serve object stores; http(s) only gets its own dict, because HTTPFileSystem
    passes unknown kwargs on to every request.

    Filesystems come from ``_filesystem``: shared in the process, but never serving a stale listing.
    """

    options: dict = field(default_factory=dict, repr=False)  # may hold credentials
    retries: int = 5
    backoff_s: float = 0.2
    local_staging: str | None = None  # where local writes are staged before their rename
    redactor: Redactor = field(default=None, repr=False)  # default: the redactor of ``options``

    def __post_init__(self) -> None:
        if self.redactor is None:
            self.redactor = Redactor(self.options)

    def redact(self, text) -> str:
        """``text`` without the credentials of this storage's options or the environment."""
        return self.redactor.redact(text)

    def options_for(self, protocol: str) -> dict:
        """The fsspec kwargs for one protocol (see the class docstring)."""
        if not self.options or protocol in ("file", "local"):
            return {}
        names = fsspec.get_filesystem_class(protocol).protocol
        names = (names,) if isinstance(names, str) else names
        protocols = set(fsspec.available_protocols())
        chosen = {} if "http" in names else {
            k: v for k, v in self.options.items() if not (k in protocols and isinstance(v, dict))
        }
        for name in sorted(names, key=lambda n: n == protocol):  # the URI's own spelling last, so it wins
            chosen.update(self.options.get(name) or {})
        return chosen

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol = fsspec.utils.get_protocol(uri)
        cls = fsspec.get_filesystem_class(protocol)
        if issubclass(cls, LocalFileSystem):
            return fsspec.core.url_to_fs(uri)
        fs = _filesystem(protocol, self.options_for(protocol))
        return fs, fs._strip_protocol(uri)

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient storage errors with jittered exponential backoff."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_transient(exc):
                    raise
                if attempt == self.retries:
                    raise TransientStorageError(
                        f"{what}: still failing after {attempt + 1} tries: {type(exc).__name__}: {self.redact(exc)}"
                    ) from None
                delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
                log.warning("%s failed (%s); retrying in %.2fs", what, self.redact(exc), delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- reading -----------------------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.fs(uri)
        return self.retry(f"read {self.redact(uri)}", lambda: fs.cat_file(path))

    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        return self.retry(f"stat {self.redact(uri)}", lambda: fs.exists(path))

    def identity(self, uri: str) -> str:
        """What identifies the current content of ``uri``: an object's ETag (or size and mtime) without
        reading it; a local file's content hash."""
        fs, path = self.fs(uri)
        info = self.retry(f"stat {self.redact(uri)}", lambda: fs.info(path))
        if info.get("type") == "directory":
            raise IsADirectoryError(uri)
        if isinstance(fs, LocalFileSystem) or not _identity(info):  # local reads are cheap: hash the content
            return "sha256:" + hashlib.sha256(self.read_bytes(uri)).hexdigest()
        return _identity(info)

    def list_images(self, folder_uri: str) -> list[tuple[str, str]]:
        """(URI, identity) of the image files directly under a folder or prefix, sorted by name; other
        files are ignored. One listing, no per-file requests."""
        fs, path = self.fs(folder_uri)
        entries = self.retry(f"list {self.redact(folder_uri)}", lambda: fs.ls(path.rstrip("/"), detail=True))
        local = fsspec.utils.get_protocol(folder_uri) in ("file", "local")
        found = [
            (e["name"] if local else fs.unstrip_protocol(e["name"]), _identity(e) or "")
            for e in entries
            if e.get("type") != "directory" and e["name"].lower().endswith(IMAGE_SUFFIXES)
        ]
        return sorted(found, key=lambda item: posixpath.basename(item[0]))

    def list_files(self, folder_uri: str) -> list[str]:
        """Every file under a folder (recursively) as a path relative to it; [] when the folder is missing."""
        fs, path = self.fs(folder_uri)
        root = path.rstrip("/")
        try:
            found = self.retry(f"list {self.redact(folder_uri)}", lambda: fs.find(root))
        except FileNotFoundError:
            return []
        return sorted(posixpath.relpath(name, root) for name in found)

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
        self.retry(f"write {self.redact(uri)}", lambda: fs.pipe_file(path, data, **kwargs))

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
        fs, path = self.fs(uri)
        try:
            self.retry(f"delete {self.redact(uri)}", lambda: fs.rm_file(path))
        except FileNotFoundError:
            pass
