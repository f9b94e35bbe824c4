"""The metadata store: journals fold into exactly one record per id (the latest wins), compaction removes what
it folded, a damaged file is skipped with a warning, passthrough columns keep what they can."""

from __future__ import annotations

import json
import logging
import time

import pandas as pd

from ipaflow.core.storage import Storage
from ipaflow.tasks.metadata import JOURNAL_DIR, MetadataStore
from ipaflow.tasks.metadata_schema import make_record


def _record(row_id, status="ok", run="r1", **fields):
    return make_record(job_id=row_id, spec="s", status=status, run_id=run, key=f"k-{row_id}-{run}", **fields)


def test_the_latest_record_of_an_id_wins_across_journals_and_compactions(tmp_path):
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "shard-0", [_record("a"), _record("b", status="failed", error="ip_image: not found")])
    store.fold()
    time.sleep(0.01)
    store.journal("r2", "shard-0", [_record("b", run="r2")])
    store.journal("r2", "shard-1", [_record("c", run="r2")])
    loaded = store.load()  # the compacted file plus the journal not yet folded in
    assert sorted(loaded) == ["a", "b", "c"]
    assert (loaded["b"]["status"], loaded["b"]["run_id"], loaded["b"]["error"]) == ("ok", "r2", None)

    assert store.fold().files == 2
    assert not list((tmp_path / JOURNAL_DIR).rglob("*.parquet"))
    frame = pd.read_parquet(tmp_path / "metadata")
    assert sorted(frame["id"]) == ["a", "b", "c"] and frame.set_index("id").loc["b", "run_id"] == "r2"


def test_an_older_record_never_replaces_a_newer_one(tmp_path):
    store = MetadataStore(Storage(), str(tmp_path))
    newer = _record("a", run="new")
    time.sleep(0.01)
    older = {**_record("a", run="old"), "finished_at": newer["finished_at"] - pd.Timedelta(seconds=5)}
    store.journal("new", "x", [newer])
    store.journal("old", "y", [older])
    assert store.load()["a"]["run_id"] == "new"


def test_a_damaged_journal_file_is_skipped_with_a_warning(tmp_path, caplog):
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "good", [_record("a")])
    damaged = tmp_path / JOURNAL_DIR / "r1" / "damaged.parquet"
    damaged.write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING):
        assert sorted(store.load()) == ["a"]
    assert "skipping unreadable metadata file" in caplog.text


def test_passthrough_columns_keep_their_values(tmp_path):
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "x", [_record("a", extra={"note": "n1", "status": "not mine"}),
                              _record("b", extra={"note": "n2"})])
    store.fold()
    frame = pd.read_parquet(tmp_path / "metadata").set_index("id")
    assert list(frame["note"]) == ["n1", "n2"]
    assert frame.loc["a", "status"] == "ok"  # a passthrough column never overwrites a core one
    assert frame.loc["a", "manifest_status"] == "not mine" and pd.isna(frame.loc["b", "manifest_status"])


def _parts(tmp_path):
    return {p.name: p.read_bytes() for p in (tmp_path / "metadata").glob("part-*.parquet")}


def test_new_ids_append_and_only_parts_holding_superseded_records_are_rewritten(tmp_path, monkeypatch):
    import ipaflow.tasks.metadata_fold as metadata_fold

    monkeypatch.setattr(metadata_fold, "PART_ROWS", 4)
    monkeypatch.setattr(metadata_fold, "SMALL_PART_ROWS", 1)
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "x", [_record(f"a{i:02d}") for i in range(10)])
    assert store.fold("r1").parts_written == 3
    first = _parts(tmp_path)

    store.journal("r2", "x", [_record(f"a{i:02d}", run="r2") for i in range(10, 14)])  # new ids: a pure append
    appended = store.fold("r2")
    assert (appended.parts_written, appended.parts_rewritten, appended.superseded) == (1, 0, 0)
    assert {k: v for k, v in _parts(tmp_path).items() if k in first} == first

    time.sleep(0.01)
    store.journal("r3", "x", [_record("a05", run="r3")])  # one id re-rendered: its part alone is rewritten
    touched = store.fold("r3")
    assert (touched.parts_written, touched.parts_rewritten, touched.superseded) == (1, 1, 1)
    changed = {k for k, v in _parts(tmp_path).items() if k in first and v != first[k]}
    assert len(changed) == 1
    frame = pd.read_parquet(tmp_path / "metadata")
    assert sorted(frame["id"]) == [f"a{i:02d}" for i in range(14)]  # a plain read: one row per id
    assert frame.set_index("id").loc["a05", "run_id"] == "r3"
    assert not list((tmp_path / JOURNAL_DIR).rglob("*.parquet"))


def test_a_fold_cut_short_is_read_right_and_repaired(tmp_path, monkeypatch):
    """Killed between writing the new part and rewriting the old one: the id is in two parts for a moment;
    readers through the store take the newer record, and the next run's scan repairs the folder."""
    import shutil

    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "x", [_record("a"), _record("b")])
    store.fold("r1")
    old = next((tmp_path / "metadata").glob("part-*.parquet"))
    saved = tmp_path / "saved.parquet"
    shutil.copy(old, saved)
    time.sleep(0.01)
    store.journal("r2", "x", [_record("a", run="r2")])
    store.fold("r2")
    shutil.copy(saved, old)  # as if the fold had died before rewriting the old part
    assert len(pd.read_parquet(tmp_path / "metadata")) == 3
    assert store.load()["a"]["run_id"] == "r2"
    assert store.repair(store.index()) == 1
    frame = pd.read_parquet(tmp_path / "metadata").set_index("id")
    assert sorted(frame.index) == ["a", "b"] and frame.loc["a", "run_id"] == "r2"


def test_parts_with_different_passthrough_columns_read_as_one_dataset(tmp_path):
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "x", [_record("a", extra={"note": 1, "tags": ["x", "y"]})])
    store.fold("r1")
    store.journal("r2", "x", [_record("b", run="r2", extra={"note": "two", "tags": "plain"})])
    store.fold("r2")
    store.journal("r3", "x", [_record("c", run="r3", extra={"score": 0.5})])
    store.fold("r3")
    frame = pd.read_parquet(tmp_path / "metadata").set_index("id")  # the schema file unites the parts
    assert sorted(frame.index) == ["a", "b", "c"]
    # columns whose values mix types across parts: every value JSON text, once
    assert (frame.loc["a", "note"], frame.loc["b", "note"], frame.loc["c", "score"]) == ("1", '"two"', 0.5)
    assert frame.loc["a", "tags"] == '["x", "y"]' and frame.loc["b", "tags"] == '"plain"'
    assert [json.loads(frame.loc[i, "tags"]) for i in "ab"] == [["x", "y"], "plain"]
