"""The files a manifest is made of: one file, or a folder, prefix or glob of them, listed once and pinned.

A manifest given as a folder (``manifests/``, ``s3://bucket/manifests/``) or a glob (``manifests/*.parquet``,
``manifests/**/part-*.parquet``) is one stream of rows: its files are listed once, when the manifest is opened,
sorted by path; names starting with ``_`` or ``.`` (Spark's ``_SUCCESS``, hidden files) and ``.crc`` files are
skipped, as Spark and Hadoop write them, and so are files of other formats (inputs kept beside them).

One snapshot per run: every file of a manifest, a one-file manifest too, is pinned when the manifest is opened
(its size, mtime and inode on a local disk; its size and ETag, and its version id on a versioned bucket), and
every pass over it (the head, the census, the rows) reads exactly that (``open_file``): a local file is checked
on the open handle itself, when opened and after each batch (a file replaced by ``mv`` or rewritten in place is
refused, never read); an object is read by its version id where the bucket keeps versions (a replaced object
does not matter: the pinned version is read), else each range request carries ``If-Match: <ETag>``, so a
replaced object fails the next request instead of handing over another file's bytes. A file that changed is a
``ManifestError`` naming it, so the census and the rows never read different files.
Hive-style folder names (``date=2026-12-01/``) become string columns of the rows below them.

Every read of a manifest file is a request bounded by ``$IPAFLOW_CALL_TIMEOUT`` (``ipaflow.core.deadlines``),
as ipaflow's own files are (``core.storage``): a store that stops answering fails the run, never hangs it.
"""

from __future__ import annotations

import io
import os
import posixpath
import time
from dataclasses import dataclass

from ipaflow.core.deadlines import timed
from ipaflow.core.errors import UserError
from ipaflow.core.storage import Storage, is_local

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
GLOB_CHARACTERS = "*?["
READ_BLOCK = 4 << 20  # bytes per bounded request when a manifest file is read from an object store


class ManifestError(UserError, ValueError):
    """The manifest as a whole cannot be read (missing file, unknown format, missing or repeated column).
    Nothing ran: exit 2."""


@dataclass(frozen=True)
class ManifestFile:
    """One file of a manifest: ``name`` is its path relative to the manifest's root (what messages show),
    ``partition`` its Hive columns (``(("date", "2026-12-01"),)``), ``identity`` what it was when listed."""

    uri: str
    name: str
    format: str
    partition: tuple[tuple[str, str], ...] = ()
    identity: tuple = ()
    version: str | None = None  # the object's version id, where the store keeps versions: what is read

    @property
    def base(self) -> str:
        """The folder that relative input paths in this file are resolved against."""
        return posixpath.dirname(self.uri.rstrip("/"))


def format_of(uri: str, redact) -> str:
    path = uri.split("?", 1)[0].lower()
    for suffix, fmt in FORMATS.items():
        if path.endswith(suffix):
            return fmt
    raise ManifestError(f"{redact(uri)}: unknown manifest format; use .parquet, .csv or .jsonl")


def _skipped(name: str) -> bool:
    """A file Spark or Hadoop writes beside the data (``_SUCCESS``, ``_committed_*``, ``.part-0.crc``), a hidden
    one, anywhere along the path, or one that is no manifest (an input image kept beside the manifest files)."""
    if name.endswith(".crc") or any(part.startswith(("_", ".")) for part in name.split("/")):
        return True
    return not name.lower().endswith(tuple(FORMATS))


def _identity(info: dict) -> tuple:
    """What a file was when pinned: (size, ETag) on an object store; (size, "mtime:inode") on a local disk."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    if info.get("ino") and info.get("mtime") is not None and not (info.get("ETag") or info.get("etag")):
        tag = f"{info['mtime']}:{info['ino']}"
    return (info.get("size"), str(tag))


def _version(info: dict) -> str | None:
    version = info.get("VersionId") or info.get("version_id")
    return str(version) if version and version != "null" else None


def _changed(file: ManifestFile, redact) -> ManifestError:
    return ManifestError(f"{redact(file.uri)}: the manifest file changed while the run read it; "
                         "run again once it is written")


def _partition(name: str, redact) -> tuple[tuple[str, str], ...]:
    pairs = []
    for part in name.split("/")[:-1]:
        if "=" in part:
            key, value = part.split("=", 1)
            if not key:
                raise ManifestError(f"{redact(name)}: folder {part!r} has no column name before '='")
            if key in dict(pairs):
                raise ManifestError(f"{redact(name)}: Hive column {key!r} appears twice in the path")
            pairs.append((key, value))
    return tuple(pairs)


def list_files(uri: str, storage: Storage) -> tuple[list[ManifestFile], bool]:
    """The manifest's files, sorted by path, and whether it is a folder or glob (False: one file, as given)."""
    redact = storage.redact
    fs, path = storage.fs(uri)
    is_glob = any(c in path for c in GLOB_CHARACTERS)
    if not is_glob:
        info = _info(storage, uri)
        if info is None:
            format_of(uri, redact)  # an unknown format is said first, as for a file that exists
            raise ManifestError(f"{redact(uri)}: manifest not found")
        if info.get("type") != "directory":
            return [ManifestFile(uri=uri, name=posixpath.basename(path), format=format_of(uri, redact),
                                 identity=_identity(info), version=_version(info))], False
        root = path.rstrip("/")
        found = storage._call("list", uri.rstrip("/"), "find", detail=True)
    else:
        root = path[:min(path.index(c) for c in GLOB_CHARACTERS if c in path)].rsplit("/", 1)[0]
        found = storage._call("list", uri, "glob", detail=True)
    prefix = uri[:len(uri) - len(path)] if uri.endswith(path) else _prefix_of(uri)
    files = []
    for full in sorted(found):
        info = found[full]
        if info.get("type") == "directory":
            continue
        name = posixpath.relpath(full, root) if root else full
        if _skipped(name):
            continue
        file_uri = prefix + full if prefix else full
        files.append(ManifestFile(uri=file_uri, name=name, format=format_of(file_uri, redact),
                                  partition=_partition(name, redact), identity=_identity(info),
                                  version=_version(info)))
    if not files:
        what = "no file matches the pattern" if is_glob else "the folder holds no manifest file"
        raise ManifestError(f"{redact(uri)}: {what}")
    return files, True


def _prefix_of(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if "://" in uri else ""


def _info(storage: Storage, uri: str) -> dict | None:
    try:
        return storage._call("stat", uri, "info")
    except FileNotFoundError:
        return None


def check_unchanged(file: ManifestFile, storage: Storage) -> None:
    """Refuse a file that changed since it was pinned: its rows would no longer be the rows planned."""
    info = _info(storage, file.uri)
    if info is None or _identity(info) != file.identity:
        raise _changed(file, storage.redact)


class _PinnedLocal(io.FileIO):
    """A local manifest file, checked on the open handle against what was pinned: when opened (a file replaced
    since is refused) and after each batch read from it (a file rewritten in place while read is refused). A
    file replaced by ``mv`` while a pass reads it does not matter: the handle reads the pinned file to its end."""

    def __init__(self, file: ManifestFile, path: str, redact):
        super().__init__(path, "rb")
        self.file, self.redact = file, redact
        self.check()

    def check(self) -> None:
        stat = os.fstat(self.fileno())
        if (stat.st_size, f"{stat.st_mtime}:{stat.st_ino}") != self.file.identity:
            raise _changed(self.file, self.redact)


class _BoundedRaw(io.RawIOBase):
    """A file of an async store read by range requests, each one cancelled at ``$IPAFLOW_CALL_TIMEOUT`` and each
    one of the pinned object: its version where the store keeps versions, else ``If-Match`` its ETag (S3)."""

    def __init__(self, fs, path: str, size: int, seconds: float, file: ManifestFile | None = None, redact=str):
        self.fs, self.path, self.size, self.seconds, self.position = fs, path, size, seconds, 0
        self.file, self.redact = file, redact

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: offset, 1: self.position + offset, 2: self.size + offset}[whence]
        return self.position

    def pin(self) -> dict:
        """What each request carries to read the pinned object: its version id, else ``If-Match`` (S3 only)."""
        if self.file is None or not hasattr(self.fs, "_call_s3"):
            return {}
        if self.file.version:
            return {"VersionId": self.file.version}
        tag = self.file.identity[1] if len(self.file.identity) > 1 else None
        return {"IfMatch": tag} if tag and tag != "None" else {}

    async def _range(self, start: int, end: int) -> bytes:
        pin = self.pin()
        if not pin:
            return await self.fs._cat_file(self.path, start=start, end=end)
        bucket, key, _ = self.fs.split_path(self.path)
        response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                          **pin, **getattr(self.fs, "req_kw", {}))
        try:
            return await response["Body"].read()
        finally:
            response["Body"].close()

    def readinto(self, buffer) -> int:
        end = min(self.size, self.position + len(buffer))
        if end <= self.position:
            return 0
        try:
            data = timed(self.fs, time.monotonic() + self.seconds, self._range(self.position, end))
        except OSError as exc:
            if self.file is not None and _precondition_failed(exc):  # If-Match: the object was replaced
                raise _changed(self.file, self.redact) from None
            raise
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


def _precondition_failed(exc: BaseException) -> bool:
    """Whether a failed read was refused because the object no longer matches ``If-Match`` (HTTP 412; s3fs
    keeps the store's answer on the error it translated)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def open_file(file: ManifestFile, storage: Storage):
    """A manifest file opened for reading (binary, seekable), as pinned (see the module docstring); on an object
    store each request is bounded. A file that changed since it was pinned raises ManifestError, at the open or
    at the read that meets the change."""
    fs, path = storage.fs(file.uri)
    if is_local(file.uri) and len(file.identity) > 1 and ":" in str(file.identity[1]):
        try:
            return io.BufferedReader(_PinnedLocal(file, path, storage.redact))
        except FileNotFoundError:
            raise _changed(file, storage.redact) from None
    if not fs.async_impl:
        check_unchanged(file, storage)
        return fs.open(path, "rb")
    size = file.identity[0] if file.identity and file.identity[0] is not None else fs.size(path)
    raw = _BoundedRaw(fs, path, int(size), storage.timeouts.call, file, storage.redact)
    if not raw.pin():  # a store without versions or If-Match: checked as listed, when each pass opens it
        check_unchanged(file, storage)
    return io.BufferedReader(raw, buffer_size=READ_BLOCK)


def check_pass(handle) -> None:
    """Refuse a file that changed while this handle read it (the open file itself, on a local disk: a rewrite in
    place); an object store's reads were each of the pinned object already."""
    raw = getattr(handle, "raw", None)
    if isinstance(raw, _PinnedLocal):
        raw.check()
