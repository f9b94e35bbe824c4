"""Storage I/O through fsspec: local paths, file://, s3:// (s3fs), http(s)://, and any other fsspec protocol.

- Every request is retried with backoff on transient errors (connection resets, timeouts, 5xx, throttling).
  On S3, botocore retries first (its own config: AWS_MAX_ATTEMPTS, AWS_RETRY_MODE or ``config_kwargs``);
  what still fails after that, and what http(s) and other protocols raise, is retried here.
- Writes carry a content type on S3 (image/png, image/gif, text/html, parquet, ...).
- Writes are atomic: an object appears whole or not at all (object stores PUT atomically; local files are
  written aside and renamed into place).
- Credentials come the standard ways (AWS_* variables, ``--storage-options``, fsspec config); each Storage
  carries the ``Redactor`` of its options, and every message it writes goes through it.
- Inputs (``read_input``, ``identity``, ``list_images``) are read bounded: regular files only (a FIFO or a
  device is refused after a stat, never opened for a blocking read), the size checked before reading (stat,
  HEAD or Content-Length), then a capped streaming read for servers that send more than they said; local
  content hashes are streamed. Each input has connect, read and overall time limits (``Timeouts``), so a
  silent or trickling server costs seconds; while it reads, an input holds its size in a process-wide
  budget of bytes, so many large inputs at once wait for one another instead of filling memory.
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
import stat
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlparse

import fsspec
import fsspec.asyn
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem

from ipaflow.core.budget import Budget
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


MAX_INPUT_BYTES = 256 * 1024 * 1024  # no input is read beyond this
MAX_FOLDER_ENTRIES = 10_000  # entries a listed input folder may have (images and anything else)
READ_CHUNK = 1024 * 1024
# Bytes that inputs being read may hold at once in a process (each holds its size, or the cap when no size
# is known); a read larger than this waits until it can run alone.
READ_BUDGET = Budget(512 * 1024 * 1024)

CONNECT_TIMEOUT_ENV = "IPAFLOW_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "IPAFLOW_READ_TIMEOUT"
INPUT_TIMEOUT_ENV = "IPAFLOW_INPUT_TIMEOUT"


class TransientStorageError(OSError):
    """Storage kept failing after every retry."""


class InputRefused(ValueError):
    """An input ipaflow will not read, and why: not a regular file, or larger than allowed."""


class InputTimeout(Exception):
    """An input that did not arrive whole within its time limit (deliberately not an OSError: never retried)."""


@dataclass(frozen=True)
class Timeouts:
    """How long reads may wait, in seconds. Defaults, overridden by the environment variables named below;
    fsspec's own options win for what they cover (``config_kwargs`` of s3, ``client_kwargs.timeout`` of http).

    - ``connect`` ($IPAFLOW_CONNECT_TIMEOUT): to open a connection.
    - ``read`` ($IPAFLOW_READ_TIMEOUT): for the next bytes of an answer (a silent server).
    - ``input`` ($IPAFLOW_INPUT_TIMEOUT): for one input in all, retries included (a trickling server).
    """

    connect: float = 10.0
    read: float = 30.0
    input: float = 60.0

    @classmethod
    def from_environment(cls) -> Timeouts:
        values = {}
        for name, variable in (("connect", CONNECT_TIMEOUT_ENV), ("read", READ_TIMEOUT_ENV), ("input", INPUT_TIMEOUT_ENV)):
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


def _size_text(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}".replace(".0 ", " ")
    return f"{size} bytes"


def _too_large(size: int | None, limit: int) -> InputRefused:
    found = f"{_size_text(size)}, " if size is not None else ""
    return InputRefused(f"too large: {found}more than the {_size_text(limit)} allowed")


_TIMEOUT_TYPES = ("TimeoutError", "FSTimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "ServerTimeoutError")


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
    if _is_timeout(exc):
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


def _is_timeout(exc: BaseException) -> bool:
    """Whether an error is some library's timeout (asyncio, fsspec, aiohttp, botocore), judged by class name."""
    return any(cls.__name__ in _TIMEOUT_TYPES for cls in type(exc).__mro__)


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


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))


def _regular(mode: int, path: str) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a file")
        raise InputRefused(f"not a regular file ({kind})")


@contextmanager
def _open_local(path: str, max_bytes: int) -> Iterator[tuple[int, int]]:
    """A regular local file opened for reading, with its size: checked with stat before it is opened (a FIFO
    or a device is never opened), opened without blocking, checked again on the open descriptor (a FIFO
    swapped in between), and refused when larger than ``max_bytes``."""
    _regular(os.stat(path).st_mode, path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    handle = os.open(path, flags)
    try:
        info = os.fstat(handle)
        _regular(info.st_mode, path)
        if info.st_size > max_bytes:
            raise _too_large(info.st_size, max_bytes)
        yield handle, info.st_size
    finally:
        os.close(handle)


def _chunks(handle: int, max_bytes: int) -> Iterator[bytes]:
    """The content of an open file in chunks, refused once it passes ``max_bytes`` (a file that grows, or
    reports size 0 as /proc files do)."""
    total = 0
    while chunk := os.read(handle, READ_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(None, max_bytes)
        yield chunk


class _Collector:
    """Chunks gathered into one buffer: allocated once at the expected size when it is known (no copies as
    it grows), else kept as a list and joined at the end (a refused read never holds twice its bytes)."""

    def __init__(self, expected: int | None):
        self.size = 0
        self._buffer = bytearray(expected) if expected else None
        self._parts: list[bytes] = []

    def add(self, chunk: bytes) -> None:
        end = self.size + len(chunk)
        if self._buffer is not None and end <= len(self._buffer):
            self._buffer[self.size:end] = chunk
        else:
            self._parts.append(chunk)
        self.size = end

    def data(self) -> bytes | bytearray:
        if self._buffer is None:
            return b"".join(self._parts)
        filled = self.size - sum(len(part) for part in self._parts)
        del self._buffer[filled:]
        for part in self._parts:  # more than expected arrived (a growing file)
            self._buffer += part
        return self._buffer


def _list_local(path: str, limit: int) -> list[dict]:
    """Entries directly in a local folder (at most ``limit + 1``: enough to tell that there are too many)."""
    entries = []
    with os.scandir(path) as found:
        for entry in found:
            entries.append({"name": entry.path, "type": "directory" if entry.is_dir() else "file"})
            if len(entries) > limit:
                break
    return entries


def _is_http(fs) -> bool:
    return "http" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _timed(fs, deadline: float, coroutine):
    """Run a coroutine of an async filesystem on its loop, cancelled at ``deadline``: a server that trickles
    bytes forever, or a client's own retries, cannot outlast it."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        coroutine.close()
        raise FSTimeoutError

    async def run():
        return await coroutine

    return fsspec.asyn.sync(fs.loop, run, timeout=remaining)


def _http_status(response, url: str) -> None:
    if response.status == 404:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), url)
    response.raise_for_status()


async def _http_info(fs, url: str) -> dict:
    """A URL's size and identity headers, as HTTPFileSystem.info finds them (HEAD, else a GET whose body is
    not read), but keeping the real error: fsspec reports any failure, a refused connection or a timeout
    included, as "not found"."""
    import aiohttp
    from fsspec.implementations.http import _file_info

    session = await fs.set_session()
    try:
        info = await _file_info(fs.encode_url(url), session, size_policy="head", **fs.kwargs)
    except aiohttp.ClientResponseError as exc:
        if exc.status == 404:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), url) from None
        if exc.status not in (403, 405, 501):  # servers that refuse HEAD may still answer GET
            raise
        try:
            info = await _file_info(fs.encode_url(url), session, size_policy="get", **fs.kwargs)
        except aiohttp.ClientResponseError as again:
            if again.status == 404:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), url) from None
            raise
    return {"name": url, "size": None, **info, "type": "file"}


async def _http_read(fs, url: str, limit: int, announced: bool) -> bytes | bytearray:
    """A URL's body, streamed and cut off past ``limit`` bytes (the size HEAD announced, or the cap)."""
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), **fs.kwargs) as response:
        _http_status(response, url)
        collected = _Collector(limit if announced else None)
        async for chunk in response.content.iter_chunked(READ_CHUNK):
            collected.add(chunk)
            if collected.size > limit:
                if announced:
                    raise InputRefused(f"sent more than the {limit} bytes it announced")
                raise _too_large(None, limit)
        return collected.data()


def _page_links(text: str, url: str) -> list[str]:
    """The links of an index page under ``url``, as fsspec's HTTPFileSystem.ls finds them (its patterns: any
    http(s) URL and every <a href>), keeping those below ``url``."""
    from fsspec.implementations.http import ex, ex2

    parts = urlparse(url)
    base = url.rstrip("/") + "/"
    found = set()
    for link in ex2.findall(text) + [match[2] for match in ex.findall(text)]:
        if link.startswith("/") and len(link) > 1:
            link = f"{parts.scheme}://{parts.netloc}{link}"
        if link.startswith("http"):
            if link.replace("https", "http").startswith(base.replace("https", "http")):
                found.add(link)
        elif link not in ("..", "../"):
            found.add(base + link.lstrip("/"))
    return sorted(found)


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

    def retry(self, what: str, fn: Callable[[], T], deadline: float | None = None, prefix: bool = True) -> T:
        """Run ``fn``, retrying transient storage errors with jittered exponential backoff; with a
        ``deadline`` (``time.monotonic()``), no try starts after it. ``what`` names the operation in the log
        and, with ``prefix``, in the final error (an input's reason names its URI itself)."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_transient(exc):
                    raise
                now = time.monotonic()
                delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
                out_of_time = deadline is not None and now + delay >= deadline  # no time left for another try
                if out_of_time and _is_timeout(exc):
                    raise InputTimeout(f"no complete answer within {self.timeouts.input:g} s "
                                       f"(${INPUT_TIMEOUT_ENV})") from None
                if out_of_time or attempt == self.retries:
                    # cut by the deadline, the number of tries depends on the backoff's jitter: say the limit
                    spent = (f"retries within {self.timeouts.input:g} s (${INPUT_TIMEOUT_ENV})" if out_of_time
                             else f"{attempt + 1} tries")
                    raise TransientStorageError(
                        f"{what + ': ' if prefix else ''}still failing after {spent}: {self.redact(describe_error(exc))}"
                    ) from None
                log.warning("%s failed (%s); retrying in %.2fs", what, self.redact(describe_error(exc)), delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _deadline(self) -> float:
        return time.monotonic() + self.timeouts.input

    # -- reading ipaflow's own files -------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        """A whole file ipaflow wrote itself (metadata, outputs); inputs go through ``read_input``."""
        fs, path = self.fs(uri)
        return self.retry(f"read {self.redact(uri)}", lambda: fs.cat_file(path))

    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        return self.retry(f"stat {self.redact(uri)}", lambda: fs.exists(path))

    def require_regular(self, uri: str) -> None:
        """Raise InputRefused (or IsADirectoryError) unless ``uri`` is a regular file; a no-op for object
        stores and URLs, where nothing blocks like a FIFO or never ends like a device."""
        fs, path = self.fs(uri)
        if isinstance(fs, LocalFileSystem):
            _regular(os.stat(path).st_mode, path)

    # -- reading inputs, bounded in bytes and seconds -------------------------------------------------------
    def read_input(self, uri: str, max_bytes: int = MAX_INPUT_BYTES) -> bytes | bytearray:
        """The content of one input file: a regular file (local), or an object / URL, of at most
        ``max_bytes``. Raises FileNotFoundError, IsADirectoryError, InputRefused (not a regular file, too
        large), InputTimeout, or the storage's own error after its retries."""
        fs, path = self.fs(uri)
        if isinstance(fs, LocalFileSystem):
            with _open_local(path, max_bytes) as (handle, size):
                with READ_BUDGET.holding(min(size or READ_CHUNK, max_bytes)):
                    collected = _Collector(size)
                    for chunk in _chunks(handle, max_bytes):
                        collected.add(chunk)
                    return collected.data()
        deadline = self._deadline()
        return self.retry(f"read {self.redact(uri)}", lambda: self._read_remote(fs, path, max_bytes, deadline), deadline,
                          prefix=False)  # the row's reason names the URI itself

    def _read_remote(self, fs, path: str, max_bytes: int, deadline: float, info: dict | None = None
                     ) -> bytes | bytearray:
        """A remote input, at most ``max_bytes`` (``info``: its metadata, when the caller has it already)."""
        info = info if info is not None else self._info(fs, path, deadline)
        if info.get("type") == "directory":
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        size = info.get("size")
        if size is not None and size > max_bytes:
            raise _too_large(size, max_bytes)
        limit = max_bytes if size is None else size
        with READ_BUDGET.holding(limit):
            if _is_http(fs):
                return _timed(fs, deadline, _http_read(fs, path, limit, announced=size is not None))
            if fs.async_impl:
                data = _timed(fs, deadline, fs._cat_file(path, start=0, end=limit + (size is None))) if limit else b""
            else:
                with fs.open(path, "rb") as handle:
                    collected = _Collector(size)
                    while collected.size <= limit:
                        if time.monotonic() >= deadline:  # never a part of the file as if it were whole
                            raise FSTimeoutError
                        chunk = handle.read(READ_CHUNK)
                        if not chunk:
                            break
                        collected.add(chunk)
                    data = collected.data()
            if len(data) > limit:
                raise _too_large(None, max_bytes) if size is None else InputRefused(
                    f"sent more than the {size} bytes it announced")
            return data

    def _info(self, fs, path: str, deadline: float) -> dict:
        """What a remote input's metadata says (size, ETag, ...), within the deadline."""
        if _is_http(fs):
            return _timed(fs, deadline, _http_info(fs, path))
        if fs.async_impl:
            return _timed(fs, deadline, fs._info(path))
        return fs.info(path)

    def identity(self, uri: str, max_bytes: int = MAX_INPUT_BYTES) -> str:
        """What identifies the current content of ``uri``: an object's ETag (or size and mtime) without
        reading it; a local file's content hash (streamed). The same refusals as ``read_input``."""
        fs, path = self.fs(uri)
        if isinstance(fs, LocalFileSystem):
            digest = hashlib.sha256()
            with _open_local(path, max_bytes) as (handle, _):
                for chunk in _chunks(handle, max_bytes):
                    digest.update(chunk)
            return "sha256:" + digest.hexdigest()
        deadline = self._deadline()
        info = self.retry(f"stat {self.redact(uri)}", lambda: self._info(fs, path, deadline), deadline, prefix=False)
        if info.get("type") == "directory":
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), uri)
        if info.get("size") is not None and info["size"] > max_bytes:
            raise _too_large(info["size"], max_bytes)
        if found := _identity(info):
            return found
        # no ETag, size or mtime to go by: hash the content, read with the metadata just fetched (one HEAD)
        data = self.retry(f"read {self.redact(uri)}", lambda: self._read_remote(fs, path, max_bytes, deadline, info),
                          deadline, prefix=False)
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def list_images(self, folder_uri: str, limit: int = MAX_FOLDER_ENTRIES) -> list[tuple[str, str]]:
        """(URI, identity) of the image files directly under a folder or prefix, sorted by name; other
        files are ignored. One listing, no per-file requests; a folder of more than ``limit`` entries is
        refused (InputRefused) without listing the rest."""
        fs, path = self.fs(folder_uri)
        local = isinstance(fs, LocalFileSystem)
        if local:
            entries = _list_local(path, limit)
        else:
            deadline = self._deadline()
            entries = self.retry(f"list {self.redact(folder_uri)}", lambda: self._list_remote(fs, path, limit, deadline),
                                 deadline, prefix=False)
        if len(entries) > limit:
            raise InputRefused(f"too many entries: more than {limit}")
        found = [
            (e["name"] if local or _is_http(fs) else fs.unstrip_protocol(e["name"]), _identity(e) or "")
            for e in entries
            if e.get("type") != "directory" and e["name"].lower().endswith(IMAGE_SUFFIXES)
        ]
        return sorted(found, key=lambda item: posixpath.basename(item[0]))

    def _list_remote(self, fs, path: str, limit: int, deadline: float) -> list[dict]:
        if _is_http(fs):  # an index page: read bounded, links parsed as fsspec's HTTPFileSystem.ls does
            page = _timed(fs, deadline, _http_read(fs, path, 8 * 1024 * 1024, announced=False))
            return [{"name": url, "type": "directory" if url.endswith("/") else "file"}
                    for url in _page_links(bytes(page).decode("utf-8", "replace"), path)[:limit + 1]]
        root = path.rstrip("/")
        lsdir = getattr(fs, "_lsdir", None)
        if lsdir is not None and "max_items" in inspect.signature(lsdir).parameters:  # s3fs: stop after limit
            return _timed(fs, deadline, lsdir(root, max_items=limit + 1))
        if fs.async_impl:
            return _timed(fs, deadline, fs._ls(root, detail=True))
        return fs.ls(root, detail=True)

    def list_files(self, folder_uri: str) -> list[str]:
        """Every file under a folder (recursively) as a path relative to it; [] when the folder is missing."""
        fs, path = self.fs(folder_uri)
        root = path.rstrip("/")
        try:
            found = self.retry(f"list {self.redact(folder_uri)}", lambda: fs.find(root))
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
        self.retry(f"write {self.redact(uri)}", lambda: fs.pipe_file(path, data, **kwargs))

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
                self.retry(f"write {self.redact(uri)}", lambda: fs.pipe_file(path, data, mode="create"))
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
        fs, path = self.fs(uri)
        try:
            self.retry(f"delete {self.redact(uri)}", lambda: fs.rm_file(path))
        except FileNotFoundError:
            pass
