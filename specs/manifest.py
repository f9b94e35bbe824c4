"""Reading manifests: Parquet (or CSV / JSON Lines) through fsspec, one plain dict per row, streamed.

Cells are handed on as they are; judging them is row validation's job (``specs.jobs``), so that one bad cell
fails its row, never the manifest. Hence CSV keeps the text ``nan`` (a NaN, reported) apart from an empty
cell (missing), and JSON Lines are parsed line by line in Python, where a column may hold a number in one
row and a string in the next (Arrow's JSON reader rejects the whole file for that).
"""

from __future__ import annotations

import csv
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ipaflow.core.storage import Storage

# Columns with a meaning (README, "Manifest reference"); every other column passes through to the metadata.
STRING_COLUMNS = ("id", "spec", "prompt", "negative_prompt", "image", "mask", "control_image", "style_folder")
LIST_COLUMNS = ("ip_image", "ip_mask", "ip_scale")
INT_COLUMNS = ("seed", "num_inference_steps", "width", "height", "num_frames", "num_images")
FLOAT_COLUMNS = ("guidance_scale", "strength", "controlnet_conditioning_scale")
INPUT_COLUMNS = ("image", "mask", "control_image", "ip_image", "style_folder", "ip_mask")
KNOWN_COLUMNS = frozenset(STRING_COLUMNS + LIST_COLUMNS + INT_COLUMNS + FLOAT_COLUMNS)
REQUIRED_COLUMNS = ("id", "spec")
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# Empty CSV cells and the usual spellings of "missing"; not "nan", which a user typed as a number.
CSV_NULLS = ["", "NA", "N/A", "n/a", "NULL", "null"]


class ManifestError(ValueError):
    """The manifest as a whole cannot be read (missing file, unknown format, missing required column)."""


@dataclass(frozen=True)
class Manifest:
    uri: str
    format: str
    columns: tuple[str, ...]
    num_rows: int
    storage: Storage = field(default_factory=Storage, repr=False, compare=False)

    @property
    def base(self) -> str:
        """The folder that relative input paths in the manifest are resolved against."""
        return posixpath.dirname(self.uri.rstrip("/"))

    @property
    def passthrough_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c not in KNOWN_COLUMNS)

    def iter_rows(self, batch_rows: int = 4096, columns: tuple[str, ...] | None = None) -> Iterator[dict[str, Any]]:
        """Rows in manifest order as plain Python values (None for nulls), read batch by batch; ``columns``
        (present ones) limits what is read, where the format allows (Parquet reads only those)."""
        fs, path = self.storage.fs(self.uri)
        if self.format == "jsonl":
            for row in _iter_jsonl(fs, path, self.uri, self.storage.redact):
                yield {column: row.get(column) for column in columns or self.columns}
            return
        for batch in _iter_batches(fs, path, self.format, batch_rows, columns):
            for row in batch.to_pylist():
                yield {key: _plain(value) for key, value in row.items()}


def _plain(value: Any) -> Any:
    """Binary cells as text; anything else as it is (a NaN too: row validation reports it)."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _format_of(uri: str, redact) -> str:
    path = uri.split("?", 1)[0].lower()
    for suffix, fmt in FORMATS.items():
        if path.endswith(suffix):
            return fmt
    raise ManifestError(f"{redact(uri)}: unknown manifest format; use .parquet, .csv or .jsonl")


def _read_csv(fs, path: str) -> pa.Table:
    """A CSV file; the text columns ipaflow knows stay text (an id ``007`` keeps its zeros)."""
    with fs.open(path, "rb") as handle:
        header = next(csv.reader([handle.readline().decode("utf-8-sig")]), [])
        handle.seek(0)
        types = {name: pa.string() for name in header if name in STRING_COLUMNS}
        options = pa_csv.ConvertOptions(column_types=types, null_values=CSV_NULLS, strings_can_be_null=True)
        return pa_csv.read_csv(handle, convert_options=options)


def _iter_jsonl(fs, path: str, uri: str, redact) -> Iterator[dict[str, Any]]:
    """One dict per non-blank line. A line that is not a JSON object makes the file unreadable as a whole:
    which row it was meant to be (and its id) cannot be known."""
    with fs.open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)  # bytes: a UTF-8 byte order mark is accepted
            except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
                raise ManifestError(f"{redact(uri)}: line {number} is not valid JSON ({exc.__class__.__name__})") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{redact(uri)}: line {number} is not a JSON object")
            yield row


def _jsonl_shape(fs, path: str, uri: str, redact) -> tuple[tuple[str, ...], int]:
    """The columns (every key seen, in first-seen order) and the number of rows of a JSON Lines file."""
    columns: dict[str, None] = {}
    count = 0
    for row in _iter_jsonl(fs, path, uri, redact):
        columns.update(dict.fromkeys(row))
        count += 1
    return tuple(columns), count


def _iter_batches(fs, path: str, fmt: str, batch_rows: int,
                  columns: tuple[str, ...] | None) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        with fs.open(path, "rb") as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=columns and list(columns))
    else:
        table = _read_csv(fs, path)
        yield from (table.select(list(columns)) if columns else table).to_batches(max_chunksize=batch_rows)


def open_manifest(uri: str, storage: Storage | None = None) -> Manifest:
    """Open a manifest and check what makes it usable as a whole; rows are checked one by one later."""
    storage = storage or Storage()
    redact = storage.redact
    fmt = _format_of(uri, redact)
    try:
        fs, path = storage.fs(uri)
        if not fs.exists(path):
            raise ManifestError(f"{redact(uri)}: manifest not found")
        if fmt == "parquet":
            with fs.open(path, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
                columns, num_rows = tuple(meta.schema.to_arrow_schema().names), meta.num_rows
        elif fmt == "csv":
            table = _read_csv(fs, path)
            columns, num_rows = tuple(table.column_names), table.num_rows
        else:
            columns, num_rows = _jsonl_shape(fs, path, uri, redact)
    except ManifestError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise ManifestError(f"{redact(uri)}: cannot read manifest ({exc.__class__.__name__}: {redact(exc)})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"{redact(uri)}: missing required column(s) {', '.join(missing)}")
    return Manifest(uri=uri, format=fmt, columns=columns, num_rows=num_rows, storage=storage)
