"""Row keys: a content hash of everything that determines a row's output.

The key covers the spec's content (models, adapters, scheduler, ...), the resolved parameters and seed, and
the identity of every input (a local file's content hash, streamed; an object's ETag, or size and mtime; for a
style folder, its image files' names and identities). Inputs are looked up with the same bounds and refusals as
they are read (``Storage.identity``), and a failing one is worded as ``validate`` words it.
A re-run renders exactly the rows whose key changed. Identities are looked up concurrently, once per URI, and
kept in a bounded cache (``IdentityCache``) while a manifest streams: a million rows sharing a few inputs cost a
few lookups, a million distinct inputs never hold a million entries.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from ipaflow.core.input_reads import MAX_INPUT_BYTES
from ipaflow.core.problems import RowFailed
from ipaflow.core.storage import Storage, is_local
from ipaflow.specs.rows import Job
from ipaflow.specs.spec import Spec
from ipaflow.tasks.inputs import input_failure, style_images

# Bump when ipaflow's rendering changes what the same row produces.
RENDER_VERSION = 1


def _identify(storage: Storage, column: str, uri: str, out: str | None) -> str:
    try:
        if column == "style_folder":
            files = style_images(storage, uri, out)
            if is_local(uri) or not all(identity for _, identity in files):
                # as for single files: local content hashes; remote listing identities (an object store lists
                # ETags), or each file's own where the listing has none (an http index page)
                files = [(name, storage.identity(name, MAX_INPUT_BYTES)) for name, _ in files]
            return hashlib.sha256(repr([(n.rsplit("/", 1)[-1], i) for n, i in files]).encode()).hexdigest()
        return storage.identity(uri, MAX_INPUT_BYTES)
    except Exception as exc:  # noqa: BLE001 - any storage failure becomes the row's reason, worded as validate does
        raise input_failure(column, uri, exc, storage.redact) from None


IDENTITY_CACHE_SIZE = 65_536  # (column, URI) identities a planning pass keeps


class IdentityCache:
    """The identities looked up so far, least recently used dropped first beyond ``capacity``."""

    def __init__(self, capacity: int = IDENTITY_CACHE_SIZE):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], str | RowFailed] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, item: tuple[str, str]) -> str | RowFailed | None:
        with self._lock:
            found = self._items.get(item)
            if found is not None:
                self._items.move_to_end(item)
            return found

    def put(self, item: tuple[str, str], identity: str | RowFailed) -> None:
        with self._lock:
            self._items[item] = identity
            self._items.move_to_end(item)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


def identify_inputs(storage: Storage, jobs: Iterable[Job], threads: int = 16, cache: IdentityCache | None = None,
                    out: str | None = None) -> dict[tuple[str, str], str | RowFailed]:
    """Identity of every (column, URI) the jobs use, or the RowFailed saying why it has none; ``cache`` answers
    what it holds and keeps what is looked up. Spellings of one local file (``odd/x.png``, ``./odd//x.png``) are
    looked up once; a style folder inside ``out`` leaves ipaflow's own outputs out."""
    wanted = {
        (column, uri)
        for job in jobs
        for column, value in job.inputs.items()
        for uri in (value if isinstance(value, list) else [value])
    }
    found: dict[tuple[str, str], str | RowFailed] = {}
    if cache is not None:
        for item in list(wanted):
            hit = cache.get(item)
            if hit is not None:
                found[item] = hit
                wanted.discard(item)

    def canonical(item: tuple[str, str]) -> tuple[str, str]:
        column, uri = item
        return item if column == "style_folder" else (column, storage.resolved(uri))

    distinct = {canonical(item): item for item in sorted(wanted)}

    def one(item: tuple[str, str]) -> str | RowFailed:
        try:
            return _identify(storage, *item, out)
        except RowFailed as exc:
            return exc

    if distinct:
        with ThreadPoolExecutor(max_workers=min(threads, len(distinct)), thread_name_prefix="ipaflow-stat") as pool:
            looked_up = dict(zip(distinct, pool.map(one, distinct.values())))
        for item in wanted:
            identity = found[item] = looked_up[canonical(item)]
            if cache is not None:
                cache.put(item, identity)
    return found


_FINGERPRINTS: OrderedDict[int, tuple[Spec, str]] = OrderedDict()


def _fingerprint(spec: Spec) -> str:
    """``spec.fingerprint()``, remembered per spec object (a run keys millions of rows of a few specs)."""
    found = _FINGERPRINTS.get(id(spec))
    if found is None or found[0] is not spec:
        found = _FINGERPRINTS[id(spec)] = (spec, spec.fingerprint())
        while len(_FINGERPRINTS) > 256:
            _FINGERPRINTS.popitem(last=False)
    return found[1]


def row_key(job: Job, spec: Spec, identities: dict[tuple[str, str], str | RowFailed]) -> str:
    """The row's key; raises the RowFailed of its first missing input."""
    inputs = {}
    for column, value in sorted(job.inputs.items()):
        ids = []
        for uri in value if isinstance(value, list) else [value]:
            identity = identities[(column, uri)]
            if isinstance(identity, RowFailed):
                raise identity
            ids.append(identity)
        inputs[column] = ids
    payload = {
        "version": RENDER_VERSION,
        "spec": _fingerprint(spec),
        "seed": job.seed,
        "params": job.params,
        "inputs": inputs,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
