"""Reading manifests: Parquet (or CSV / JSON Lines) through fsspec, streamed as batches of rows.

Nothing here reads a whole manifest at once: Parquet is read a record batch at a time (``iter_batches``), CSV
with Arrow's streaming reader, JSON Lines line by line. Cells are handed on as they are; judging them is row
validation's job (``specs.rows``, ``specs.checks``), so that one bad cell fails its row, never the manifest.
Hence CSV keeps the text ``nan`` (a NaN, reported) apart from an empty cell (missing), and JSON Lines are parsed
in Python, where a column may hold a number in one row and a string in the next (Arrow's JSON reader rejects
the whole file for that).
"""

from __future__ import annotations

import csv
import json
import posixpath
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ipaflow.core.storage import Storage
from ipaflow.specs.manifest_files import FORMATS, ManifestError, ManifestFile, check_pass, list_files, open_file

__all__ = ["FORMATS", "ManifestError", "ManifestFile", "Manifest", "RowBatch", "column_of", "open_manifest"]

# Columns with a meaning (README, "Manifest reference"); every other column passes through to the metadata.
STRING_COLUMNS = ("id", "spec", "prompt", "negative_prompt", "image", "mask", "control_image", "style_folder")
LIST_COLUMNS = ("ip_image", "ip_mask", "ip_scale")
INT_COLUMNS = ("seed", "num_inference_steps", "width", "height", "num_frames", "num_images")
FLOAT_COLUMNS = ("guidance_scale", "strength", "controlnet_conditioning_scale")
INPUT_COLUMNS = ("image", "mask", "control_image", "ip_image", "style_folder", "ip_mask")
KNOWN_COLUMNS = frozenset(STRING_COLUMNS + LIST_COLUMNS + INT_COLUMNS + FLOAT_COLUMNS)
REQUIRED_COLUMNS = ("id", "spec")
# Empty CSV cells and the usual spellings of "missing"; not "nan", which a user typed as a number.
CSV_NULLS = ["", "NA", "N/A", "n/a", "NULL", "null"]
BATCH_ROWS = 32_768  # rows per batch: large enough for the vectorised checks, small enough to stream


class Undecodable:
    """A text cell whose bytes are not UTF-8 (a CSV saved as Latin-1, a Parquet binary column): its row fails
    with the column named (``specs.rows``), the other rows go on. Never turned into text with replacement
    characters, which would render a prompt the user did not write."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def reason(self) -> str:
        try:
            self.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return (f"not UTF-8 text (byte 0x{self.data[exc.start]:02x} at position {exc.start}); "
                    "save the manifest as UTF-8")
        return "not UTF-8 text"

    def __str__(self) -> str:  # what a failed row's record keeps of it: the bytes that are not UTF-8 escaped
        return self.data.decode("utf-8", "backslashreplace")

    def __repr__(self) -> str:
        return f"Undecodable({self.data[:40]!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Undecodable) and other.data == self.data

    def __hash__(self) -> int:
        return hash(self.data)


@dataclass
class RowBatch:
    """Consecutive manifest rows: ``start`` is the 0-based manifest index of the first. ``columns`` holds each
    column as an Arrow array (typed, for the vectorised checks) or, where a JSON Lines column mixes types, as a
    plain list; ``rows()`` gives the plain Python rows the exact checks of ``specs.rows`` take."""

    start: int
    num_rows: int
    columns: dict[str, pa.Array | list]
    base: str = ""  # the folder relative input paths of these rows resolve against (their file's)
    _rows: list[dict] | None = None

    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            lists = {name: self.values(name) for name in self.columns}
            self._rows = [{name: lists[name][i] for name in lists} for i in range(self.num_rows)]
        return self._rows

    def values(self, name: str) -> list:
        """A column as plain Python values (None where missing; binary cells as text)."""
        column = self.columns.get(name)
        if column is None:
            return [None] * self.num_rows
        if isinstance(column, list):
            return column
        values = column.to_pylist()
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            values = [_plain(v) for v in values]
        return values

    def slice(self, offset: int, length: int) -> RowBatch:
        """Rows ``offset`` .. ``offset + length`` of the batch (Arrow columns are not copied)."""
        length = max(0, min(length, self.num_rows - offset))
        columns = {name: (c[offset:offset + length] if isinstance(c, list) else c.slice(offset, length))
                   for name, c in self.columns.items()}
        return RowBatch(start=self.start + offset, num_rows=length, columns=columns, base=self.base)

    def row(self, offset: int) -> dict[str, Any]:
        if self._rows is not None:
            return self._rows[offset]
        return {name: (c[offset] if isinstance(c, list) else _plain(c[offset].as_py())) for name, c in self.columns.items()}


@dataclass(frozen=True)
class Manifest:
    """A manifest: one file, or a folder, prefix or glob of files read as one stream in path order
    (``specs.manifest_files``). ``columns`` is the union of the files' columns and their Hive columns; a column
    absent from a file is null there; a column some Parquet files hold as integers and others as floats is read
    as float everywhere (``floats``)."""

    uri: str
    format: str
    columns: tuple[str, ...]
    num_rows: int | None  # None until counted (CSV, JSON Lines: known after a pass)
    storage: Storage = field(default_factory=Storage, repr=False, compare=False)
    batch_rows: int = BATCH_ROWS
    files: tuple[ManifestFile, ...] = ()
    folder: bool = False  # a folder or glob: rows are named by file and row
    floats: frozenset[str] = frozenset()  # Parquet columns some files hold as int, others as float: read as float
    _starts: list = field(default_factory=list, repr=False, compare=False)  # each file's first manifest index
    # rows -> the rows they render (a spec's sweep: ``specs.sweeps``); None: each row as it is
    expand: Callable[[RowBatch, tuple | None, int], Iterator[RowBatch]] | None = field(default=None, repr=False,
                                                                                        compare=False)

    @property
    def base(self) -> str:
        """The folder that relative input paths of a one-file manifest are resolved against (a folder
        manifest's rows resolve against their own file's folder: ``RowBatch.base``)."""
        return posixpath.dirname(self.uri.rstrip("/"))

    def where(self, index: int) -> str | None:
        """Where a row of a folder manifest lies (``date=2026-12-01/part-0.parquet row 3``, 0-based row of its
        file), once a pass has reached it; None for a one-file manifest."""
        if not self.folder or not self._starts or index < self._starts[0]:
            return None
        position = bisect_right(self._starts, index) - 1
        if self.expand is not None:  # a swept row's id names its combination; its file names where it lies
            return self.files[position].name
        return f"{self.files[position].name} row {index - self._starts[position]}"

    def file_of(self, index: int) -> str:
        """The URI of the file a row lies in (the manifest's own for a one-file manifest), once a pass has
        reached it."""
        if not self.folder or not self._starts or index < self._starts[0]:
            return self.uri
        return self.files[bisect_right(self._starts, index) - 1].uri

    def iter_batches(self, batch_rows: int | None = None, columns: tuple[str, ...] | None = None) -> Iterator[RowBatch]:
        """The manifest as consecutive batches, file by file, read as they stream (never a whole file at once);
        ``columns`` limits what is read where the format allows (Parquet reads only those; absent ones are left
        out). A batch never spans two files."""
        batch_rows = batch_rows or self.batch_rows
        start = 0
        for number, file in enumerate(self.files):
            if number == len(self._starts):
                self._starts.append(start)
            for count, cols in self._file_batches(file, batch_rows, columns):
                batch = RowBatch(start=start, num_rows=count, columns=cols, base=file.base)
                for part in (batch,) if self.expand is None else self.expand(batch, columns, batch_rows):
                    part.start = start
                    yield part
                    start += part.num_rows

    def _file_batches(self, file: ManifestFile, batch_rows: int, columns: tuple[str, ...] | None):
        redact = self.storage.redact
        partition = dict(file.partition)
        try:
            with open_file(file, self.storage) as handle:  # the file as pinned (specs.manifest_files)
                wanted = columns
                if columns is not None and file.format == "parquet":
                    present = set(pq.ParquetFile(handle).schema_arrow.names)
                    wanted = tuple(c for c in columns if c in present)
                for count, cols in _iter_batches(handle, file.format, batch_rows, wanted, file.uri, redact):
                    for name, value in partition.items():
                        if columns is None or name in columns:
                            cols[name] = pa.array([value] * count, pa.string())
                    for name in self.floats.intersection(cols):
                        column = cols[name]
                        if isinstance(column, pa.Array) and pa.types.is_integer(column.type):
                            cols[name] = column.cast(pa.float64())
                    check_pass(handle)  # every batch handed on was read from the file as pinned
                    yield count, cols
        except ManifestError:
            raise
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise _unreadable(file.uri, exc, redact) from None


def _plain(value: Any) -> Any:
    """Binary cells as text (``Undecodable`` where they are not UTF-8); anything else as it is (a NaN too: row
    validation reports it)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return Undecodable(value)
    return value


def _unreadable(uri: str, exc: BaseException, redact) -> ManifestError:
    return ManifestError(f"{redact(uri)}: cannot read manifest ({exc.__class__.__name__}: {redact(exc)})")


HEADER_BYTES = 1 << 20  # a CSV header line longer than this is not a manifest's


def _csv_header(handle) -> list[str]:
    line = handle.readline(HEADER_BYTES)
    if len(line) >= HEADER_BYTES and not line.endswith(b"\n"):
        raise ValueError(f"the header line is longer than {HEADER_BYTES} bytes")
    return next(csv.reader([line.decode("utf-8-sig")]), [])


def _csv_reader(handle):
    """A streaming CSV reader where every column is bytes: Arrow infers types from the first block only, and
    checks UTF-8 for the whole file, so one bad cell further down would fail the whole file. Batches are
    decoded and typed one by one instead (``_typed``)."""
    header = _csv_header(handle)
    handle.seek(0)
    options = pa_csv.ConvertOptions(column_types={name: pa.binary() for name in header}, null_values=CSV_NULLS,
                                    strings_can_be_null=True)
    return pa_csv.open_csv(handle, read_options=pa_csv.ReadOptions(block_size=1 << 22), convert_options=options)


def _typed(column: pa.Array, name: str) -> pa.Array | list:
    """A CSV batch's column as text, or as numbers where every cell of the batch is one (as Arrow infers a
    whole file): ipaflow's text columns stay text (an id ``007`` keeps its zeros). A column holding bytes that
    are not UTF-8 goes as a plain list, those cells ``Undecodable``: only their rows fail."""
    try:
        column = pc.cast(column, pa.string())
    except pa.ArrowInvalid:
        return [_plain(value) for value in column.to_pylist()]
    if name in STRING_COLUMNS or column.null_count == len(column):
        return column
    for target in (pa.int64(), pa.float64()):
        try:
            return pc.cast(column, target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return column


def _iter_jsonl(handle, uri: str, redact) -> Iterator[dict[str, Any]]:
    """One dict per non-blank line. A line that is not a JSON object makes the file unreadable as a whole:
    which row it was meant to be (and its id) cannot be known."""
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_no_repeated_keys)  # bytes: a UTF-8 BOM is accepted
        except _RepeatedKey as exc:
            raise ManifestError(f"{redact(uri)}: line {number}: key {exc.args[0]!r} appears more than once") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ManifestError(f"{redact(uri)}: line {number} is not valid JSON ({exc.__class__.__name__})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{redact(uri)}: line {number} is not a JSON object")
        yield row


class _RepeatedKey(ValueError):
    pass


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a key repeats (``json`` would keep the last value without a word)."""
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        raise _RepeatedKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return row


def _jsonl_columns(rows: list[dict], wanted: tuple[str, ...] | None) -> dict[str, pa.Array | list]:
    """A JSON Lines batch by column: an Arrow array where the batch's values make one, else the plain list."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns: dict[str, pa.Array | list] = {}
    for name in names if wanted is None else [n for n in wanted if n in names]:
        columns[name] = column_of([row.get(name) for row in rows])
    return columns


def column_of(values: list) -> pa.Array | list:
    """Cells as a batch column: an Arrow array where the values make one unchanged, else the plain list."""
    try:
        array = pa.array(values)
    except (pa.ArrowException, OverflowError, ValueError, TypeError):
        return values
    return array if _same(array, values) else values


def _same(array: pa.Array, values: list) -> bool:
    """Whether Arrow kept every value as it was (NaN != NaN, so compare with it in mind); a column Arrow
    changed (1 and True, 1 and 1.0 made one type) goes as the plain list."""
    for kept, value in zip(array.to_pylist(), values):
        if type(kept) is not type(value):
            return False
        if kept != value and not (isinstance(value, float) and value != value and kept != kept):
            return False
    return True


def _iter_batches(handle, fmt: str, batch_rows: int, columns: tuple[str, ...] | None, uri: str,
                  redact) -> Iterator[tuple[int, dict[str, pa.Array | list]]]:
    if fmt == "parquet":
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=columns and list(columns)):
            yield batch.num_rows, dict(zip(batch.schema.names, batch.columns))
    elif fmt == "csv":
        reader = _csv_reader(handle)
        pending: list[pa.RecordBatch] = []
        for batch in reader:
            pending.append(batch)
            if sum(b.num_rows for b in pending) >= batch_rows:
                yield from _csv_batches(pending, columns, batch_rows)
                pending = []
        yield from _csv_batches(pending, columns, batch_rows)
    else:
        rows: list[dict] = []
        for row in _iter_jsonl(handle, uri, redact):
            rows.append(row)
            if len(rows) == batch_rows:
                yield len(rows), _jsonl_columns(rows, columns)
                rows = []
        if rows:
            yield len(rows), _jsonl_columns(rows, columns)


def _csv_batches(pending: list[pa.RecordBatch], columns, batch_rows: int):
    if not pending:
        return
    table = pa.Table.from_batches(pending)
    if columns is not None:
        table = table.select([c for c in columns if c in table.column_names])
    for batch in table.combine_chunks().to_batches(max_chunksize=batch_rows):
        yield batch.num_rows, {name: _typed(column, name) for name, column in zip(batch.schema.names, batch.columns)}


def open_manifest(uri: str, storage: Storage | None = None) -> Manifest:
    """Open a manifest (a file, or a folder, prefix or glob of files) and check what makes it usable as a whole,
    reading only each file's head (Parquet: the footer); rows are checked one by one later, as they stream."""
    storage = storage or Storage()
    redact = storage.redact
    try:
        files, folder = list_files(uri, storage)
        if not folder:
            storage.require_regular(uri)  # a FIFO or a device would block the read, or never end
        heads = [_head(file, storage) for file in files]
    except ManifestError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise _unreadable(uri, exc, redact) from None
    columns: dict[str, None] = {}
    for file, (names, _, _) in zip(files, heads):
        where = redact(file.uri) if not folder else f"{redact(uri)}: {redact(file.name)}"
        repeated = sorted({c for c in names if names.count(c) > 1})
        if repeated:
            raise ManifestError(f"{where}: column(s) {', '.join(map(repr, repeated))} appear more than once; "
                                "keep one of each")
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ManifestError(f"{where}: missing required column(s) {', '.join(missing)}")
        clash = [key for key, _ in file.partition if key in names]
        if clash:
            raise ManifestError(f"{where}: column {clash[0]!r} is both a column of the file and a folder name "
                                f"({clash[0]}=...); keep one")
        columns.update(dict.fromkeys(names))
        columns.update(dict.fromkeys(key for key, _ in file.partition))
    floats = _unified_types(uri, files, [types for _, types, _ in heads], redact)
    counts = [rows for _, _, rows in heads]
    num_rows = sum(counts) if None not in counts else None
    return Manifest(uri=uri, format=files[0].format if len({f.format for f in files}) == 1 else "mixed",
                    columns=tuple(columns), num_rows=num_rows, storage=storage, files=tuple(files), folder=folder,
                    floats=floats)


def _head(file: ManifestFile, storage: Storage) -> tuple[list[str], dict[str, pa.DataType], int | None]:
    """A file's columns, their Arrow types (Parquet only) and its row count (Parquet only)."""
    with open_file(file, storage) as handle:
        if file.format == "parquet":
            meta = pq.ParquetFile(handle).metadata
            schema = meta.schema.to_arrow_schema()
            return list(schema.names), dict(zip(schema.names, schema.types)), meta.num_rows
        if file.format == "csv":
            return _csv_header(handle), {}, None
        return list(_jsonl_head(handle, file.uri, storage.redact)), {}, None


def _kind(kind: pa.DataType) -> str | None:
    """A type as the rules across files see it: int and float are numbers of two kinds, text and bytes one."""
    if pa.types.is_null(kind):
        return None
    if pa.types.is_integer(kind):
        return "int"
    if pa.types.is_floating(kind):
        return "float"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
            or pa.types.is_large_binary(kind):
        return "text"
    return str(kind)


def _unified_types(uri: str, files: list[ManifestFile], types: list[dict], redact) -> frozenset[str]:
    """The columns to read as float (int in some files, float in others); any other disagreement between two
    Parquet files is refused, naming both and the column."""
    seen: dict[str, tuple[str, str]] = {}  # column -> (kind, the first file holding it so)
    floats = set()
    for file, kinds in zip(files, types):
        for name, kind in kinds.items():
            mine = _kind(kind)
            if mine is None:
                continue
            first = seen.setdefault(name, (mine, file.name))
            if first[0] == mine:
                continue
            if {first[0], mine} == {"int", "float"}:
                floats.add(name)
                continue
            raise ManifestError(f"{redact(uri)}: column {name!r} is {first[0]} in {redact(first[1])} but {mine} in "
                                f"{redact(file.name)}; make the files agree")
    return frozenset(floats)


def _jsonl_head(handle, uri: str, redact, lines: int = 1000) -> tuple[str, ...]:
    """The keys of the first rows of a JSON Lines file, in first-seen order (a later row may have keys of its
    own, and a row lacking ``id`` or ``spec`` fails alone)."""
    columns: dict[str, None] = {}
    for number, row in enumerate(_iter_jsonl(handle, uri, redact)):
        columns.update(dict.fromkeys(row))
        if number + 1 >= lines:
            break
    return tuple(columns)
