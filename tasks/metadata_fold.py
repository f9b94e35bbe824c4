"""Folding a run's journal into ``metadata/``, in six named steps (``Fold.run``; the rules are in the docstring of
``tasks.metadata``):

1. ``pick_winners``: the latest journal record of each id, and the updates that apply;
2. ``drop_superseded_outputs``: outputs only superseded records name (files and container samples) removed,
   before any part changes;
3. ``settle_schema``: the one schema every part conforms to, written as ``00-schema.parquet`` when it changed;
4. ``write_new_parts``: the winners, the updated records and the merged small parts, as new parts;
5. ``rewrite_old_parts``: old parts without what the new ones supersede; merged small parts deleted;
6. ``recode_parts``: parts whose columns the schema now holds as JSON text, rewritten.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ipaflow.core.hashing import hash_strings, members
from ipaflow.core.lease import token_in_name
from ipaflow.core.storage import join
from ipaflow.specs.outputs import resolve_output
from ipaflow.tasks.counts import RowCounts
from ipaflow.tasks.metadata_scans import RecordIndex
from ipaflow.tasks.metadata_schema import (
    CORE_SCHEMA,
    METADATA_DIR,
    SCHEMA_FILE,
    canonical_schema,
    conform,
    needs_recoding,
    now,
    to_parquet_bytes,
)
from ipaflow.tasks.owners import inside

if TYPE_CHECKING:
    from ipaflow.tasks.metadata import MetadataStore

log = logging.getLogger("ipaflow.metadata")

PART_ROWS = 2048  # records per part: a touched part costs at most this much to rewrite
SMALL_PART_ROWS = PART_ROWS // 4  # parts below this are merged into a fold's new parts
UPDATE_CHUNK = 262_144  # updated records merged at a time by a fold (their passthrough values held)


class FoldResult(RowCounts):
    """What a fold did: this run's records written, by status (its counts: ``ok``, ``failed``, ``images``,
    ``updated``), journal files folded, parts written, rewritten and deleted, bytes written, superseded outputs
    removed."""

    files: int = 0
    records: int = 0
    parts_written: int = 0
    parts_rewritten: int = 0
    parts_deleted: int = 0
    bytes_written: int = 0
    superseded: int = 0
    outputs_removed: int = 0  # outputs only superseded records named


def latest_masks(store: MetadataStore, keys: list[np.ndarray], sources: list[str]) -> list[np.ndarray]:
    """Per source, which of its records is the latest of its id among all sources (the latest finished_at;
    a later source wins a tie). Needs the timestamps only of ids seen twice: ~16 bytes per record at peak."""
    masks = [np.ones(len(k), dtype=bool) for k in keys]
    flat = np.concatenate(keys)
    flat.sort()
    twice = np.unique(flat[1:][flat[1:] == flat[:-1]])
    del flat
    if not len(twice):
        return masks
    hashes, stamps, where, rows = [], [], [], []
    for number, (uri, hashed) in enumerate(zip(sources, keys)):
        hit = np.flatnonzero(members(hashed, twice))
        if not len(hit):
            continue
        table = store.read_table(uri, ["finished_at"])
        stamp = pc.cast(table.column("finished_at"), pa.int64()).to_numpy(zero_copy_only=False)
        hashes.append(hashed[hit])
        stamps.append(stamp[hit])
        where.append(np.full(len(hit), number, dtype=np.int64))
        rows.append(hit)
    key, stamp, source, row = (np.concatenate(a) for a in (hashes, stamps, where, rows))
    order = np.lexsort((source, stamp, key))
    last = np.ones(len(order), dtype=bool)
    last[:-1] = key[order][1:] != key[order][:-1]
    for position in order[~last]:
        masks[source[position]][row[position]] = False
    return masks


class Fold:
    """One fold of ``store``'s journal and updates into its parts (``MetadataStore.fold``)."""

    def __init__(self, store: MetadataStore, run_id: str | None = None, index: RecordIndex | None = None,
                 drop_outputs: Callable[[list[str]], None] | None = None, lease_token: int = 0):
        self.store, self.index, self.drop_outputs = store, index, drop_outputs
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.result = FoldResult()
        files, updates = store.journal_files(), store.update_files()
        self.stale = [uri for uri in files + updates if token_in_name(uri) < lease_token]  # after a lease was lost
        self.files = [uri for uri in files if uri not in self.stale]
        self.updates = [uri for uri in updates if uri not in self.stale]

    def run(self) -> FoldResult:
        if (self.files or self.updates) and self.pick_winners():
            self.drop_superseded_outputs()
            self.settle_schema()
            self.write_new_parts()
            self.rewrite_old_parts()
            self.recode_parts()
        for uri in self.files + self.updates:
            self.store.storage.delete(uri)
        for uri in self.stale:
            log.warning("ignored %s: written under an older lease token, by a run that had lost its lease on --out",
                        self.store.storage.redact(uri))
            self.store.storage.delete(uri)
        self.result.files = len(self.files)
        return self.result

    def pick_winners(self) -> bool:
        """Step 1: the winning journal record of each id (the latest finished_at; a later file wins a tie) and
        the updates that apply (to records in the parts, unless this fold brings a newer record of the id).
        False when no journal or update file is readable."""
        store = self.store
        keys: list[np.ndarray] = []
        self.readable: list[str] = []
        for uri, table in store.iter_tables(["id"], self.files):
            self.readable.append(uri)
            keys.append(hash_strings(table.column("id")))
        update_keys: list[np.ndarray] = []
        self.update_readable: list[str] = []
        for uri, table in store.iter_tables(["id"], self.updates):
            self.update_readable.append(uri)
            update_keys.append(hash_strings(table.column("id")))
        self.journal_schemas = [s for s in store.schemas(self.readable + self.update_readable) if s is not None]
        if not keys and not update_keys:
            return False
        self.masks = latest_masks(store, keys, self.readable) if keys else []
        self.index = index = self.index if self.index is not None else store.index()
        self.rendered = np.unique(np.concatenate([k[m] for k, m in zip(keys, self.masks)])) \
            if len(index.hashes) and keys else np.zeros(0, np.uint64)  # nothing to supersede: a first run
        updated = np.unique(np.concatenate(update_keys)) if update_keys else np.zeros(0, np.uint64)
        self.updated = updated[members(updated, index.hashes) & ~members(updated, self.rendered)]
        self.winners = np.union1d(self.rendered, self.updated)
        self.touched = sorted(index.parts_holding(self.winners))
        return True

    def drop_superseded_outputs(self) -> None:
        """Step 2: the outputs only superseded records name (not those of updated records: their outputs
        stand), removed before any part changes: plain files deleted, container samples handed to
        ``drop_outputs``. An output the winning record names again (the same path re-rendered) is kept. The
        winners are journaled already, so a run killed here leaves the journal and the next fold does the rest."""
        if not self.touched or not len(self.rendered):
            return
        index, doomed = self.index, set()
        for _, table in self.store.iter_tables(["id", "outputs"],
                                               [index.parts[i] for i in sorted(index.parts_holding(self.rendered))]):
            gone = members(hash_strings(table.column("id")), self.rendered)
            for outputs in table.column("outputs").filter(pa.array(gone)).to_pylist():
                doomed.update(uri for uri in (resolve_output(self.store.out, o) for o in outputs or [])
                              if inside(uri, self.store.out))
        if not doomed:
            return
        for number, (_, table) in enumerate(self.store.iter_tables(["outputs"], self.readable)):
            named = table.column("outputs").filter(pa.array(self.masks[number])).combine_chunks()
            doomed.difference_update(resolve_output(self.store.out, o) for o in pc.list_flatten(named).to_pylist())
        samples = sorted(uri for uri in doomed if "#" in uri)
        for uri in sorted(doomed - set(samples)):
            self.store.storage.delete(uri)
        self.result.outputs_removed = len(doomed)
        if samples and self.drop_outputs is not None:
            self.drop_outputs(samples)

    def settle_schema(self) -> None:
        """Step 3: the schema every part conforms to (and which small parts merge into the new ones)."""
        index, store = self.index, self.store
        small = [i for i, rows in enumerate(index.rows) if rows < SMALL_PART_ROWS and i not in set(self.touched)]
        self.small = small if len(small) > 1 else []
        self.part_schemas = store.schemas(index.parts)
        self.schema = canonical_schema([s for s in self.part_schemas if s is not None] + self.journal_schemas)
        previous = store.read_schema()
        if previous is None or not previous.equals(self.schema):
            store.storage.write_atomic(join(store.out, SCHEMA_FILE), to_parquet_bytes(self.schema.empty_table()))

    def write_new_parts(self) -> None:
        """Step 4: the winners (this run's counted by status), the updated records, then the small parts."""
        store, result = self.store, self.result
        writer = PartWriter(store, self.schema, self.run_id, result)
        for number, (_, table) in enumerate(store.iter_tables(files=self.readable)):
            chosen = table.filter(pa.array(self.masks[number])) if not self.masks[number].all() else table
            ok = pc.equal(chosen.column("status"), "ok")
            mine = pc.equal(chosen.column("run_id"), self.run_id)
            result.ok += int(pc.sum(pc.and_(ok, mine)).as_py() or 0)
            result.failed += int(pc.sum(pc.and_(pc.invert(ok), mine)).as_py() or 0)
            result.images += int(pc.sum(pc.list_value_length(chosen.filter(pc.and_(ok, mine)).column("outputs")))
                                 .as_py() or 0)
            result.records += chosen.num_rows
            writer.add(chosen)
        if len(self.updated):
            self.apply_updates(writer)
        for _, table in store.iter_tables(files=[self.index.parts[i] for i in self.small]):
            writer.add(table)
        writer.close()

    def rewrite_old_parts(self) -> None:
        """Step 5: the old parts without what the new ones supersede (deleted when empty); the merged small
        parts deleted."""
        store, result, index = self.store, self.result, self.index
        for number in self.touched:
            uri = index.parts[number]
            table = store.read_table(uri)
            if table is None:
                continue
            kept = table.filter(pc.invert(pa.array(members(hash_strings(table.column("id")), self.winners))))
            result.superseded += table.num_rows - kept.num_rows
            if kept.num_rows:
                data = to_parquet_bytes(conform(kept, self.schema))
                store.storage.write_atomic(uri, data)
                result.parts_rewritten += 1
                result.bytes_written += len(data)
            else:
                store.storage.delete(uri)
                result.parts_deleted += 1
        for number in self.small:
            store.storage.delete(index.parts[number])
            result.parts_deleted += 1

    def recode_parts(self) -> None:
        """Step 6: parts whose columns the schema now holds as JSON text (values mixed types across parts)."""
        skip = set(self.touched) | set(self.small)
        for number, (uri, schema) in enumerate(zip(self.index.parts, self.part_schemas)):
            if schema is None or number in skip:
                continue
            if any(item.name in self.schema.names and needs_recoding(item, self.schema.field(item.name))
                   for item in schema):
                table = self.store.read_table(uri)
                if table is not None:
                    self.store.storage.write_atomic(uri, to_parquet_bytes(conform(table, self.schema)))
                    self.result.parts_rewritten += 1

    def apply_updates(self, writer: PartWriter) -> None:
        """Write the records ``updated`` names anew: each record's core fields (outputs, key, status, ...) with
        the passthrough values of its update, and a new ``finished_at`` (so that it wins over the old copy
        until step 5 removes that). Updates are taken UPDATE_CHUNK rows at a time, each chunk reading only the
        parts holding its ids: memory stays a chunk of passthrough values and a part."""
        stamp = now()
        sources = self.update_readable
        names = sorted({n for item in self.store.schemas(sources) if item is not None for n in item.names} - {"id"})
        target = pa.schema([pa.field("id", pa.string())] + [self.schema.field(n) for n in names])
        chunk: list[pa.Table] = []
        rows = 0
        for _, table in self.store.iter_tables(files=sources):
            chunk.append(conform(table, target))  # a column an update lacks: null (the record no longer holds it)
            rows += table.num_rows
            if rows >= UPDATE_CHUNK:
                self._merge_updates(pa.concat_tables(chunk), stamp, writer)
                chunk, rows = [], 0
        if chunk:
            self._merge_updates(pa.concat_tables(chunk), stamp, writer)

    def _merge_updates(self, table: pa.Table, stamp: datetime, writer: PartWriter) -> None:
        """One chunk of updates (in file order) merged into the records they name, reading only their parts."""
        hashes = hash_strings(table.column("id"))
        keep = members(hashes, self.updated)
        if not keep.any():
            return
        table, hashes = table.filter(pa.array(keep)), hashes[keep]
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        last = np.ones(len(ordered), dtype=bool)  # an id updated twice: the later file's row
        last[:-1] = ordered[1:] != ordered[:-1]
        order, ordered = order[last], ordered[last]
        values = table.drop_columns(["id"])
        finished = CORE_SCHEMA.field("finished_at")
        index = self.index
        for _, old in self.store.iter_tables(files=[index.parts[i] for i in sorted(index.parts_holding(ordered))]):
            old_hashes = hash_strings(old.column("id"))
            hit = members(old_hashes, ordered)
            if not hit.any():
                continue
            old = old.filter(pa.array(hit))
            rows = order[np.searchsorted(ordered, old_hashes[hit])]
            core = conform(old, CORE_SCHEMA).set_column(  # a part written before a field existed: null there
                CORE_SCHEMA.get_field_index("finished_at"), finished, pa.array([stamp] * old.num_rows, type=finished.type))
            patch = values.take(pa.array(rows))
            writer.add(pa.Table.from_arrays(core.columns + patch.columns,
                                            schema=pa.schema(list(core.schema) + list(patch.schema))))
            self.result.updated += old.num_rows


class PartWriter:
    """Cuts the records it is given into parts of at most PART_ROWS, each sorted by id, written atomically."""

    def __init__(self, store: MetadataStore, schema: pa.Schema, run_id: str, result: FoldResult):
        self.store, self.schema, self.run_id, self.result = store, schema, run_id, result
        self.pending: list[pa.Table] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(conform(table, self.schema))
            self.rows += table.num_rows
            while self.rows >= PART_ROWS:
                self._write(PART_ROWS)

    def _write(self, rows: int) -> None:
        table = pa.concat_tables(self.pending)
        part, rest = table.slice(0, rows), table.slice(rows)
        self.pending, self.rows = ([rest] if rest.num_rows else []), rest.num_rows
        part = part.sort_by("id")
        name = f"part-{self.run_id}-{self.result.parts_written:05d}.parquet"
        data = to_parquet_bytes(part)
        self.store.storage.write_atomic(join(self.store.out, METADATA_DIR, name), data)
        self.result.parts_written += 1
        self.result.bytes_written += len(data)

    def close(self) -> None:
        if self.rows:
            self._write(self.rows)
