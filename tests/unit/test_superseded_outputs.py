"""The folder equals the records: when a record supersedes another, the outputs only the old one named are
removed by the fold (after the new record is journaled), never one the new record names, never one outside
--out; a run killed between journaling and folding leaves them for the next fold."""

from __future__ import annotations

import time

from ipaflow.core.storage import Storage
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.metadata_schema import make_record


def _store(tmp_path):
    return MetadataStore(Storage(), str(tmp_path / "out"))


def _render(store, run, row_id, paths):
    """A row rendered: its outputs written, then its record journaled (as a shard does)."""
    uris = []
    for path in paths:
        target = f"{store.out}/{path}"
        Storage().write_atomic(target.split("#")[0], b"x")
        uris.append(target)
    store.journal(run, row_id, [make_record(job_id=row_id, spec="s", status="ok", run_id=run, outputs=uris)])
    time.sleep(0.01)


def _listing(tmp_path):
    root = tmp_path / "out" / "images"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_fewer_images_and_another_format_leave_exactly_the_current_outputs(tmp_path):
    store = _store(tmp_path)
    _render(store, "r1", "a", ["images/a-0.png", "images/a-1.png", "images/a-2.png"])
    _render(store, "r1", "b", ["images/b.png"])
    store.fold("r1")
    _render(store, "r2", "a", ["images/a.png"])  # num_images: 3 -> 1
    _render(store, "r2", "b", ["images/b.jpg"])  # png -> jpeg
    assert store.fold("r2").outputs_removed == 4
    assert _listing(tmp_path) == ["a.png", "b.jpg"]


def test_an_output_the_new_record_names_again_is_kept(tmp_path):
    store = _store(tmp_path)
    _render(store, "r1", "a", ["images/a-0.png", "images/a-1.png"])
    store.fold("r1")
    _render(store, "r2", "a", ["images/a-0.png"])  # a list of one that still says a-0 (an older naming)
    store.fold("r2")
    assert _listing(tmp_path) == ["a-0.png"]


def test_a_layout_change_removes_the_files_of_the_old_layout(tmp_path):
    store = _store(tmp_path)
    _render(store, "r1", "a", ["images/0a/a.png"])  # sharded
    store.fold("r1")
    _render(store, "r2", "a", ["webdataset/r2-0.tar#a.png"])
    dropped = []
    store.fold("r2", drop_outputs=dropped.extend)
    assert _listing(tmp_path) == [] and dropped == []
    _render(store, "r3", "a", ["images/a.png"])  # and back: the old sample leaves its container
    store.fold("r3", drop_outputs=dropped.extend)
    assert _listing(tmp_path) == ["a.png"] and dropped == [f"{store.out}/webdataset/r2-0.tar#a.png"]


def test_a_run_killed_before_its_fold_leaves_the_removal_to_the_next_fold(tmp_path):
    store = _store(tmp_path)
    _render(store, "r1", "a", ["images/a-0.png", "images/a-1.png"])
    store.fold("r1")
    _render(store, "r2", "a", ["images/a.png"])  # killed here: journaled, not folded
    assert _listing(tmp_path) == ["a-0.png", "a-1.png", "a.png"]
    assert store.load()["a"]["outputs"] == [f"{store.out}/images/a.png"]
    store.fold("r3-recovered")
    assert _listing(tmp_path) == ["a.png"]


def test_an_output_outside_out_is_never_removed(tmp_path):
    store = _store(tmp_path)
    outside = tmp_path / "precious.png"
    outside.write_bytes(b"keep")
    store.journal("r1", "x", [make_record(job_id="a", spec="s", status="ok", run_id="r1",
                                          outputs=[f"{store.out}/../precious.png", str(outside)])])
    store.fold("r1")
    time.sleep(0.01)
    _render(store, "r2", "a", ["images/a.png"])
    store.fold("r2")
    assert outside.read_bytes() == b"keep"
