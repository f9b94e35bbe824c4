"""``ipaflow verify OUT [--deep] [--repair]``: is an output folder consistent (like ``git fsck``)?

One pass reads every metadata file (parts, journal, updates: an unreadable one is a problem), the current
record of each id, and one listing of the output folders and of each container's members. It says, one line
each:

- ``unreadable: <file> (<why>)``: a metadata file that cannot be read;
- ``missing: <output> (record <id>)``: an output a current ``ok`` record names that is not there;
- ``outside: <output> (record <id>)``: an output a record names outside ``OUT`` (never read or removed);
- ``orphan: <file or container#member>``: an output no current record names (a container no record points
  into is one line);
- with ``--deep``: ``undecodable: <output> (record <id>): <why>`` and ``wrong key: <output> (record <id>)``,
  every named output decoded and its embedded key compared with its record's.

``--repair`` holds the output folder's lease (no render may run meanwhile) and applies what a render applies
at its start (``MetadataStore.repair``: unreadable files set aside, their records rebuilt from the outputs;
the journal folded, superseded outputs removed), marks records whose outputs are missing as failed (the next
render renders them again), removes orphans, rewrites the dataset card (``tasks.card``), then checks again:
what it printed as ``fixed:`` is gone, what is left is printed as a problem.

Streamed: records part by part, the listing in batches; what is held is 8 bytes per output (the hashes of the
named outputs and of the listing), the records of one part and one container at a time.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.compute as pc

from ipaflow.core.hashing import hash_strings, members
from ipaflow.core.lease import FencedStorage, OutputLease
from ipaflow.core.storage import Storage, join
from ipaflow.specs.outputs import CONTAINERS, member_uri, split_member
from ipaflow.tasks.card import write_card
from ipaflow.tasks.containers import drop_members
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.metadata_rebuild import FILE_FOLDERS, container_samples, embedded_parameters
from ipaflow.tasks.metadata_scans import iter_listing
from ipaflow.tasks.metadata_schema import make_record
from ipaflow.tasks.owners import inside
from ipaflow.tasks.video import is_film, read_video

COLUMNS = ["id", "status", "outputs", "key", "spec", "seed", "params", "layout"]


@dataclass
class Findings:
    """What one check found: the lines, and what ``--repair`` acts on."""

    lines: list[str] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)  # records whose outputs are missing (a few columns)
    orphans: list[str] = field(default_factory=list)  # output URIs no record names (files, members, containers)


def _decodes(data: bytes, name: str) -> tuple[str | None, dict | None]:
    """(why it does not decode or None, the parameters it embeds)."""
    try:
        if is_film(name):
            params = read_video(data).params
        else:
            with PIL.Image.open(io.BytesIO(data)) as image:
                image.load()
            params = embedded_parameters(data, name)
        return None, params
    except Exception as exc:  # noqa: BLE001 - damaged: said as a problem
        return f"{type(exc).__name__}: {str(exc)[:200]}", None


class Check:
    """One check of an output folder (``verify_folder``)."""

    def __init__(self, storage: Storage, out: str, deep: bool):
        self.storage, self.out, self.deep = storage, out.rstrip("/"), deep
        self.store = MetadataStore(storage, self.out)
        self.found = Findings()

    def relative(self, uri: str) -> str:
        return uri[len(self.out) + 1:]

    def run(self) -> Findings:
        present = self.listing()
        named = self.records(present)
        self.orphans(named)
        for uri, reason in sorted(self.store.unreadable.items()):
            self.found.lines.insert(0, f"unreadable: {self.relative(uri)} ({self.storage.redact(reason)})")
        return self.found

    def listing(self) -> np.ndarray:
        """Sorted hashes of every output URI present: files, and each container's members."""
        chunks = [hash_strings([join(self.out, path) for path in batch])
                  for batch in iter_listing(self.storage, self.out, FILE_FOLDERS)]
        for container, layout in self.containers():
            members_of = [member_uri(container, member) for member, _, _ in
                          container_samples(self.storage.read_bytes(container), layout)]
            chunks.append(hash_strings(members_of))
        return np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, np.uint64)

    def containers(self):
        for layout, suffix in CONTAINERS.items():
            root = join(self.out, layout)
            for name in self.storage.list_files(root):
                if "/" not in name and name.endswith(suffix):
                    yield join(root, name), layout

    def records(self, present: np.ndarray) -> np.ndarray:
        """Every current record's outputs checked; returns the sorted hashes of the outputs they name."""
        for uri in self.store.update_files():
            self.store.read_table(uri, ["id"])
        named, keys = [], []
        for table in self.store.iter_current(COLUMNS):
            ok = table.filter(pc.fill_null(pc.equal(table.column("status"), "ok"), False))
            outputs = ok.column("outputs").combine_chunks()
            flat = pc.list_flatten(outputs)
            if not len(flat):
                continue
            hashes = hash_strings(flat)
            named.append(hashes)
            parents = pc.list_parent_indices(outputs).to_numpy(zero_copy_only=False)
            there = members(hashes, present)
            ids, uris = ok.column("id"), flat.to_pylist() if not there.all() or self.deep else None
            lost = set()
            for position in np.flatnonzero(~there):
                uri, row_id = uris[position], ids[int(parents[position])].as_py()
                kind = "missing" if inside(uri, self.out) else "outside"
                shown = self.relative(uri) if kind == "missing" else self.storage.redact(uri)
                self.found.lines.append(f"{kind}: {shown} (record {row_id})")
                lost.add(int(parents[position]))
            if lost:
                self.found.missing.extend(ok.take(pa.array(sorted(lost))).to_pylist())
            if self.deep:
                key_of = ok.column("key").to_pylist()
                for position in np.flatnonzero(there):
                    uri, row = uris[position], int(parents[position])
                    if "#" not in uri:
                        self.check_output(uri, self.storage.read_bytes(uri), ids[row].as_py(), key_of[row])
                    else:
                        keys.append((uri, ids[row].as_py(), key_of[row]))
        if keys:
            self.check_members(keys)
        return np.unique(np.concatenate(named)) if named else np.zeros(0, np.uint64)

    def check_output(self, uri: str, data: bytes, row_id: str, key: str | None) -> None:
        why, params = _decodes(data, uri)
        if why is not None:
            self.found.lines.append(f"undecodable: {self.relative(uri)} (record {row_id}): {why}")
        elif key and (params or {}).get("key") != key:
            self.found.lines.append(f"wrong key: {self.relative(uri)} (record {row_id})")

    def check_members(self, wanted: list[tuple[str, str, str | None]]) -> None:
        """--deep for container outputs: each container read once."""
        by_container: dict[str, dict[str, tuple[str, str | None]]] = {}
        for uri, row_id, key in wanted:
            by_container.setdefault(split_member(uri)[0], {})[uri] = (row_id, key)
        for container, layout in self.containers():
            if container in by_container:
                for member, _, blob in container_samples(self.storage.read_bytes(container), layout):
                    uri = member_uri(container, member)
                    if uri in by_container[container]:
                        self.check_output(uri, blob, *by_container[container][uri])

    def orphans(self, named: np.ndarray) -> None:
        for batch in iter_listing(self.storage, self.out, FILE_FOLDERS):
            uris = [join(self.out, path) for path in batch]
            for uri in np.array(uris, dtype=object)[~members(hash_strings(uris), named)]:
                self.orphan(uri)
        for container, layout in self.containers():
            uris = [member_uri(container, member) for member, _, _ in
                    container_samples(self.storage.read_bytes(container), layout)]
            loose = ~members(hash_strings(uris), named) if uris else np.zeros(0, bool)
            if not len(uris) or loose.all():
                self.orphan(container)
            else:
                for uri in np.array(uris, dtype=object)[loose]:
                    self.orphan(uri)

    def orphan(self, uri: str) -> None:
        self.found.lines.append(f"orphan: {self.relative(uri)}")
        self.found.orphans.append(uri)


def _repair(storage: Storage, out: str, found: Findings) -> None:
    """Apply what a render applies at its start, mark records with missing outputs failed, remove orphans."""
    store = MetadataStore(storage, out)
    store.repair(store.index())
    failed = [make_record(job_id=r["id"], spec=r["spec"], status="failed", run_id="verify-repair", seed=r["seed"],
                          key=r["key"], layout=r["layout"], error="outputs missing (ipaflow verify --repair)")
              for r in found.missing]
    for start in range(0, len(failed), 2048):
        store.journal("verify-repair", f"{start // 2048:05d}", failed[start:start + 2048])
    store.fold("verify-repair", drop_outputs=lambda uris: drop_members(storage, uris))
    again = Check(storage, out, deep=False).run()
    samples = [uri for uri in again.orphans if split_member(uri)[1] is not None]
    for uri in again.orphans:
        if split_member(uri)[1] is None and inside(uri, out.rstrip("/")):
            storage.delete(uri)
    drop_members(storage, samples)
    write_card(storage, out)


def verify_folder(out: str, storage: Storage | None = None, deep: bool = False, repair: bool = False,
                  say: Callable[[str], None] = print) -> int:
    """Check ``out`` (see the module docstring); ``say`` each line. Returns the number of problems left."""
    storage = storage or Storage()
    found = Check(storage, out, deep).run()
    if not repair or not found.lines:
        for line in found.lines:
            say(line)
        return len(found.lines)
    with OutputLease(storage, out, run="verify --repair") as lease:  # its writes fenced like a render's
        _repair(FencedStorage(options=storage.options, timeouts=storage.timeouts, fence=lease.fence()), out, found)
    left = Check(storage, out, deep).run()
    for line in found.lines:
        if line not in set(left.lines):
            say(f"fixed: {line}")
    for line in left.lines:
        say(line)
    return len(left.lines)
