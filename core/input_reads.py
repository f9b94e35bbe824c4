"""Reading inputs, bounded in bytes, kinds and seconds, whatever the input (a local file, an object, a URL).

- Regular files only: a FIFO or a device is refused after a stat, never opened for a blocking read.
- The size is checked before reading (stat, HEAD or Content-Length), then read with a capped streaming read
  for servers that send more than they said; local content hashes are streamed.
- Each input has connect, read and overall time limits (``ipaflow.core.deadlines.Timeouts``), so a silent or
  trickling server costs seconds; while it reads, an input holds its size in a process-wide budget of bytes,
  so many large inputs at once wait for one another instead of filling memory.

``InputReads`` holds the reads; ``ipaflow.core.storage.Storage`` has them (its retries, filesystems and
redaction serve them).
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import os
import posixpath
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem

from ipaflow.core.budget import Budget
from ipaflow.core.deadlines import timed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

MAX_INPUT_BYTES = 256 * 1024 * 1024  # no input is read beyond this
MAX_FOLDER_ENTRIES = 10_000  # entries a listed input folder may have (images and anything else)
READ_CHUNK = 1024 * 1024
# Bytes that inputs being read may hold at once in a process (each holds its size, or the cap when no size
# is known); a read larger than this waits until it can run alone.
READ_BUDGET = Budget(512 * 1024 * 1024)


class InputRefused(ValueError):
    """An input ipaflow will not read, and why: not a regular file, or larger than allowed."""


class InputTimeout(Exception):
    """An input that did not arrive whole within its time limit (deliberately not an OSError: never retried)."""



def _size_text(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}".replace(".0 ", " ")
    return f"{size} bytes"


def _too_large(size: int | None, limit: int) -> InputRefused:
    found = f"{_size_text(size)}, " if size is not None else ""
    return InputRefused(f"too large: {found}more than the {_size_text(limit)} allowed")



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



class InputReads:
    """The bounded reads of inputs, for a class that has ``fs(uri)``, ``retry(what, fn, deadline, prefix)``,
    ``redact(text)``, ``timeouts`` and ``_deadline()`` (``Storage``)."""

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
                return timed(fs, deadline, _http_read(fs, path, limit, announced=size is not None))
            if fs.async_impl:
                data = timed(fs, deadline, fs._cat_file(path, start=0, end=limit + (size is None))) if limit else b""
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
            return timed(fs, deadline, _http_info(fs, path))
        if fs.async_impl:
            return timed(fs, deadline, fs._info(path))
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
            page = timed(fs, deadline, _http_read(fs, path, 8 * 1024 * 1024, announced=False))
            return [{"name": url, "type": "directory" if url.endswith("/") else "file"}
                    for url in _page_links(bytes(page).decode("utf-8", "replace"), path)[:limit + 1]]
        root = path.rstrip("/")
        lsdir = getattr(fs, "_lsdir", None)
        if lsdir is not None and "max_items" in inspect.signature(lsdir).parameters:  # s3fs: stop after limit
            return timed(fs, deadline, lsdir(root, max_items=limit + 1))
        if fs.async_impl:
            return timed(fs, deadline, fs._ls(root, detail=True))
        return fs.ls(root, detail=True)

