"""What a run learns from an output folder's records in one scan, a few uint64 per record: where each id's
record lives (``RecordIndex``), which rows are done (``done_hashes`` against ``listing_hashes``), and the
passthrough values of the ``ok`` records (``passthrough_hashes``, canonical so that a value read back from the
records hashes as the manifest's: ``metadata_schema.value_text``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ipaflow.core.hashing import hash_combine, hash_joined, hash_strings, members
from ipaflow.core.storage import Storage, join
from ipaflow.specs.outputs import TOP_FOLDERS, output_names
from ipaflow.tasks.metadata_schema import is_json_text, value_text


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


def done_hashes(table: pa.Table, out: str, present: Callable[[pa.Array], np.ndarray]) -> np.ndarray:
    """``hash(id, key, layout)`` of the ok records of ``table`` whose outputs are all ``present`` (a vectorised
    test over output names relative to ``out``, container members stripped: ``specs.outputs.output_name``, so
    a folder moved since its records were written is still done)."""
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False)
    if not ok.any():
        return np.zeros(0, np.uint64)
    table = table.filter(pa.array(ok))
    outputs = table.column("outputs").combine_chunks()
    flat = pc.list_flatten(outputs)
    parents = pc.list_parent_indices(outputs).to_numpy(zero_copy_only=False)
    relative = pc.replace_substring_regex(flat, "#.*$", "")
    names = output_names(relative)  # also of the absolute URIs older records hold
    named = pc.is_valid(names).to_numpy(zero_copy_only=False)
    missing = ~(present(pc.fill_null(names, "")) & named)
    absent = np.zeros(table.num_rows, dtype=bool)
    np.logical_or.at(absent, parents, missing)
    empty = pc.fill_null(pc.list_value_length(outputs), 0).to_numpy(zero_copy_only=False) == 0
    good = ~absent & ~empty
    layout = pc.fill_null(table.column("layout"), "files") if "layout" in table.column_names else \
        pa.array(["files"] * table.num_rows)
    return hash_joined(table.column("id"), table.column("key"), layout)[good]


OUTPUT_FOLDERS = TOP_FOLDERS  # every layout's top folders (specs.outputs)
FOLDER_METADATA = "metadata.parquet"  # the dataset card's file for the image/video folder builder (tasks.card)


def iter_listing(storage: Storage, out: str, folders: Iterable[str] = OUTPUT_FOLDERS,
                 batch: int = 65536) -> Iterator[list[str]]:
    """The paths (relative to ``out``) of every output file under ``folders``, in batches (staging files and the
    dataset card's ``FOLDER_METADATA`` left out): streamed from one walk per folder on local disk, one listing
    per folder elsewhere."""
    import os

    for folder in folders:
        root = join(out, folder)
        fs, path = storage.fs(root)
        if type(fs).__name__ == "LocalFileSystem":
            if not os.path.isdir(path):
                continue
            found: list[str] = []
            pending = [(path, folder)]  # scandir, not os.walk: a folder of a million files is never one list
            while pending:
                directory, relative = pending.pop()
                with os.scandir(directory) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append((entry.path, f"{relative}/{entry.name}"))
                        elif not entry.name.endswith(".partial") and (relative != folder or
                                                                      entry.name != FOLDER_METADATA):
                            found.append(f"{relative}/{entry.name}")
                            if len(found) >= batch:
                                yield found
                                found = []
            if found:
                yield found
        else:
            names = [name for name in storage.list_files(root)
                     if not name.endswith(".partial") and name != FOLDER_METADATA]
            for start in range(0, len(names), batch):
                yield [f"{folder}/{n}" for n in names[start:start + batch]]


def listing_hashes(storage: Storage, out: str, folders: Iterable[str] = OUTPUT_FOLDERS) -> np.ndarray:
    """Sorted hashes of the paths (relative to ``out``) of every file under ``folders`` (``iter_listing``): a
    million outputs cost 8 MB here."""
    chunks = [hash_strings(batch) for batch in iter_listing(storage, out, folders)]
    return np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, np.uint64)
