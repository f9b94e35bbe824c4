"""The metadata records' schema: the core fields of a record, passthrough columns (renamed where they clash
with a field, typed where every value fits one Arrow type, else JSON text encoded once), and how parts whose
passthrough types differ are widened to one schema (``widen``, ``conform``). Records are stored as zstd
Parquet (``to_parquet_bytes``)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ipaflow.core.redaction import Redactor, redact_url
from ipaflow.specs.outputs import output_name

METADATA_DIR = "metadata"
SCHEMA_FILE = "metadata/00-schema.parquet"  # sorts before every part: readers take its (union) schema
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
        ("manifest", pa.string()),  # the manifest file the row came from (absolute; a URI as given, redacted)
        ("ip_similarity", pa.float64()),  # the row's weakest score (tasks.scores); null when not scored
        ("ip_similarities", pa.list_(pa.list_(pa.float64()))),  # per output, per adapter
    ]
)
CORE_COLUMNS = frozenset(CORE_SCHEMA.names)
RENAMED_PREFIX = "manifest_"  # a passthrough column named like a record field is kept as manifest_<name>
JSON_TEXT = {b"ipaflow": b"json"}  # field metadata: a passthrough column whose values mix types, as JSON text


def weakest(similarities: list[list[float]] | None) -> float | None:
    """A row's ``ip_similarity``: the weakest of its scores over outputs and adapters (None when unscored), so
    that ``ip_similarity < x`` finds every row with a weak output."""
    values = [v for output in similarities or [] for v in output]
    return min(values) if values else None


def output_fields(similarities: list[list[float]] | None, outputs: int) -> list[dict]:
    """What each output carries about its own score (in its embedded parameters and its sample's JSON):
    ``ip_similarities`` per adapter and ``ip_similarity``, their weakest; nothing when unscored."""
    if similarities is None or len(similarities) != outputs:
        return [{} for _ in range(outputs)]
    return [{"ip_similarity": weakest([values]), "ip_similarities": values} for values in similarities]


def record_similarities(per_output: Sequence[dict]) -> list[list[float]] | None:
    """A row's per-output, per-adapter scores from what its outputs carry (``output_fields``), or None unless
    every output carries them."""
    found = [fields.get("ip_similarities") for fields in per_output]
    if not found or any(not isinstance(values, list) for values in found):
        return None
    return found


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
    manifest: str | None = None,
    ip_similarities: list[list[float]] | None = None,
) -> dict[str, Any]:
    """One metadata record; ``error`` goes through ``redact`` (the storage's redactor; by default one that
    knows the environment's credentials only), output URIs lose the credentials a URI may carry and otherwise
    stay usable; an output under a layout's top folder is kept by its name relative to ``--out``
    (``specs.outputs.output_name``: ``images/a.png``), so the folder can move. ``ip_similarities``: per output,
    per adapter (``tasks.scores``); ``ip_similarity`` is their weakest."""
    redact = redact or Redactor().redact
    record = {
        "id": job_id,
        "spec": spec,
        "status": status,
        "error": redact(error) if error else None,
        "outputs": [output_name(uri) or redact_url(uri) for uri in outputs or []],  # names, else usable URIs
        "seed": seed,
        "params": json.dumps(params, sort_keys=True, ensure_ascii=False) if params is not None else None,
        "key": key,
        "elapsed_s": round(float(elapsed_s), 4),
        "batch_size": batch_size,
        "finished_at": now(),
        "run_id": run_id,
        "layout": layout,
        "manifest": redact(manifest) if manifest else None,
        "ip_similarity": weakest(ip_similarities),
        "ip_similarities": ip_similarities,
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


def records_table(records: list[dict]) -> pa.Table:
    """Records to a table: core columns typed, passthrough columns by ``passthrough_column``."""
    extra = sorted({name for record in records for name in record} - CORE_COLUMNS)
    arrays = [pa.array([r.get(f.name) for r in records], type=f.type) for f in CORE_SCHEMA]
    fields = list(CORE_SCHEMA)
    for name in extra:
        item, array = passthrough_column(name, [r.get(name) for r in records])
        arrays.append(array)
        fields.append(item)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def updates_table(rows: list[dict], names: Iterable[str]) -> pa.Table:
    """Updates to a table: ``id`` and every passthrough column of the manifest (record names), nulls included,
    and any other a row holds (a JSON Lines column first seen after the manifest's head)."""
    fields, arrays = [pa.field("id", pa.string())], [pa.array([r["id"] for r in rows], type=pa.string())]
    for name in sorted(set(names).union(*rows) - {"id"}):
        item, array = passthrough_column(name, [r.get(name) for r in rows])
        fields.append(item)
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


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


def to_parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def from_parquet_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A part's table, decoding only ``columns`` where given (those it holds)."""
    source = pq.ParquetFile(io.BytesIO(data))
    if not columns:
        return source.read()
    present = set(source.schema_arrow.names)
    return source.read(columns=[c for c in columns if c in present])


def _nested(kind: pa.DataType) -> bool:
    return pa.types.is_nested(kind) or pa.types.is_dictionary(kind)


def needs_recoding(item: pa.Field, target: pa.Field) -> bool:
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


def canonical_schema(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """The one schema of parts with these schemas: the core fields, then every passthrough column, widened."""
    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for item in schema:
            if item.name not in CORE_COLUMNS:
                fields[item.name] = widen(fields.get(item.name), item)
    return pa.schema(list(CORE_SCHEMA) + [pa.field(n, pa.string()) if pa.types.is_null(f.type) else f
                                          for n, f in sorted(fields.items())])
