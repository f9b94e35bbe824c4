"""Metadata records: one per manifest id, kept across runs, as a Parquet dataset written in parts.

While a run is in flight, shard tasks append records to a journal (``_ipaflow/journal/<run>/*.parquet``), each
file written atomically and only after the outputs it names exist. Folding (``MetadataStore.fold``) moves the
journal into ``metadata/``:

- the latest journal record of each id wins (``finished_at``);
- they are written as new parts (``metadata/part-<run>-<n>.parquet``, at most ``PART_ROWS`` records each), so
  new ids are pure appends;
- every older part holding a record those supersede is rewritten without it (one atomic overwrite; deleted when
  nothing is left), and so is every container (webdataset tar, Parquet shard) holding a superseded sample,
  first; parts much smaller than ``PART_ROWS`` are merged into the new parts as they are written;
- then the journal files are removed.

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
anew with its old core fields and the new values, superseding the old copy like any other (``_apply_updates``).
Which rows changed is decided by ``passthrough_hashes``, canonical so that a value read back from the records
(an int kept as float64, a list in JSON text) hashes as the manifest's.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ipaflow.core.hashing import hash_combine, hash_joined, hash_strings, members, repeated
from ipaflow.core.redaction import Redactor, redact_url
from ipaflow.core.storage import Storage, join
from ipaflow.specs.outputs import CONTAINERS
from ipaflow.tasks.counts import RowCounts

log = logging.getLogger("ipaflow.metadata")
METADATA_DIR = "metadata"
SCHEMA_FILE = "metadata/00-schema.parquet"  # sorts before every part: readers take its (union) schema
JOURNAL_DIR = "_ipaflow/journal"
PART_ROWS = 2048  # records per part: a touched part costs at most this much to rewrite
SMALL_PART_ROWS = PART_ROWS // 4  # parts below this are merged into a fold's new parts
READ_THREADS = 16
CORE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("spec", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("outputs", pa.list_(pa.string())),
        ("seed", pa.int64()),
        ("params", pa.string()),
        ("key", pa.string()),
        ("elapsed_s", pa.float64()),
        ("batch_size", pa.int64()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
        ("layout", pa.string()),
    ]
)
CORE_COLUMNS = frozenset(CORE_SCHEMA.names)
RENAMED_PREFIX = "manifest_"  # a passthrough column named like a record field is kept as manifest_<name>
UPDATES_DIR = "_ipaflow/updates"  # new passthrough values of done records, applied by the next fold
UPDATE_CHUNK = 262_144  # updated records merged at a time by a fold (their passthrough values held)
JSON_TEXT = {b"ipaflow": b"json"}  # field metadata: a passthrough column whose values mix types, as JSON text


def now() -> datetime:
    return datetime.now(timezone.utc)


def make_record(
    *,
    job_id: str,
    spec: str,
    status: str,
    run_id: str,
    error: str | None = None,
    outputs: list[str] | None = None,
    seed: int | None = None,
    params: dict | None = None,
    key: str | None = None,
    elapsed_s: float = 0.0,
    batch_size: int = 0,
    extra: dict | None = None,
    redact: Callable[[str], str] | None = None,
    layout: str | None = None,
) -> dict[str, Any]:
    """One metadata record; ``error`` goes through ``redact`` (the storage's redactor; by default one that
    knows the environment's credentials only), output URIs lose the credentials a URI may carry and otherwise
    stay usable."""
    redact = redact or Redactor().redact
    record = {
        "id": job_id,
        "spec": spec,
        "status": status,
        "error": redact(error) if error else None,
        "outputs": [redact_url(uri) for uri in outputs or []],  # usable URIs: see redact_url
        "seed": seed,
        "params": json.dumps(params, sort_keys=True, ensure_ascii=False) if params is not None else None,
        "key": key,
        "elapsed_s": round(float(elapsed_s), 4),
        "batch_size": batch_size,
        "finished_at": now(),
        "run_id": run_id,
        "layout": layout,
    }
    for name, value in (extra or {}).items():
        record.setdefault(record_column(name), value)  # a manifest column never overwrites a record field
    return record


# -- passthrough columns ------------------------------------------------------------------------------------------
def record_column(name: str) -> str:
    """The record column a passthrough manifest column is kept in: its own name, or ``manifest_<name>`` where
    the name is a record field's (``status``, ``outputs``, ...)."""
    return RENAMED_PREFIX + name if name in CORE_COLUMNS else name


def passthrough_names(columns: Iterable[str]) -> dict[str, str]:
    """Manifest column -> record column, for every passthrough column of a manifest. Raises ManifestError where
    a renamed column would meet a column of that name (``status`` and ``manifest_status``)."""
    from ipaflow.specs.manifest import KNOWN_COLUMNS, ManifestError

    names = {name: record_column(name) for name in columns if name not in KNOWN_COLUMNS}
    for name, kept in names.items():
        if kept != name and kept in names:
            raise ManifestError(f"column {name} is a metadata record field, so it is kept as {kept}, and the manifest "
                                f"has a column {kept} too: rename one of them")
    return names


def renamed_columns(names: dict[str, str]) -> list[str]:
    """One line per passthrough column kept under another name (``passthrough_names``)."""
    return [f"column {name} is a metadata record field: its values are kept as {kept}"
            for name, kept in names.items() if kept != name]


def _json_text(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)  # ASCII: valid UTF-8 whatever the text held


def is_json_text(item: pa.Field) -> bool:
    """Whether a passthrough column holds JSON text (its values mix types): decode each cell with json.loads."""
    return bool(item.metadata) and item.metadata.get(b"ipaflow") == b"json"


def _structured(kind: pa.DataType) -> bool:
    """Struct, map or union anywhere in the type: mappings are kept as JSON text (Parquet has no empty struct,
    and structs of different rows rarely agree)."""
    if pa.types.is_struct(kind) or pa.types.is_map(kind) or pa.types.is_union(kind):
        return True
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) and \
        _structured(kind.value_type)


def passthrough_column(name: str, values: list) -> tuple[pa.Field, pa.Array]:
    """A passthrough column of records: typed where every value keeps itself in one Arrow type (ints and floats
    together as float64; lists of one such type), else every value as JSON text once, the field marked
    ``JSON_TEXT``."""
    try:
        array = pa.array(values)
    except (pa.ArrowException, OverflowError, ValueError, TypeError):
        array = None
    if array is not None and not _structured(array.type) and \
            all(value_text(kept) == value_text(value) for kept, value in zip(array.to_pylist(), values)):
        return pa.field(name, array.type), array
    text = pa.array([None if v is None else _json_text(v) for v in values], type=pa.string())
    return pa.field(name, pa.string(), metadata=JSON_TEXT), text


def _table(records: list[dict]) -> pa.Table:
    """Records to a table: core columns typed, passthrough columns by ``passthrough_column``."""
    extra = sorted({name for record in records for name in record} - CORE_COLUMNS)
    arrays = [pa.array([r.get(f.name) for r in records], type=f.type) for f in CORE_SCHEMA]
    fields = list(CORE_SCHEMA)
    for name in extra:
        item, array = passthrough_column(name, [r.get(name) for r in records])
        arrays.append(array)
        fields.append(item)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _update_table(rows: list[dict], names: Iterable[str]) -> pa.Table:
    """Updates to a table: ``id`` and every passthrough column of the manifest (record names), nulls included,
    and any other a row holds (a JSON Lines column first seen after the manifest's head)."""
    fields, arrays = [pa.field("id", pa.string())], [pa.array([r["id"] for r in rows], type=pa.string())]
    for name in sorted(set(names).union(*rows) - {"id"}):
        item, array = passthrough_column(name, [r.get(name) for r in rows])
        fields.append(item)
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# -- passthrough values, hashed canonically ----------------------------------------------------------------------
def _canonical_value(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_canonical_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    return value


def value_text(value: Any) -> str:
    """A passthrough value as canonical text: equal for a manifest's value and the same value read back from the
    records, whatever type the records keep it in (1 and 1.0, a list and its JSON text decoded)."""
    if value is None:
        return "\x01"
    if isinstance(value, bool):
        return "b1" if value else "b0"
    if isinstance(value, str):
        return "s" + value
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return f"i{int(value)}"
    if isinstance(value, float):
        return "f" + repr(value)
    if isinstance(value, (list, tuple, dict)):
        return "j" + json.dumps(_canonical_value(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                default=str)
    return "s" + str(value)


def _column_hashes(column: pa.ChunkedArray | pa.Array | None, item: pa.Field | None, rows: int) -> np.ndarray:
    """``hash_strings(value_text(v))`` of every cell of a record column; strings and integers in Arrow."""
    if column is None:
        return np.full(rows, hash_strings(["\x01"])[0], dtype=np.uint64)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    plain = item is None or not is_json_text(item)
    if plain and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or
                  pa.types.is_integer(column.type)):
        text = pc.binary_join_element_wise("i" if pa.types.is_integer(column.type) else "s",
                                           pc.cast(column, pa.string()), "")
        return hash_strings(pc.if_else(pc.is_null(column), "\x01", text))
    values = column.to_pylist()
    if not plain:
        values = [None if v is None else _decoded(v) for v in values]
    return hash_strings([value_text(v) for v in values])


def _decoded(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def passthrough_hashes(table: pa.Table, names: list[str]) -> np.ndarray:
    """One uint64 per record: its id and the canonical text of each of ``names`` (record columns, sorted; a
    missing column reads as nulls). Equal for a record and a manifest row exactly when their passthrough values
    are (``row_passthrough_hashes``)."""
    rows = table.num_rows
    combined = hash_strings(table.column("id"))
    for name in sorted(names):
        present = name in table.column_names
        combined = hash_combine(combined, _column_hashes(table.column(name) if present else None,
                                                         table.schema.field(name) if present else None, rows))
    return combined


def row_passthrough_hashes(ids: list[str], values: list[dict], names: list[str]) -> np.ndarray:
    """``passthrough_hashes`` of manifest rows: their ids and passthrough values by record column."""
    combined = hash_strings(ids)
    for name in sorted(names):
        combined = hash_combine(combined, hash_strings([value_text(row.get(name)) for row in values]))
    return combined


def _to_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _from_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A part's table, decoding only ``columns`` where given (those it holds)."""
    source = pq.ParquetFile(io.BytesIO(data))
    if not columns:
        return source.read()
    present = set(source.schema_arrow.names)
    return source.read(columns=[c for c in columns if c in present])


def _nested(kind: pa.DataType) -> bool:
    return pa.types.is_nested(kind) or pa.types.is_dictionary(kind)


def _recode(item: pa.Field, target: pa.Field) -> bool:
    """Whether a part's column must be rewritten for the schema: its values become JSON text."""
    if pa.types.is_null(item.type):
        return False
    if is_json_text(target):
        return not is_json_text(item)
    return _nested(item.type) and pa.types.is_string(target.type)


def _list_like(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def _widen_type(old: pa.DataType, new: pa.DataType) -> pa.DataType | None:
    """The one type both fit, or None: equal types, int and float as float64, lists of such types."""
    if pa.types.is_null(old):
        return new
    if pa.types.is_null(new) or old == new:
        return old
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(f(old) for f in numeric) and any(f(new) for f in numeric):
        return pa.float64()
    if _list_like(old) and _list_like(new):
        inner = _widen_type(old.value_type, new.value_type)
        return None if inner is None else pa.list_(inner)
    return None


def widen(old: pa.Field | None, new: pa.Field) -> pa.Field:
    """The field a passthrough column keeps when parts disagree: the type both fit (``_widen_type``), else JSON
    text (``JSON_TEXT``)."""
    if old is None:
        return new
    if is_json_text(old) or is_json_text(new):
        return old if is_json_text(old) else new
    kind = _widen_type(old.type, new.type)
    return pa.field(new.name, pa.string(), metadata=JSON_TEXT) if kind is None else pa.field(new.name, kind)


def _as_json_text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pa.array([None if v is None else _json_text(v) for v in column.to_pylist()], type=pa.string())


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the columns and types of ``schema`` (missing columns null; where the schema says JSON text,
    values not yet held so encoded once)."""
    arrays = []
    for target in schema:
        if target.name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, type=target.type))
            continue
        column = table.column(target.name)
        if is_json_text(target) and not is_json_text(table.schema.field(target.name)) and \
                not pa.types.is_null(column.type):
            arrays.append(_as_json_text(column))
        elif column.type == target.type:
            arrays.append(column)
        elif pa.types.is_string(target.type) and _nested(column.type):
            arrays.append(_as_json_text(column))
        else:
            arrays.append(pc.cast(column, target.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class FoldResult(RowCounts):
    """What a fold did: this run's records written, by status (its counts: ``ok``, ``failed``, ``images``,
    ``updated``), journal files folded, parts written, rewritten and deleted, bytes written."""

    files: int = 0
    records: int = 0
    parts_written: int = 0
    parts_rewritten: int = 0
    parts_deleted: int = 0
    bytes_written: int = 0
    superseded: int = 0


@dataclass
class RecordIndex:
    """Where each id's record lives: sorted id hashes with the part holding each (~12 bytes per record)."""

    parts: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    part_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def parts_holding(self, hashes: np.ndarray) -> set[int]:
        if not len(self.hashes) or not len(hashes):
            return set()
        hit = members(self.hashes, np.unique(hashes))
        return set(np.unique(self.part_of[hit]).tolist())


class MetadataStore:
    """The records of one output folder."""

    def __init__(self, storage: Storage, out: str):
        self.storage = storage
        self.out = out

    # -- the journal --------------------------------------------------------------------------------------------
    def journal(self, run_id: str, name: str, records: list[dict]) -> None:
        """Append records to the run's journal (one atomic file)."""
        if records:
            uri = join(self.out, JOURNAL_DIR, run_id, f"{name}.parquet")
            self.storage.write_atomic(uri, _to_bytes(_table(records)))

    def journal_files(self, run_id: str | None = None) -> list[str]:
        root = join(self.out, JOURNAL_DIR, run_id) if run_id else join(self.out, JOURNAL_DIR)
        return [join(root, rel) for rel in self.storage.list_files(root) if rel.endswith(".parquet")]

    # -- updates: new passthrough values for records whose outputs stand ----------------------------------------
    def journal_updates(self, run_id: str, name: str, rows: list[dict], names: Iterable[str]) -> None:
        """New passthrough values for done records (one atomic file): ``rows`` hold ``id`` and record columns;
        ``names`` are all the manifest's passthrough columns (record names): each updated record holds exactly
        these. The next fold applies them (``fold``); until then readers see the old values."""
        if rows:
            uri = join(self.out, UPDATES_DIR, run_id, f"{name}.parquet")
            self.storage.write_atomic(uri, _to_bytes(_update_table(rows, names)))

    def update_files(self) -> list[str]:
        root = join(self.out, UPDATES_DIR)
        return [join(root, rel) for rel in self.storage.list_files(root) if rel.endswith(".parquet")]

    def _read_table(self, uri: str, columns: list[str] | None = None) -> pa.Table | None:
        try:
            data = self.storage.read_bytes(uri)
        except FileNotFoundError:
            return None
        try:
            return _from_bytes(data, columns)
        except pa.ArrowException as exc:  # not ours, or damaged by hand: say so and go on without it
            log.warning("skipping unreadable metadata file %s (%s)", self.storage.redact(uri), exc)
            return None

    def journaled_ids(self, run_id: str, prefix: str = "", status: str | None = None) -> set[str]:
        """Ids journaled so far in a run by files starting with ``prefix`` (a shard's earlier attempts, for task
        retries), optionally only with a given status."""
        ids: set[str] = set()
        for uri in self.journal_files(run_id):
            if posixpath.basename(uri).startswith(prefix):
                table = self._read_table(uri, ["id", "status"])
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
                for uri, table in zip(chunk, pool.map(lambda u: self._read_table(u, columns), chunk)):
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

    def _schemas(self, parts: list[str]) -> list[pa.Schema]:
        def read(uri: str) -> pa.Schema | None:
            try:
                with self.storage.fs(uri)[0].open(self.storage.fs(uri)[1], "rb") as handle:
                    return pq.ParquetFile(handle).schema_arrow
            except (OSError, pa.ArrowException):
                return None

        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="ipaflow-schema") as pool:
            return list(pool.map(read, parts))

    def _canonical(self, schemas: Iterable[pa.Schema]) -> pa.Schema:
        fields: dict[str, pa.Field] = {}
        for schema in schemas:
            for item in schema:
                if item.name not in CORE_COLUMNS:
                    fields[item.name] = widen(fields.get(item.name), item)
        return pa.schema(list(CORE_SCHEMA) + [pa.field(n, pa.string()) if pa.types.is_null(f.type) else f
                                              for n, f in sorted(fields.items())])

    # -- folding ------------------------------------------------------------------------------------------------
    def fold(self, run_id: str | None = None, index: RecordIndex | None = None,
             drop_outputs: Callable[[list[str]], None] | None = None) -> FoldResult:
        """Fold every journal file into ``metadata/`` (see the module docstring); ``index`` is the scan of the
        parts when the caller has one. ``drop_outputs`` is handed the outputs of superseded records that live in
        containers, before any part changes (``ipaflow.tasks.containers.drop_members``)."""
        result = FoldResult()
        files, updates = self.journal_files(), self.update_files()
        if not files and not updates:
            return result
        run_id = run_id or uuid.uuid4().hex[:12]
        # 1. the winning journal record of each id (the latest finished_at; a later file wins a tie)
        keys: list[np.ndarray] = []
        readable: list[str] = []
        for uri, table in self.iter_tables(["id"], files):
            readable.append(uri)
            keys.append(hash_strings(table.column("id")))
        update_keys: list[np.ndarray] = []
        update_readable: list[str] = []
        for uri, table in self.iter_tables(["id"], updates):
            update_readable.append(uri)
            update_keys.append(hash_strings(table.column("id")))
        schemas = [s for s in self._schemas(readable + update_readable) if s is not None]
        if not keys and not update_keys:
            for uri in files + updates:
                self.storage.delete(uri)
            result.files = len(files)
            return result
        masks = self._latest(keys, readable) if keys else []
        index = index if index is not None else self.index()
        rendered = np.unique(np.concatenate([k[m] for k, m in zip(keys, masks)])) if len(index.hashes) and keys else \
            np.zeros(0, np.uint64)  # nothing to supersede: the first run into a folder
        del keys
        # updates apply to records in the parts, unless this fold brings a newer record of the id
        updated = np.unique(np.concatenate(update_keys)) if update_keys else np.zeros(0, np.uint64)
        updated = updated[members(updated, index.hashes) & ~members(updated, rendered)]
        winners = np.union1d(rendered, updated)
        # 2. the parts holding superseded records, and the container samples they name (not those of updated
        # records: their outputs stand)
        touched = sorted(index.parts_holding(winners))
        if drop_outputs is not None and touched and len(rendered):
            doomed: list[str] = []
            for _, table in self.iter_tables(["id", "outputs", "layout"],
                                             [index.parts[i] for i in sorted(index.parts_holding(rendered))]):
                gone = members(hash_strings(table.column("id")), rendered)
                for outputs in table.column("outputs").filter(pa.array(gone)).to_pylist():
                    doomed.extend(uri for uri in outputs or [] if "#" in uri)
            if doomed:
                drop_outputs(doomed)
        # 3. the schema every part conforms to
        rewritten = set(touched)
        small = [i for i, rows in enumerate(index.rows) if rows < SMALL_PART_ROWS and i not in rewritten]
        small = small if len(small) > 1 else []
        part_schemas = self._schemas(index.parts)
        canonical = self._canonical([s for s in part_schemas if s is not None] + schemas)
        previous = self._read_schema()
        if previous is None or not previous.equals(canonical):
            self.storage.write_atomic(join(self.out, SCHEMA_FILE), _to_bytes(canonical.empty_table()))
        # 4. the new parts: the winners, then the small parts merged in
        writer = _PartWriter(self, canonical, run_id, result)
        for number, (uri, table) in enumerate(self.iter_tables(files=readable)):
            del uri
            chosen = table.filter(pa.array(masks[number])) if not masks[number].all() else table
            ok = pc.equal(chosen.column("status"), "ok")
            mine = pc.equal(chosen.column("run_id"), run_id)
            result.ok += int(pc.sum(pc.and_(ok, mine)).as_py() or 0)
            result.failed += int(pc.sum(pc.and_(pc.invert(ok), mine)).as_py() or 0)
            lengths = pc.list_value_length(chosen.filter(pc.and_(ok, mine)).column("outputs"))
            result.images += int(pc.sum(lengths).as_py() or 0)
            result.records += chosen.num_rows
            writer.add(chosen)
        if len(updated):
            self._apply_updates(update_readable, updated, index, canonical, writer, result)
        for _, table in self.iter_tables(files=[index.parts[i] for i in small]):
            writer.add(table)
        writer.close()
        # 5. the old parts, without what the new ones supersede; then the merged small parts go
        for number in touched:
            uri = index.parts[number]
            table = self._read_table(uri)
            if table is None:
                continue
            keep = pc.invert(pa.array(members(hash_strings(table.column("id")), winners)))
            kept = table.filter(keep)
            result.superseded += table.num_rows - kept.num_rows
            if kept.num_rows:
                data = _to_bytes(conform(kept, canonical))
                self.storage.write_atomic(uri, data)
                result.parts_rewritten += 1
                result.bytes_written += len(data)
            else:
                self.storage.delete(uri)
                result.parts_deleted += 1
        for number in small:
            self.storage.delete(index.parts[number])
            result.parts_deleted += 1
        # 6. parts whose columns the schema now holds as JSON text (values mixed types across parts)
        skip = rewritten | set(small)
        for number, (uri, schema) in enumerate(zip(index.parts, part_schemas)):
            if schema is None or number in skip:
                continue
            if any(item.name in canonical.names and _recode(item, canonical.field(item.name)) for item in schema):
                table = self._read_table(uri)
                if table is not None:
                    self.storage.write_atomic(uri, _to_bytes(conform(table, canonical)))
                    result.parts_rewritten += 1
        for uri in files + updates:
            self.storage.delete(uri)
        result.files = len(files)
        return result

    def _apply_updates(self, sources: list[str], updated: np.ndarray, index: RecordIndex, schema: pa.Schema,
                       writer: _PartWriter, result: FoldResult) -> None:
        """Write the records ``updated`` names anew: each record's core fields (outputs, key, status, ...) with
        the passthrough values of its update, and a new ``finished_at`` (so that it wins over the old copy
        until step 5 removes that). Updates are taken UPDATE_CHUNK rows at a time, each chunk reading only the
        parts holding its ids: memory stays a chunk of passthrough values and a part."""
        stamp = now()
        names = sorted({n for item in self._schemas(sources) if item is not None for n in item.names} - {"id"})
        target = pa.schema([pa.field("id", pa.string())] + [schema.field(n) for n in names])
        chunk: list[pa.Table] = []
        rows = 0
        for _, table in self.iter_tables(files=sources):
            chunk.append(conform(table, target))  # a column an update lacks: null (the record no longer holds it)
            rows += table.num_rows
            if rows >= UPDATE_CHUNK:
                self._merge_updates(pa.concat_tables(chunk), updated, index, stamp, writer, result)
                chunk, rows = [], 0
        if chunk:
            self._merge_updates(pa.concat_tables(chunk), updated, index, stamp, writer, result)

    def _merge_updates(self, table: pa.Table, updated: np.ndarray, index: RecordIndex, stamp: datetime,
                       writer: _PartWriter, result: FoldResult) -> None:
        """One chunk of updates (in file order) merged into the records they name, reading only their parts."""
        hashes = hash_strings(table.column("id"))
        keep = members(hashes, updated)
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
        for _, old in self.iter_tables(files=[index.parts[i] for i in sorted(index.parts_holding(ordered))]):
            old_hashes = hash_strings(old.column("id"))
            hit = members(old_hashes, ordered)
            if not hit.any():
                continue
            old = old.filter(pa.array(hit))
            rows = order[np.searchsorted(ordered, old_hashes[hit])]
            core = old.select(CORE_SCHEMA.names).set_column(
                CORE_SCHEMA.get_field_index("finished_at"), finished, pa.array([stamp] * old.num_rows, type=finished.type))
            patch = values.take(pa.array(rows))
            writer.add(pa.Table.from_arrays(core.columns + patch.columns,
                                            schema=pa.schema(list(core.schema) + list(patch.schema))))
            result.updated += old.num_rows

    def _latest(self, keys: list[np.ndarray], sources: list[str]) -> list[np.ndarray]:
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
            table = self._read_table(uri, ["finished_at"])
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

    def _read_schema(self) -> pa.Schema | None:
        table = self._read_table(join(self.out, SCHEMA_FILE))
        return None if table is None else table.schema

    def repair(self, index: RecordIndex) -> int:
        """Ids held by more than one part (a fold killed between its writes): keep the latest record of each,
        rewrite the other parts without it. Returns how many records were dropped."""
        twice = repeated(index.hashes)
        if not len(twice):
            return 0
        holders = sorted(set(index.part_of[members(index.hashes, twice)].tolist()))
        best: dict[str, tuple[int, int]] = {}
        for number in holders:
            table = self._read_table(index.parts[number], ["id", "finished_at"])
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
            table = self._read_table(uri)
            if table is None:
                continue
            ids = table.column("id").to_pylist()
            keep = [not (i in best and best[i][1] != number) for i in ids]
            if all(keep):
                continue
            dropped += keep.count(False)
            kept = table.filter(pa.array(keep))
            if kept.num_rows:
                self.storage.write_atomic(uri, _to_bytes(kept))
            else:
                self.storage.delete(uri)
        return dropped

    # -- reading ------------------------------------------------------------------------------------------------
    def iter_current(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The current records, part by part: one per id, the latest, even while a fold was cut short (an id
        in two parts) or a journal is still unfolded (a run in flight, or killed)."""
        sources = self.part_files() + self.journal_files()
        keys: list[np.ndarray] = []
        read: list[str] = []
        for uri, table in self.iter_tables(["id"], sources):
            read.append(uri)
            keys.append(hash_strings(table.column("id")))
        if not keys:
            return
        masks = self._latest(keys, read)
        del keys
        for number, (uri, table) in enumerate(self.iter_tables(columns, read)):
            del uri
            if len(masks[number]) != table.num_rows:
                continue  # changed since it was scanned
            chosen = table if masks[number].all() else table.filter(pa.array(masks[number]))
            if chosen.num_rows:
                yield chosen.select([c for c in columns if c in chosen.column_names]) if columns else chosen

    def load(self) -> dict[str, dict]:
        """Every id's current record as a dict: small output folders only (tests, tools)."""
        return {r["id"]: r for table in self.iter_current() for r in table.to_pylist()}

    def compact(self, run_id: str | None = None) -> int:
        """Fold the journal into ``metadata/``; returns how many journal files were folded."""
        return self.fold(run_id).files


class _PartWriter:
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
        data = _to_bytes(part)
        self.store.storage.write_atomic(join(self.store.out, METADATA_DIR, name), data)
        self.result.parts_written += 1
        self.result.bytes_written += len(data)

    def close(self) -> None:
        if self.rows:
            self._write(self.rows)


def done_hashes(table: pa.Table, out: str, present: Callable[[pa.Array], np.ndarray]) -> np.ndarray:
    """``hash(id, key, layout)`` of the ok records of ``table`` whose outputs are all ``present`` (a vectorised
    test over relative output paths, container members stripped)."""
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False)
    if not ok.any():
        return np.zeros(0, np.uint64)
    table = table.filter(pa.array(ok))
    outputs = table.column("outputs").combine_chunks()
    flat = pc.list_flatten(outputs)
    parents = pc.list_parent_indices(outputs).to_numpy(zero_copy_only=False)
    relative = pc.replace_substring_regex(flat, "#.*$", "")
    prefix = out.rstrip("/") + "/"
    inside = pc.starts_with(relative, prefix).to_numpy(zero_copy_only=False)
    relative = pc.utf8_slice_codeunits(relative, len(prefix))
    missing = ~(present(relative) & inside)
    absent = np.zeros(table.num_rows, dtype=bool)
    np.logical_or.at(absent, parents, missing)
    empty = pc.fill_null(pc.list_value_length(outputs), 0).to_numpy(zero_copy_only=False) == 0
    good = ~absent & ~empty
    layout = pc.fill_null(table.column("layout"), "files") if "layout" in table.column_names else \
        pa.array(["files"] * table.num_rows)
    return hash_joined(table.column("id"), table.column("key"), layout)[good]


OUTPUT_FOLDERS = ("images", "videos", *CONTAINERS)  # every layout's top folders (specs.outputs)


def listing_hashes(storage: Storage, out: str, folders: Iterable[str] = OUTPUT_FOLDERS) -> np.ndarray:
    """Sorted hashes of the paths (relative to ``out``) of every file under ``folders``: one listing per
    folder, streamed on local disk, so a million outputs cost 8 MB here."""
    import os

    chunks = []
    for folder in folders:
        root = join(out, folder)
        fs, path = storage.fs(root)
        if type(fs).__name__ == "LocalFileSystem":
            if not os.path.isdir(path):
                continue
            batch: list[str] = []
            for directory, _, names in os.walk(path):
                inner = os.path.relpath(directory, path)
                relative = folder if inner == "." else f"{folder}/{inner.replace(os.sep, '/')}"
                batch.extend(f"{relative}/{name}" for name in names if not name.endswith(".partial"))
                if len(batch) >= 65536:
                    chunks.append(hash_strings(batch))
                    batch = []
            if batch:
                chunks.append(hash_strings(batch))
        else:
            names = storage.list_files(root)
            for start in range(0, len(names), 65536):
                chunks.append(hash_strings([f"{folder}/{n}" for n in names[start:start + 65536]]))
    return np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, np.uint64)
