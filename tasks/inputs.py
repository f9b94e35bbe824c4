"""Fetching and decoding a row's inputs: concurrent, bounded, deduplicated, with errors that name the column.

- Reads (``Storage.read_input``) are bounded in bytes and seconds; each input is read once per spelling of
  its resolved name (``odd/x.png`` and ``./odd//x.png`` are one read), and hashed and decoded from those
  same bytes.
- A row's images may hold at most ``MAX_ROW_PIXELS`` in all, counted once per distinct content, and an image
  prompt at most ``MAX_PROMPT_PIXELS``: checked from the images' headers, before any pixel is decoded. A style
  folder gives at most ``MAX_STYLE_IMAGES`` images, and never one of ipaflow's own outputs when it lies
  inside ``--out``.
- Decoded images the fetcher holds are bounded (``PIXELS_AHEAD``): a row decodes only when its pixels fit,
  except the row the caller is waiting for, which always goes ahead (so nothing waits forever). An image
  later rows use again is kept for them (decoded once per shard, as a shared style folder is), and let go
  first when room is needed. ``take`` hands rows over in parts that end when that budget is used, so the
  caller holds no more than it either.

The problem of an input is told the same way whether planning met it (``tasks/keys.py``), ``validate`` or a
worker did: ``input_failure``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import PIL.Image

from ipaflow.core.budget import Budget
from ipaflow.core.input_reads import MAX_INPUT_BYTES
from ipaflow.core.problems import RowFailed
from ipaflow.core.storage import Storage, describe_error, is_local
from ipaflow.specs.outputs import OWN_ENTRIES
from ipaflow.specs.rows import Job
from ipaflow.specs.spec import SIZE_FACTOR, Spec
from ipaflow.tasks.media import MAX_INPUT_PIXELS, MediaError, Probe, decode_image, probe_image

MAX_ROW_PIXELS = MAX_INPUT_PIXELS  # all of a row's distinct images together: one image of the largest size
# One image prompt (an image an IP-Adapter encodes): its image encoder sees it at 224x224, and the image
# processor holds several full-size copies while it shrinks it, so a larger one costs memory for nothing.
MAX_PROMPT_PIXELS = 4096 * 4096
MAX_STYLE_IMAGES = 64  # images a style folder may give one image prompt (as many as a list cell may hold)
PIXELS_AHEAD = MAX_ROW_PIXELS  # decoded pixels a fetcher holds beyond the row its caller waits for
DECODE_THREADS = max(1, min(4, (os.cpu_count() or 1)))


@dataclass
class RowInputs:
    images: dict[str, PIL.Image.Image] = field(default_factory=dict)  # the task profile's inputs, by column
    adapters: list[tuple[str, list[PIL.Image.Image]]] = field(default_factory=list)  # per adapter: (content key, images)
    ip_masks: list[PIL.Image.Image] | None = None


def input_failure(column: str, uri: str, exc: BaseException, redact: Callable[[str], str]) -> RowFailed:
    """The row's problem when reading ``uri`` of ``column`` raised ``exc``: one wording for every stage."""
    if isinstance(exc, RowFailed):
        return exc
    if isinstance(exc, FileNotFoundError):
        return RowFailed.at(column, f"not found: {redact(uri)}")
    if isinstance(exc, MediaError):
        return RowFailed.at(column, f"{redact(uri)}: {exc}")
    return RowFailed.at(column, f"cannot read {redact(uri)}: {redact(describe_error(exc))}")


def _inside(uri: str, folder: str, resolved: Callable[[str], str]) -> str | None:
    """``uri`` relative to ``folder`` when it lies inside it (compared ``Storage.resolved``), else None."""
    if is_local(uri) != is_local(folder):
        return None
    uri, folder = resolved(uri), resolved(folder)
    prefix = folder.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else None


def style_images(storage: Storage, folder: str, out: str | None = None) -> list[tuple[str, str]]:
    """(URI, identity) of a style folder's images, sorted by name: at least one, at most MAX_STYLE_IMAGES,
    none of them ipaflow's own outputs when the folder is ``out`` or lies inside it (the contact sheet, the
    rendered images). Storage errors propagate; a folder that breaks these rules fails the row."""
    redact = storage.redact
    files = storage.list_images(folder)
    owned = [f for f in files if out and (_inside(f[0], out, storage.resolved) or "").split("/", 1)[0] in OWN_ENTRIES]
    files = [f for f in files if f not in owned]
    if not files:
        why = f" (besides ipaflow's own outputs: {len(owned)})" if owned else ""
        raise RowFailed.at("style_folder", f"no images in {redact(folder)}{why}")
    if len(files) > MAX_STYLE_IMAGES:
        raise RowFailed.at("style_folder", f"{redact(folder)} holds {len(files)} images; at most "
                                           f"{MAX_STYLE_IMAGES} form one image prompt")
    return files


@dataclass(frozen=True)
class _Raw:
    """An input read but not decoded."""

    uri: str
    data: bytes | bytearray
    digest: str
    probe: Probe


class _Once:
    """A row's preparation, run by whichever comes first: a decode thread, or the caller that needs it now."""

    def __init__(self, work: Callable[[], RowInputs]):
        self._work = work
        self._claimed = threading.Lock()
        self.future: Future = Future()

    def run(self) -> None:
        if not self._claimed.acquire(blocking=False):
            return
        try:
            self.future.set_result(self._work())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the row
            self.future.set_exception(exc)


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


class InputFetcher:
    """Fetches the inputs of a list of jobs in background threads (see the module docstring)."""

    def __init__(self, storage: Storage, jobs: list[Job], specs: dict[str, Spec], threads: int = 8,
                 out: str | None = None):
        self.storage = storage
        self.redact = storage.redact
        self.specs = specs
        self.out = out
        self.pixels = Budget(PIXELS_AHEAD)
        self._io = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ipaflow-fetch")
        self._lists = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ipaflow-list")  # wait on _io only
        self._cpu = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="ipaflow-decode")
        self._lock = threading.Lock()
        self._files: dict[str, Future] = {}  # by resolved name
        self._folders: dict[str, Future] = {}
        self._rows: dict[str, _Once] = {}
        self._names: dict[str, str] = {}  # URI as written -> read key (resolving a local path costs syscalls)
        self._uses = Counter(key for job in jobs for key in self._keys(job))  # reads still to be taken
        self._pending = Counter(key for job in jobs for key in set(self._keys(job)))  # rows still to be prepared
        self._decoded: weakref.WeakValueDictionary[str, PIL.Image.Image] = weakref.WeakValueDictionary()
        self._kept: OrderedDict[str, PIL.Image.Image] = OrderedDict()  # decoded images later rows will use
        self._digest_keys: dict[str, set[str]] = defaultdict(set)
        self._wanted: str | None = None
        self._closed = False

    def _key(self, uri: str) -> str:
        """The read key of a file URI: one per resolved name."""
        key = self._names.get(uri)
        if key is None:
            key = self._names[uri] = "file:" + self.storage.resolved(uri)
        return key

    def _keys(self, job: Job) -> Iterator[str]:
        for column, value in job.inputs.items():
            if column == "style_folder":
                yield "folder:" + value
            else:
                yield from (self._key(uri) for uri in _listed(value))

    # -- reading ----------------------------------------------------------------------------------------------
    def _read(self, uri: str) -> _Raw:
        data = self.storage.read_input(uri, MAX_INPUT_BYTES)
        return _Raw(uri, data, hashlib.sha256(data).hexdigest(), probe_image(data))

    def _file(self, uri: str) -> Future:
        key = self._key(uri)
        with self._lock:
            if key not in self._files:
                self._files[key] = self._io.submit(self._read, uri)
            return self._files[key]

    def _folder(self, uri: str) -> Future:
        key = "folder:" + uri
        with self._lock:
            if key not in self._folders:
                self._folders[key] = self._lists.submit(self._read_folder, uri)
            return self._folders[key]

    def _read_folder(self, uri: str) -> list[_Raw]:
        try:
            names = [name for name, _ in style_images(self.storage, uri, self.out)]
        except Exception as exc:  # noqa: BLE001 - the row's reason
            raise input_failure("style_folder", uri, exc, self.redact) from None
        futures = [self._io.submit(self._read, name) for name in names]
        raws = []
        for name, future in zip(names, futures):
            try:
                raws.append(future.result())
            except Exception as exc:  # noqa: BLE001
                raise input_failure("style_folder", name, exc, self.redact) from None
        return raws

    def _taken(self, key: str, future: Future, column: str, uri: str) -> list[_Raw]:
        """The read's result (a list), or its failure as the row's problem; the read is let go after its last use."""
        try:
            result = future.result()
            return result if isinstance(result, list) else [result]
        except (RowFailed, CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - storage and decoding errors become the row's reason
            raise input_failure(column, uri, exc, self.redact) from None
        finally:
            with self._lock:
                self._uses[key] -= 1
                if self._uses[key] <= 0:
                    (self._folders if key.startswith("folder:") else self._files).pop(key, None)

    # -- preparing a row ------------------------------------------------------------------------------------
    def _prepare(self, job: Job) -> RowInputs:
        spec = self.specs[job.spec]
        raws: dict[str, list[_Raw]] = {}
        failure: RowFailed | None = None
        for column, value in job.inputs.items():
            try:
                if column == "style_folder":
                    raws[column] = self._taken("folder:" + value, self._folder(value), column, value)
                else:
                    raws[column] = [item for uri in _listed(value) for item in self._taken(
                        self._key(uri), self._file(uri), column, uri)]
            except RowFailed as exc:
                failure = failure or exc
        try:
            if failure:
                raise failure
            self._check_pixels(raws, spec)
            images = self._decode(job, raws)
        finally:  # whatever the outcome, the row no longer needs what later rows may still use
            self._prepared(job, {raw.digest: key for key, items in self._row_keys(job, raws) for raw in items})
        inputs = RowInputs()
        for column in spec.profile.inputs:
            inputs.images[column] = images[raws[column][0].digest]
        if "ip_mask" in raws:
            inputs.ip_masks = [images[raw.digest] for raw in raws["ip_mask"]]
        for column in spec.image_columns:
            key = hashlib.sha256("".join(raw.digest for raw in raws[column]).encode()).hexdigest()
            inputs.adapters.append((key, [images[raw.digest] for raw in raws[column]]))
        return inputs

    def _check_pixels(self, raws: dict[str, list[_Raw]], spec: Spec) -> None:
        """A row's distinct images (by content) hold at most MAX_ROW_PIXELS, and each image prompt at most
        MAX_PROMPT_PIXELS: checked from their headers. A task rendering at its init image's size needs that image
        at least SIZE_FACTOR pixels a side (diffusers rounds the size down to a multiple of 8: 7 pixels is 0)."""
        if spec.profile.sized_by_image:
            for raw in raws.get("image", []):
                if min(raw.probe.width, raw.probe.height) < SIZE_FACTOR:
                    raise RowFailed.at("image", f"{self.redact(raw.uri)}: an image of {raw.probe.width}x"
                                                f"{raw.probe.height} pixels; task {spec.task!r} renders at the size "
                                                f"of its init image, which needs at least {SIZE_FACTOR} pixels a side")
        for column in spec.image_columns:
            for raw in raws.get(column, []):
                if raw.probe.pixels > MAX_PROMPT_PIXELS:
                    raise RowFailed.at(column, f"{self.redact(raw.uri)}: too large for an image prompt: an image of "
                                               f"{raw.probe.width}x{raw.probe.height} pixels, more than the "
                                               f"{MAX_PROMPT_PIXELS} an IP-Adapter image may have (its encoder sees "
                                               "it at 224x224: downscale it)")
        seen: set[str] = set()
        pixels: Counter = Counter()
        count: Counter = Counter()
        for column, items in raws.items():
            for raw in items:
                if raw.digest not in seen:
                    seen.add(raw.digest)
                    pixels[column] += raw.probe.pixels
                    count[column] += 1
        total = sum(pixels.values())
        if total > MAX_ROW_PIXELS:
            details = ", ".join(f"{c}: {count[c]} image(s) of {pixels[c]} pixels" for c in pixels)
            raise RowFailed.at(max(pixels, key=pixels.get),
                               f"too large: the row's images hold {total} pixels in all ({details}), more than "
                               f"the {MAX_ROW_PIXELS} a row may use")

    def _row_keys(self, job: Job, raws: dict[str, list[_Raw]]) -> Iterator[tuple[str, list[_Raw]]]:
        """(read key, its images) for each input of the row."""
        for column, value in job.inputs.items():
            if column == "style_folder":
                yield "folder:" + value, raws.get(column, [])
            else:
                for uri, raw in zip(_listed(value), raws.get(column, [])):
                    yield self._key(uri), [raw]

    def _prepared(self, job: Job, digests: dict[str, str]) -> None:
        """The row is prepared: keep its images that rows still to come use, let go of the others."""
        with self._lock:
            for key in set(self._keys(job)):
                self._pending[key] -= 1
            for digest, key in digests.items():
                self._digest_keys[digest].add(key)
            for digest in digests:
                image = self._decoded.get(digest)
                if image is not None and any(self._pending[key] > 0 for key in self._digest_keys[digest]):
                    self._kept[digest] = image
                    self._kept.move_to_end(digest)
                else:
                    self._kept.pop(digest, None)

    def _make_room(self, pixels: int) -> None:
        """Let go of kept images (oldest first) until ``pixels`` more would fit; an image a row still holds
        stays alive, and gives its pixels back when that row lets go of it."""
        with self._lock:
            while self._kept and self.pixels.held + pixels > self.pixels.capacity:
                self._kept.popitem(last=False)

    def _decode(self, job: Job, raws: dict[str, list[_Raw]]) -> dict[str, PIL.Image.Image]:
        """The row's images by content digest: those still alive shared, the others decoded once their pixels
        fit in the fetcher's budget (each gives its pixels back when the last reference to it goes)."""
        images: dict[str, PIL.Image.Image] = {}
        missing: dict[str, tuple[str, _Raw]] = {}
        for column, items in raws.items():
            for raw in items:
                if raw.digest not in images and raw.digest not in missing:
                    found = self._decoded.get(raw.digest)
                    if found is not None:
                        images[raw.digest] = found
                    else:
                        missing[raw.digest] = (column, raw)
        unspent = sum(raw.probe.pixels for _, raw in missing.values())
        self.pixels.take(unspent, now=lambda: self._closed or self._wanted == job.id, make_room=self._make_room)
        try:
            if self._closed:
                raise CancelledError
            for digest, (column, raw) in missing.items():
                image = self._decoded.get(digest)  # another row may have decoded it meanwhile
                if image is None:
                    try:
                        image = decode_image(raw.data)
                    except MediaError as exc:
                        raise RowFailed.at(column, f"{self.redact(raw.uri)}: {exc}") from None
                    self._decoded[digest] = image
                    unspent -= raw.probe.pixels
                    weakref.finalize(image, self.pixels.give, raw.probe.pixels)
                images[digest] = image
        finally:
            self.pixels.give(unspent)
        return images

    # -- the caller's side ----------------------------------------------------------------------------------
    def prefetch(self, jobs: list[Job]) -> None:
        """Start reading (and then decoding) the inputs of ``jobs`` now; ``get`` collects them later."""
        for job in jobs:
            with self._lock:
                if job.id in self._rows or self._closed:
                    continue
            for column, value in job.inputs.items():
                if column == "style_folder":
                    self._folder(value)
                else:
                    for uri in _listed(value):
                        self._file(uri)
            once = _Once(lambda job=job: self._prepare(job))
            with self._lock:
                self._rows[job.id] = once
            self._cpu.submit(once.run)

    def get(self, job: Job) -> RowInputs:
        """The decoded inputs of ``job``; raises RowFailed naming the first column that failed."""
        with self._lock:
            once = self._rows.get(job.id)
        if once is None:
            self.prefetch([job])
            with self._lock:
                once = self._rows[job.id]
        self._wanted = job.id
        self.pixels.wake()
        try:
            once.run()  # here and now, unless a decode thread has begun it
            return once.future.result()
        finally:
            with self._lock:
                self._rows.pop(job.id, None)

    def take(self, jobs: list[Job], failed: Callable[[Job, RowFailed], None]) -> Iterator[dict[str, RowInputs]]:
        """The inputs of ``jobs`` by id, in parts: a part ends when the decoded images alive fill the
        fetcher's pixel budget, so a caller that renders each part before asking for the next holds about
        that much at most. Rows whose inputs fail go to ``failed`` instead."""
        part: dict[str, RowInputs] = {}
        for job in jobs:
            try:
                part[job.id] = self.get(job)
            except RowFailed as exc:
                failed(job, exc)
                continue
            if self.pixels.held >= self.pixels.capacity:
                yield part
                part = {}
        if part:
            yield part

    def close(self) -> None:
        self._closed = True
        self.pixels.wake()
        for pool in (self._cpu, self._lists, self._io):
            pool.shutdown(wait=False, cancel_futures=True)
