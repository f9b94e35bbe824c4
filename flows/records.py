"""``ipaflow records OUT``: the current records of an output folder, one per id, as JSON Lines on stdout or into
a ``.parquet``, ``.csv`` or ``.jsonl`` file (local or any fsspec URI).

``pandas.read_parquet(OUT/metadata)`` gives the same rows; this also holds while a run is in flight or after one
was killed (unfolded journal records count, the latest record of an id wins) and streams part by part, so it
works at any size. ``--where`` keeps the records a filter matches (``ipaflow.flows.record_filter``), part by part.
"""

from __future__ import annotations

import io
import json
import sys
from typing import TextIO

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ipaflow.core.errors import UserError
from ipaflow.core.storage import Storage
from ipaflow.flows.record_filter import RecordFilter
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.metadata_schema import canonical_schema, conform, is_json_text

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _schema(store: MetadataStore, tables: list[pa.Table]) -> pa.Schema:
    """The folder's union schema, with every record field (a folder written before a field existed reads it
    as null)."""
    schema = store.read_schema()
    return canonical_schema([schema] if schema is not None else [t.schema for t in tables])


def _text_lists(table: pa.Table) -> pa.Table:
    """CSV holds no lists: list and struct cells as JSON text."""
    for number, item in enumerate(table.schema):
        if pa.types.is_nested(item.type):
            text = pa.array([None if v is None else json.dumps(v, default=str) for v in table.column(number).to_pylist()],
                            type=pa.string())
            table = table.set_column(number, item.name, text)
    return table


def _decoded_rows(table: pa.Table) -> list[dict]:
    """Rows for JSON Lines: passthrough columns held as JSON text (mixed types) as the values they encode."""
    rows = table.to_pylist()
    for item in table.schema:
        if is_json_text(item):
            for row in rows:
                if row[item.name] is not None:
                    row[item.name] = json.loads(row[item.name])
    return rows


def export_records(out: str, destination: str | None = None, storage: Storage | None = None,
                   stdout: TextIO | None = None, where: str | None = None) -> int:
    """Write the current records (those ``where`` matches, when given); returns how many (JSON Lines on
    ``stdout``, by default the ``sys.stdout`` of the call, not of the import)."""
    stdout = stdout or sys.stdout
    storage = storage or Storage()
    store = MetadataStore(storage, out)
    tables = store.iter_current()
    first = next(tables, None)
    schema = _schema(store, [first] if first is not None else [])
    matching = RecordFilter(where, schema) if where else None
    fmt = "jsonl"
    if destination:
        suffix = "." + destination.rsplit(".", 1)[-1].lower() if "." in destination else ""
        if suffix not in FORMATS:
            raise UserError(f"{destination}: use .parquet, .csv or .jsonl")
        fmt = FORMATS[suffix]
    buffer = io.BytesIO()
    writer = pq.ParquetWriter(buffer, schema, compression="zstd") if fmt == "parquet" else None
    count = 0
    csv_writer = None
    for table in _chain(first, tables):
        table = conform(table, schema)
        if matching is not None:
            table = matching.apply(table)
        count += table.num_rows
        if fmt == "parquet":
            writer.write_table(table)
        elif fmt == "csv":
            table = _text_lists(table)
            if csv_writer is None:
                csv_writer = pa_csv.CSVWriter(buffer, table.schema)
            csv_writer.write_table(table)
        else:
            lines = "".join(json.dumps(row, default=str, ensure_ascii=False) + "\n" for row in _decoded_rows(table))
            if destination:
                buffer.write(lines.encode())
            else:
                stdout.write(lines)
    if writer is not None:
        writer.close()
    if csv_writer is not None:
        csv_writer.close()
    if destination:
        storage.write_atomic(destination, buffer.getvalue())
    return count


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest
