"""Reading manifests: Parquet (or CSV / JSON Lines) through fsspec, one plain dict per row, streamed."""

from __future__ import annotations

import csv
import math
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

# Columns with a meaning (DESIGN.md, "Manifest columns"); every other column passes through to the metadata.
STRING_COLUMNS = ("id", "spec", "prompt", "negative_prompt", "image", "mask", "control_image", "style_folder")
LIST_COLUMNS = ("ip_image", "ip_mask", "ip_scale")
INT_COLUMNS = ("seed", "num_inference_steps", "width", "height", "num_frames", "num_images")
FLOAT_COLUMNS = ("guidance_scale", "strength", "controlnet_conditioning_scale")
INPUT_COLUMNS = ("image", "mask", "control_image", "ip_image", "style_folder", "ip_mask")
KNOWN_COLUMNS = frozenset(STRING_COLUMNS + LIST_COLUMNS + INT_COLUMNS + FLOAT_COLUMNS)
REQUIRED_COLUMNS = ("id", "spec")
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class ManifestError(ValueError):
    """The manifest as a whole cannot be read (missing file, unknown format, missing required column)."""


@dataclass(frozen=True)
class Manifest:
    uri: str
    format: str
    columns: tuple[str, ...]
    num_rows: int
    storage_options: dict | None = None

    @property
    def base(self) -> str:
        """The folder that relative input paths in the manifest are resolved against."""
        return posixpath.dirname(self.uri.rstrip("/"))

    @property
    def passthrough_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c not in KNOWN_COLUMNS)

    def iter_rows(self, batch_rows: int = 4096) -> Iterator[dict[str, Any]]:
        """Rows in manifest order as plain Python values (None for nulls), read batch by batch."""
        for batch in _iter_batches(self, batch_rows):
            for row in batch.to_pylist():
                yield {key: _plain(value) for key, value in row.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return value  # kept: a NaN is reported by row validation, not silently treated as missing
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _format_of(uri: str) -> str:
    path = uri.split("?", 1)[0].lower()
    for suffix, fmt in FORMATS.items():
        if path.endswith(suffix):
            return fmt
    raise ManifestError(f"{uri}: unknown manifest format; use .parquet, .csv or .jsonl")


def _string_schema(names: list[str]) -> dict[str, pa.DataType]:
    return {name: pa.string() for name in names if name in STRING_COLUMNS}


def _read_text_table(fs, path: str, fmt: str) -> pa.Table:
    with fs.open(path, "rb") as handle:
        if fmt == "csv":
            header = next(csv.reader([handle.readline().decode("utf-8-sig")]), [])
            handle.seek(0)
            options = pa_csv.ConvertOptions(column_types=_string_schema(header), strings_can_be_null=True)
            return pa_csv.read_csv(handle, convert_options=options)
        schema = pa.schema([(name, pa.string()) for name in STRING_COLUMNS])
        options = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer")
        table = pa_json.read_json(handle, parse_options=options)
        present = [name for name in table.column_names if table.column(name).null_count < len(table)]
        return table.select([n for n in table.column_names if n in present or n in REQUIRED_COLUMNS])


def _iter_batches(manifest: Manifest, batch_rows: int) -> Iterator[pa.RecordBatch]:
    fs, path = fsspec.core.url_to_fs(manifest.uri, **(manifest.storage_options or {}))
    if manifest.format == "parquet":
        with fs.open(path, "rb") as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows)
    else:
        yield from _read_text_table(fs, path, manifest.format).to_batches(max_chunksize=batch_rows)


def open_manifest(uri: str, storage_options: dict | None = None) -> Manifest:
    """Open a manifest and check what makes it usable as a whole; rows are checked one by one later."""
    fmt = _format_of(uri)
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if not fs.exists(path):
            raise ManifestError(f"{uri}: manifest not found")
        if fmt == "parquet":
            with fs.open(path, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
                columns, num_rows = tuple(meta.schema.to_arrow_schema().names), meta.num_rows
        else:
            table = _read_text_table(fs, path, fmt)
            columns, num_rows = tuple(table.column_names), table.num_rows
    except ManifestError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise ManifestError(f"{uri}: cannot read manifest ({exc.__class__.__name__}: {exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"{uri}: missing required column(s) {', '.join(missing)}")
    return Manifest(uri=uri, format=fmt, columns=columns, num_rows=num_rows, storage_options=storage_options)
