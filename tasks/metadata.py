"""Metadata records: one per manifest id, kept across runs, as a Parquet dataset written in parts. This module
holds the store of one output folder: the journal, the parts and reading them; the record schema is in
``metadata_schema``, the fold in ``metadata_fold``, what a run learns from one scan in ``metadata_scans``.

While a run is in flight, shard tasks append records to a journal (``_ipaflow/journal/<run>/*.parquet``), each
file written atomically and only after the outputs it names exist, and named with the lease token it was
written under (``-t<token>``: ``ipaflow.core.lease``). Folding (``MetadataStore.fold``) moves the
journal into ``metadata/``:

- the latest journal record of each id wins (``finished_at``);
- they are written as new parts (``metadata/part-<run>-<n>.parquet``, at most ``PART_ROWS`` records each), so
  new ids are pure appends;
- every older part holding a record those supersede is rewritten without it (one atomic overwrite; deleted when
  nothing is left), and so is every container (webdataset tar, Parquet shard) holding a superseded sample,
  first; parts much smaller than ``PART_ROWS`` are merged into the new parts as they are written;
- then the journal files are removed.

A run's own fold at its end (``fold(lease_token=T)``) removes unread the journal and update files named with an
older token: it folded every journal there was when it started, so such a file was written after it took the
lease over, by a run that had lost it (a write under way when that run was paused; ``docs/faults.md``).

A run therefore writes the records it touched, plus the parts where touched ids lived. Plain readers stay exact:
``pandas.read_parquet(out / "metadata")`` gives one row per id. Arrow takes a folder's schema from its first file,
so ``metadata/00-schema.parquet`` (no rows) holds the union schema of every part and sorts first.

A run killed at any point leaves its journal, which the next run folds first; a kill between writing the new
parts and rewriting the old ones leaves an id twice for a moment (the newer ``finished_at`` is the current one;
``ipaflow records`` and ``MetadataStore.iter_current`` pick it), and the next fold's scan rewrites the losers away.

Which old records are superseded is decided by 64-bit hashes of ids (``ipaflow.core.hashing``): ~9 bytes per
record in the flow, never the records themselves.

Passthrough columns (manifest columns ipaflow gives no meaning) are kept in the records: renamed
``manifest_<name>`` where they clash with a record field (``passthrough_names``), typed where every value fits
one Arrow type, else JSON text encoded once and marked in the field's metadata (``passthrough_column``, ``widen``,
``conform``). A done row whose passthrough values changed is not rendered again: the run journals an update
(``_ipaflow/updates/<run>/``: the id and the manifest's passthrough values), and the fold writes that record
anew with its old core fields and the new values, superseding the old copy like any other
(``metadata_fold.Fold.apply_updates``).
Which rows changed is decided by ``passthrough_hashes``, canonical so that a value read back from the records
(an int kept as float64, a list in JSON text) hashes as the manifest's.
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ipaflow.core.hashing import hash_strings, members, repeated
from ipaflow.core.lease import lease_token, token_suffix
from ipaflow.core.storage import Storage, join
from ipaflow.specs.outputs import resolve_outputs
from ipaflow.tasks.metadata_fold import Fold, FoldResult, latest_masks
from ipaflow.tasks.metadata_rebuild import rebuild_records, set_aside
from ipaflow.tasks.metadata_scans import RecordIndex
from ipaflow.tasks.metadata_schema import (
    METADATA_DIR,
    SCHEMA_FILE,
    from_parquet_bytes,
    records_table,
    to_parquet_bytes,
    updates_table,
)

log = logging.getLogger("ipaflow.metadata")
JOURNAL_DIR = "_ipaflow/journal"
UPDATES_DIR = "_ipaflow/updates"  # new passthrough values of done records, applied by the next fold
READ_THREADS = 16
FOOTER_BYTES = 64 * 1024  # the tail read for a part's schema: its Parquet footer (a few KiB) and then some


class MetadataStore:
    """The records of one output folder."""

    def __init__(self, storage: Storage, out: str):
        self.storage = storage
        self.out = out
        self.unreadable: dict[str, str] = {}  # metadata file -> why it cannot be read (``metadata_rebuild``)

    # -- the journal --------------------------------------------------------------------------------------------
    def journal(self, run_id: str, name: str, records: list[dict]) -> None:
        """Append records to the run's journal (one atomic file)."""
        if records:
            uri = join(self.out, JOURNAL_DIR, run_id, f"{name}{token_suffix(lease_token(self.storage))}.parquet")
            self.storage.write_atomic(uri, to_parquet_bytes(records_table(records)))

    def journal_files(self, run_id: str | None = None) -> list[str]:
        root = join(self.out, JOURNAL_DIR, run_id) if run_id else join(self.out, JOURNAL_DIR)
        return [join(root, rel) for rel in self.storage.list_files(root) if rel.endswith(".parquet")]

    # -- updates: new passthrough values for records whose outputs stand ----------------------------------------
    def journal_updates(self, run_id: str, name: str, rows: list[dict], names: Iterable[str]) -> None:
        """New passthrough values for done records (one atomic file): ``rows`` hold ``id`` and record columns;
        ``names`` are all the manifest's passthrough columns (record names): each updated record holds exactly
        these. The next fold applies them (``fold``); until then readers see the old values."""
        if rows:
            uri = join(self.out, UPDATES_DIR, run_id, f"{name}{token_suffix(lease_token(self.storage))}.parquet")
            self.storage.write_atomic(uri, to_parquet_bytes(updates_table(rows, names)))

    def update_files(self) -> list[str]:
        root = join(self.out, UPDATES_DIR)
        return [join(root, rel) for rel in self.storage.list_files(root) if rel.endswith(".parquet")]

    def read_table(self, uri: str, columns: list[str] | None = None) -> pa.Table | None:
        """A journal, update or part file's table (only ``columns`` where given); None when it is gone or
        unreadable (said in the log)."""
        try:
            data = self.storage.read_bytes(uri)
        except FileNotFoundError:
            return None
        try:
            return from_parquet_bytes(data, columns)
        except pa.ArrowException as exc:  # torn or damaged: said once, set aside by the next run's ``repair``
            if uri not in self.unreadable:
                log.warning("skipping unreadable metadata file %s (%s): a render (or verify --repair) moves it under "
                            "_ipaflow/unreadable/ and rebuilds its records from the outputs", self.storage.redact(uri), exc)
            self.unreadable[uri] = str(exc)
            return None

    def journaled_ids(self, run_id: str, prefix: str = "", status: str | None = None) -> set[str]:
        """Ids journaled so far in a run by files starting with ``prefix`` (a shard's earlier attempts, for task
        retries), optionally only with a given status."""
        ids: set[str] = set()
        for uri in self.journal_files(run_id):
            if posixpath.basename(uri).startswith(prefix):
                table = self.read_table(uri, ["id", "status"])
                if table is not None:
                    ids.update(r["id"] for r in table.to_pylist() if status is None or r["status"] == status)
        return ids

    # -- the parts ----------------------------------------------------------------------------------------------
    def part_files(self) -> list[str]:
        root = join(self.out, METADATA_DIR)
        schema = posixpath.basename(SCHEMA_FILE)
        return [join(root, rel) for rel in self.storage.list_files(root)
                if rel.endswith(".parquet") and "/" not in rel and rel != schema and not rel.startswith((".", "_"))]

    def iter_tables(self, columns: list[str] | None = None, files: list[str] | None = None
                    ) -> Iterator[tuple[str, pa.Table]]:
        """(part, table) for every part, read a few at a time in background threads (object stores: the reads
        overlap), in part order; only ``columns`` where given. Whole records are read 4 files at a time (memory
        stays a few parts' worth), a few columns READ_THREADS at a time."""
        files = self.part_files() if files is None else files
        window = 4 if columns is None or len(columns) > 6 else READ_THREADS
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="ipaflow-records") as pool:
            for start in range(0, len(files), window):
                chunk = files[start:start + window]
                for uri, table in zip(chunk, pool.map(lambda u: self.read_table(u, columns), chunk)):
                    if table is not None:
                        yield uri, table

    def index(self, extra: Callable[[str, pa.Table], None] | None = None,
              columns: list[str] | None = None) -> RecordIndex:
        """Scan every part once (``id`` plus ``columns``), calling ``extra(part, table)`` on each: where every
        record lives, in hashes."""
        found = RecordIndex()
        hashes, owners = [], []
        wanted = sorted({"id", *(columns or [])})
        for number, (uri, table) in enumerate(self.iter_tables(wanted)):
            found.parts.append(uri)
            found.rows.append(table.num_rows)
            hashes.append(hash_strings(table.column("id")))
            owners.append(np.full(table.num_rows, number, dtype=np.int32))
            if extra is not None:
                extra(uri, table)
        if hashes:
            flat, part_of = np.concatenate(hashes), np.concatenate(owners)
            order = np.argsort(flat, kind="stable")
            found.hashes, found.part_of = flat[order], part_of[order]
        return found

    def schemas(self, parts: list[str]) -> list[pa.Schema | None]:
        """Each file's schema, read in background threads; None for a file gone or unreadable."""
        def read(uri: str) -> pa.Schema | None:
            try:
                tail = self.storage.read_tail(uri, FOOTER_BYTES)  # each request bounded ($IPAFLOW_CALL_TIMEOUT)
                try:
                    return pq.read_schema(io.BytesIO(tail))
                except pa.ArrowException:  # a footer longer than the tail read
                    return pq.read_schema(io.BytesIO(self.storage.read_bytes(uri)))
            except (OSError, pa.ArrowException):
                return None

        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="ipaflow-schema") as pool:
            return list(pool.map(read, parts))

    # -- folding ------------------------------------------------------------------------------------------------
    def fold(self, run_id: str | None = None, index: RecordIndex | None = None,
             drop_outputs: Callable[[list[str]], None] | None = None, lease_token: int = 0) -> FoldResult:
        """Fold every journal file into ``metadata/`` (see the module docstring; the steps: ``tasks.metadata_fold``).

        Args:
            run_id: the folding run's id (names the new parts; its records are counted); a random one if None.
            index: the scan of the parts (``index``), when the caller has one.
            drop_outputs: handed the outputs of superseded records that live in containers, before any part
                changes (``ipaflow.tasks.containers.drop_members``).
            lease_token: a run's own fold at its end: its lease token; files named with an older one are
                removed unread (see the module docstring). 0 (a fold of whatever is there): every file folded.

        Returns:
            What the fold did (``FoldResult``).
        """
        return Fold(self, run_id, index, drop_outputs, lease_token).run()

    def read_schema(self) -> pa.Schema | None:
        """The union schema ``00-schema.parquet`` holds, or None."""
        table = self.read_table(join(self.out, SCHEMA_FILE))
        return None if table is None else table.schema

    def repair(self, index: RecordIndex) -> int:
        """Ids held by more than one part (a fold killed between its writes): keep the latest record of each,
        rewrite the other parts without it. Then the metadata files that cannot be read are set aside and their
        records rebuilt from the outputs, as a journal the next fold takes in (``metadata_rebuild``). Returns
        how many records were dropped."""
        if set_aside(self):
            rebuild_records(self)
        twice = repeated(index.hashes)
        if not len(twice):
            return 0
        holders = sorted(set(index.part_of[members(index.hashes, twice)].tolist()))
        best: dict[str, tuple[int, int]] = {}
        for number in holders:
            table = self.read_table(index.parts[number], ["id", "finished_at"])
            if table is None:
                continue
            hit = members(hash_strings(table.column("id")), twice)
            for row in table.filter(pa.array(hit)).to_pylist():
                stamp = int(row["finished_at"].timestamp() * 1e6) if row["finished_at"] else 0
                if row["id"] not in best or (stamp, number) > best[row["id"]]:
                    best[row["id"]] = (stamp, number)
        dropped = 0
        for number in holders:
            uri = index.parts[number]
            table = self.read_table(uri)
            if table is None:
                continue
            ids = table.column("id").to_pylist()
            keep = [not (i in best and best[i][1] != number) for i in ids]
            if all(keep):
                continue
            dropped += keep.count(False)
            kept = table.filter(pa.array(keep))
            if kept.num_rows:
                self.storage.write_atomic(uri, to_parquet_bytes(kept))
            else:
                self.storage.delete(uri)
        return dropped

    # -- reading ------------------------------------------------------------------------------------------------
    def iter_current(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The current records, part by part: one per id, the latest, even while a fold was cut short (an id
        in two parts) or a journal is still unfolded (a run in flight, or killed); their outputs as URIs under
        ``out`` (``specs.outputs.resolve_outputs``)."""
        sources = self.part_files() + self.journal_files()
        keys: list[np.ndarray] = []
        read: list[str] = []
        for uri, table in self.iter_tables(["id"], sources):
            read.append(uri)
            keys.append(hash_strings(table.column("id")))
        if not keys:
            return
        masks = latest_masks(self, keys, read)
        del keys
        for number, (uri, table) in enumerate(self.iter_tables(columns, read)):
            del uri
            if len(masks[number]) != table.num_rows:
                continue  # changed since it was scanned
            chosen = table if masks[number].all() else table.filter(pa.array(masks[number]))
            if chosen.num_rows:  # outputs as URIs under this folder, wherever it was written (specs.outputs)
                yield resolve_outputs(chosen.select([c for c in columns if c in chosen.column_names])
                                      if columns else chosen, self.out)

    def load(self) -> dict[str, dict]:
        """Every id's current record as a dict: small output folders only (tests, tools)."""
        return {r["id"]: r for table in self.iter_current() for r in table.to_pylist()}
