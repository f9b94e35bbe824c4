"""Metadata records: one per manifest id, kept across runs.

While a run is in flight, shard tasks append records to a journal (``_ipaflow/journal/<run>/*.parquet``), each
file written atomically and only after the outputs it names exist. Compaction folds the journal into
``metadata/records.parquet`` (latest record per id wins) with one atomic write, then removes the journal files
it folded. A run that dies leaves its journal behind; the next run folds it in first. So reading the
``metadata/`` folder always gives exactly one record per id, and no record says ``ok`` without its output.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ipaflow.core.redaction import Redactor, redact_url
from ipaflow.core.storage import Storage, join

log = logging.getLogger("ipaflow.metadata")
RECORDS_FILE = "metadata/records.parquet"
JOURNAL_DIR = "_ipaflow/journal"
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
    ]
)
CORE_COLUMNS = frozenset(CORE_SCHEMA.names)


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
    }
    for name, value in (extra or {}).items():
        if name not in CORE_COLUMNS:
            record[name] = value
    return record


def _table(records: list[dict]) -> pa.Table:
    """Records to a table: core columns typed, passthrough columns inferred (as text where types clash)."""
    extra = sorted({name for record in records for name in record} - CORE_COLUMNS)
    arrays = [pa.array([r.get(f.name) for r in records], type=f.type) for f in CORE_SCHEMA]
    fields = list(CORE_SCHEMA)
    for name in extra:
        values = [r.get(name) for r in records]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            array = pa.array([None if v is None else json.dumps(v, default=str) for v in values], type=pa.string())
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _to_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _from_bytes(data: bytes) -> list[dict]:
    return pq.read_table(io.BytesIO(data)).to_pylist()


class MetadataStore:
    """The records of one output folder."""

    def __init__(self, storage: Storage, out: str):
        self.storage = storage
        self.out = out

    def journal(self, run_id: str, name: str, records: list[dict]) -> None:
        """Append records to the run's journal (one atomic file)."""
        if records:
            uri = join(self.out, JOURNAL_DIR, run_id, f"{name}.parquet")
            self.storage.write_atomic(uri, _to_bytes(_table(records)))

    def journal_files(self, run_id: str | None = None) -> list[str]:
        root = join(self.out, JOURNAL_DIR, run_id) if run_id else join(self.out, JOURNAL_DIR)
        return [join(root, rel) for rel in self.storage.list_files(root) if rel.endswith(".parquet")]

    def _read(self, uri: str) -> list[dict]:
        try:
            data = self.storage.read_bytes(uri)
        except FileNotFoundError:
            return []
        try:
            return _from_bytes(data)
        except pa.ArrowException as exc:  # not ours, or damaged by hand: say so and go on without it
            log.warning("skipping unreadable metadata file %s (%s)", self.storage.redact(uri), exc)
            return []

    def journaled_ids(self, run_id: str, prefix: str = "", status: str | None = None) -> set[str]:
        """Ids journaled so far in a run, optionally only by files starting with ``prefix`` (a shard's earlier
        attempts, for task retries) and with a given status."""
        ids: set[str] = set()
        for uri in self.journal_files(run_id):
            if posixpath.basename(uri).startswith(prefix):
                ids.update(r["id"] for r in self._read(uri) if status is None or r["status"] == status)
        return ids

    def _merge(self, journal_files: Iterable[str]) -> dict[str, dict]:
        latest = {r["id"]: r for r in self._read(join(self.out, RECORDS_FILE))}
        for uri in journal_files:
            for record in self._read(uri):
                current = latest.get(record["id"])
                if current is None or record["finished_at"] >= current["finished_at"]:
                    latest[record["id"]] = record
        return latest

    def load(self) -> dict[str, dict]:
        """Every id's latest record: the compacted file plus any journal not yet folded in."""
        return self._merge(self.journal_files())

    def compact(self) -> int:
        """Fold every journal file into ``metadata/records.parquet``; returns how many files were folded."""
        files = self.journal_files()
        if not files:
            return 0
        records = self._merge(files)
        ordered = sorted(records.values(), key=lambda r: r["id"])
        self.storage.write_atomic(join(self.out, RECORDS_FILE), _to_bytes(_table(ordered)))
        for uri in files:
            self.storage.delete(uri)
        return len(files)
