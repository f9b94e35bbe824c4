"""The metadata store: journals fold into exactly one record per id (the latest wins), compaction removes what
it folded, a damaged file is skipped with a warning, passthrough columns keep what they can."""

from __future__ import annotations

import logging
import time

import pandas as pd

from ipaflow.core.storage import Storage
from ipaflow.tasks.metadata import JOURNAL_DIR, MetadataStore, make_record


def _record(row_id, status="ok", run="r1", **fields):
    return make_record(job_id=row_id, spec="s", status=status, run_id=run, key=f"k-{row_id}-{run}", **fields)


def test_the_latest_record_of_an_id_wins_across_journals_and_compactions(tmp_path):
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "shard-0", [_record("a"), _record("b", status="failed", error="ip_image: not found")])
    store.compact()
    time.sleep(0.01)
    store.journal("r2", "shard-0", [_record("b", run="r2")])
    store.journal("r2", "shard-1", [_record("c", run="r2")])
    loaded = store.load()  # the compacted file plus the journal not yet folded in
    assert sorted(loaded) == ["a", "b", "c"]
    assert (loaded["b"]["status"], loaded["b"]["run_id"], loaded["b"]["error"]) == ("ok", "r2", None)

    assert store.compact() == 2
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
    store.compact()
    frame = pd.read_parquet(tmp_path / "metadata").set_index("id")
    assert list(frame["note"]) == ["n1", "n2"]
    assert frame.loc["a", "status"] == "ok"  # a passthrough column never overwrites a core one
