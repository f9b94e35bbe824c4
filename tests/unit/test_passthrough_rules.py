"""Passthrough columns in the metadata: reserved names renamed, types kept (mixed ones as JSON text once),
values hashed canonically (a value read back from the records hashes as the manifest's), updates folded into
records without touching their outputs."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ipaflow.core.storage import Storage
from ipaflow.specs.manifest import KNOWN_COLUMNS, ManifestError
from ipaflow.specs.rows import passthrough_of
from ipaflow.tasks.metadata import UPDATES_DIR, MetadataStore
from ipaflow.tasks.metadata_scans import passthrough_hashes, row_passthrough_hashes
from ipaflow.tasks.metadata_schema import CORE_COLUMNS, is_json_text, make_record, passthrough_names, renamed_columns


def _record(row_id, run="r1", **extra):
    return make_record(job_id=row_id, spec="s", status="ok", run_id=run, key=f"k-{row_id}", outputs=[f"/o/{row_id}.png"],
                       extra=extra)


def _read(out) -> pd.DataFrame:
    return pd.read_parquet(out / "metadata").set_index("id")


def test_every_record_field_is_renamed_and_a_clash_with_the_new_name_is_a_manifest_error():
    reserved = CORE_COLUMNS - KNOWN_COLUMNS  # status, error, outputs, key, run_id, finished_at, elapsed_s, ...
    assert {"status", "error", "outputs", "key", "run_id", "finished_at", "elapsed_s", "params", "layout"} <= reserved
    names = passthrough_names(("id", "spec", "prompt", "seed", "note", *sorted(reserved)))
    assert names["note"] == "note" and not {"prompt", "id", "seed"} & set(names)
    assert {names[c] for c in reserved} == {f"manifest_{c}" for c in reserved}
    assert len(renamed_columns(names)) == len(reserved)
    assert "column status is a metadata record field: its values are kept as manifest_status" in renamed_columns(names)
    with pytest.raises(ManifestError, match="column status .* manifest has a column manifest_status too"):
        passthrough_names(("id", "spec", "status", "manifest_status"))
    record = make_record(job_id="a", spec="s", status="ok", run_id="r", extra={"status": "draft", "layout": "x"})
    assert (record["status"], record["manifest_status"], record["manifest_layout"], record["layout"]) == \
        ("ok", "draft", "x", None)


@pytest.mark.parametrize("values, kind", [
    ([1, 2, None], pa.int64()),
    ([1, 2.5], pa.float64()),
    (["a", None], pa.string()),
    ([True, False], pa.bool_()),
    ([[1, 2], [], None], pa.list_(pa.int64())),
    ([["a"], ["b", "c"]], pa.list_(pa.string())),
])
def test_a_column_keeps_its_type_where_every_value_fits(tmp_path, values, kind):
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "x", [_record(f"a{i}", v=value) for i, value in enumerate(values)])
    store.fold("r1")
    schema = pq.read_schema(tmp_path / "metadata" / "00-schema.parquet")
    assert schema.field("v").type == kind and not is_json_text(schema.field("v"))
    frame = _read(tmp_path)
    read = [frame.loc[f"a{i}", "v"] for i in range(len(values))]
    for got, want in zip(read, values):
        if want is None:
            assert got is None or (np.isscalar(got) and pd.isna(got))
        elif isinstance(want, list):
            assert list(got) == want
        else:
            assert got == want


def test_mixed_values_are_json_text_once_and_read_back_with_json_loads(tmp_path):
    values = [1, "two", {"k": [1, 2]}, [1, "x"], None, "{\"looks\": \"like json\"}", True]
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "x", [_record(f"a{i}", v=value) for i, value in enumerate(values)])
    store.fold("r1")
    frame = _read(tmp_path)
    field = pq.read_schema(tmp_path / "metadata" / "00-schema.parquet").field("v")
    assert is_json_text(field)
    decoded = [None if pd.isna(frame.loc[f"a{i}", "v"]) else json.loads(frame.loc[f"a{i}", "v"]) for i in range(len(values))]
    assert decoded == values


def test_a_column_that_turns_mixed_in_a_later_run_is_encoded_once_in_every_part(tmp_path):
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "x", [_record("a", v="plain"), _record("b", v={"k": 1})])  # mixed within the first run
    store.fold("r1")
    store.journal("r2", "x", [_record("c", run="r2", v="text")])
    store.fold("r2")
    store.journal("r3", "x", [_record("d", run="r3", v=[1, 2])])
    store.fold("r3")
    frame = _read(tmp_path)
    assert {i: json.loads(frame.loc[i, "v"]) for i in "abcd"} == {"a": "plain", "b": {"k": 1}, "c": "text", "d": [1, 2]}
    # a plain column that meets another type later: the old parts are rewritten as JSON text too
    store.journal("r4", "x", [_record("e", run="r4", w="x")])
    store.fold("r4")
    store.journal("r5", "x", [_record("f", run="r5", w=5)])
    store.fold("r5")
    frame = _read(tmp_path)
    assert (json.loads(frame.loc["e", "w"]), json.loads(frame.loc["f", "w"])) == ("x", 5)


def test_manifest_cells_hash_equal_to_the_same_values_read_back_from_the_records(tmp_path):
    rows = [
        {"note": "n", "n": 1, "f": 2.5, "flag": True, "tags": ["a", "b"], "mixed": 1, "meta": {"b": 1, "a": [1.0]}},
        {"note": None, "n": 2, "f": 3.0, "flag": False, "tags": [], "mixed": "one", "meta": {}},
        {"note": "ü\x00", "n": None, "f": None, "flag": None, "tags": None, "mixed": [1, 2], "meta": None},
    ]
    ids = ["a", "b", "c"]
    storable = [passthrough_of(row) for row in rows]
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "x", [_record(i, **row) for i, row in zip(ids, storable)])
    store.fold("r1")
    names = sorted(rows[0]) + ["absent"]  # a manifest column no record has: null on both sides
    table = pq.read_table(tmp_path / "metadata").sort_by("id")
    assert table.column("f").type == pa.float64() and is_json_text(table.schema.field("mixed"))
    from_records = passthrough_hashes(table, names)
    from_manifest = row_passthrough_hashes(ids, storable, names)
    assert list(from_records) == list(from_manifest)
    # and any edit is seen, of any column, including 1 -> "1" and a null
    for column, value in [("note", "N"), ("n", "1"), ("f", 2.6), ("flag", 1), ("tags", ["b", "a"]), ("mixed", "1"),
                          ("meta", {"b": 1, "a": [1.5]}), ("absent", 0), ("n", None)]:
        edited = [dict(storable[0], **{column: value})] + storable[1:]
        assert row_passthrough_hashes(ids, edited, names)[0] != from_records[0], column
    assert row_passthrough_hashes(["z"], storable[:1], names)[0] != from_records[0]  # the id is part of it


def test_an_update_gives_a_record_new_passthrough_values_and_keeps_its_outputs(tmp_path, monkeypatch):
    import ipaflow.tasks.metadata_fold as metadata_fold

    monkeypatch.setattr(metadata_fold, "PART_ROWS", 4)
    monkeypatch.setattr(metadata_fold, "SMALL_PART_ROWS", 1)
    monkeypatch.setattr(metadata_fold, "UPDATE_CHUNK", 3)  # several chunks, each reading only its parts
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "x", [_record(f"a{i:02d}", note=f"n{i}", old=i) for i in range(10)])
    store.fold("r1")
    before = _read(tmp_path)
    time.sleep(0.01)
    updates = [{"id": f"a{i:02d}", "note": f"new{i}", "added": i * 10} for i in (1, 2, 5, 9)]
    updates.append({"id": "nobody", "note": "x", "added": 0})  # no record: nothing to update
    store.journal_updates("r2", "updates-0", updates[:2], ["note", "added"])
    store.journal_updates("r2", "updates-1", updates[2:], ["note", "added"])
    store.journal("r2", "shard", [_record("a09", run="r2", note="rendered")])  # a newer render wins over an update
    result = store.fold("r2")
    assert result.updated == 3 and not list((tmp_path / UPDATES_DIR).rglob("*.parquet"))
    after = _read(tmp_path)
    assert sorted(after.index) == sorted(before.index)
    for i in (1, 2, 5):
        row, old = after.loc[f"a{i:02d}"], before.loc[f"a{i:02d}"]
        assert (row["note"], row["added"], row["status"], row["key"], list(row["outputs"]), row["run_id"]) == \
            (f"new{i}", i * 10, "ok", old["key"], list(old["outputs"]), "r1")
        assert pd.isna(row["old"])  # the record holds the manifest's current columns, as a render would write
        assert row["finished_at"] > old["finished_at"]
    assert after.loc["a09", "note"] == "rendered" and after.loc["a03", "note"] == "n3" and after.loc["a03", "old"] == 3
    names = ["added", "note"]
    table = pq.read_table(tmp_path / "metadata")
    hashes = dict(zip(table.column("id").to_pylist(), passthrough_hashes(table, names)))
    assert hashes["a05"] == row_passthrough_hashes(["a05"], [updates[2]], names)[0]


def test_an_update_keeps_a_column_only_its_row_holds(tmp_path):
    """A JSON Lines column first seen after the manifest's head is not among the manifest's columns, but the
    rows holding it carry it in their updates."""
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "x", [_record("a", note="old", late="kept")])
    store.fold("r1")
    store.journal_updates("r2", "u", [{"id": "a", "note": "new", "late": "kept"}], ["note"])
    assert store.fold("r2").updated == 1
    assert tuple(_read(tmp_path).loc["a", ["note", "late"]]) == ("new", "kept")
