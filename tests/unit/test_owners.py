"""Ids compared without case and Unicode-normalised; outputs owned across runs by the current records of an
output folder (``tasks.owners``): a row may not take another id's output, the same id may re-render its own."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from ipaflow.core.hashing import hash_strings
from ipaflow.core.problems import RowFailed
from ipaflow.core.storage import Storage
from ipaflow.specs.checks import ids_ok
from ipaflow.specs.outputs import collision_key, collision_keys, output_stems, shard_folder
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import Job, check_id
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.metadata_schema import make_record
from ipaflow.tasks.owners import COLUMNS, OwnedOutputs, owned_stem_hashes

REGISTRY = SpecRegistry()
SPECS = {name: REGISTRY.get(name) for name in ("sdxl-text2img", "animatediff-video")}


def test_collision_key_ignores_case_and_unicode_form():
    assert collision_key("Row-A.1") == collision_key("row-a.1") == "row-a.1"
    assert collision_key("caf\u00e9") == collision_key("cafe\u0301") == collision_key("CAF\u00c9")
    assert collision_key("Stra\u00dfe") == collision_key("STRASSE")
    assert collision_key("a-0") != collision_key("a-1")
    stems = ["A-0", "b", "caf\u00e9", "CAFE\u0301", "Stra\u00dfe"]
    assert collision_keys(pa.array(stems)).to_pylist() == [collision_key(s) for s in stems]
    assert collision_keys(pa.array(stems[:2])).to_pylist() == ["a-0", "b"]  # the ASCII path


def test_the_sharded_folder_still_hashes_the_stem_itself():
    """Outputs written before ids were compared without case keep their folders."""
    assert shard_folder("Row-A") == hashlib.sha256(b"Row-A").hexdigest()[:3] != shard_folder("row-a")


@pytest.mark.parametrize("value", ["nl\n", "CON\n", "a\n", "\nb"])
def test_ids_with_a_newline_are_refused_by_both_checks(value):
    assert not ids_ok(pa.array([value, "fine"]), 2)[0] and ids_ok(pa.array([value, "fine"]), 2)[1]
    with pytest.raises(RowFailed, match="^id: "):
        check_id(value)


def _records(tmp_path, records: list[dict]) -> tuple[MetadataStore, OwnedOutputs]:
    """Records folded into metadata/, then scanned the way a run starts (flows.open_run.scan_records)."""
    store = MetadataStore(Storage(), str(tmp_path))
    store.journal("r1", "x", records)
    store.fold()
    owned = OwnedOutputs()
    index = store.index(lambda _, table: owned.add(table), ["status", "outputs"])
    return store, owned.seal(store, index)


def _record(row_id, count=1, status="ok", layout="files"):
    if layout == "files":
        outputs = [f"/o/images/{row_id}.png"] if count == 1 else [f"/o/images/{row_id}-{k}.png" for k in range(count)]
    else:
        stems = [row_id] if count == 1 else [f"{row_id}-{k}" for k in range(count)]
        outputs = [f"/o/{layout}/part-0.tar#{stem}.png" for stem in stems]
    return make_record(job_id=row_id, spec="sdxl-text2img", status=status, run_id="r1",
                       outputs=outputs if status == "ok" else [], layout=layout)


def _job(row_id, count=1, spec="sdxl-text2img", index=0):
    return Job(id=row_id, spec=spec, index=index, seed=0, params={"num_images": count}, inputs={})


def test_a_row_may_not_take_another_ids_output(tmp_path):
    _, owned = _records(tmp_path, [_record("a", 2), _record("b", 1)])
    assert len(owned) == 3
    jobs = [_job("a-0", index=0), _job("a", 1, index=1), _job("a", 3, index=2), _job("B", index=3),
            _job("b", 2, index=4), _job("c", index=5), _job("A-1", 2, index=6), _job("A-1", 1, index=7)]
    found = owned.problems(jobs, SPECS)
    # the same id re-renders its own outputs with any count; b-0, b-1, A-1-0, A-1-1 belong to nobody
    assert {i: [str(p) for p in problems] for i, problems in found.items()} == {
        0: ["id: its output a-0 (png) belongs to row a of an earlier run; rename this row"],
        3: ["id: its output B (png) belongs to row b of an earlier run; rename this row"],
        7: ["id: its output A-1 (png) belongs to row a of an earlier run; rename this row"]}


def test_a_row_taking_several_outputs_names_each_owner_once(tmp_path):
    _, owned = _records(tmp_path, [_record("x", 5), _record("x-0", 1)])
    found = owned.problems([_job("X", 6, index=7)], SPECS)
    assert [str(p) for p in found[7]] == [
        "id: its outputs X-0, X-1, X-2 and 2 more (png) belong to row x of an earlier run; rename this row",
        "id: its output X-0 (png) belongs to row x-0 of an earlier run; rename this row"]
    found = owned.problems([_job("x-0", 1, index=1), _job("x", 1, index=2)], SPECS)
    assert [str(p) for p in found[1]] == [  # a stem two records own (written before this rule): x's, not its own
        "id: its output x-0 (png) belongs to row x of an earlier run; rename this row"]
    assert 2 not in found


def test_failed_records_own_nothing_and_containers_own_their_members(tmp_path):
    _, owned = _records(tmp_path, [_record("f", 2, status="failed"), _record("w", 2, layout="webdataset"),
                                   _record("v", 1, layout="parquet")])
    found = owned.problems([_job("f-0", index=0), _job("w-1", index=1), _job("V", index=2, spec="animatediff-video")],
                           SPECS)
    assert sorted(found) == [1, 2]
    assert "belongs to row v of an earlier run" in str(found[2][0]) and "(gif)" in str(found[2][0])


def test_owned_stems_follow_the_naming_rule_vectorised():
    table = pa.Table.from_pylist([_record("a", 3), _record("b", 1), _record("c", 2, status="failed"),
                                  _record("D.x", 2)]).select(list(COLUMNS))
    stems, owners = owned_stem_hashes(table)
    owned = [(stem, row_id) for row_id, count in (("a", 3), ("b", 1), ("D.x", 2)) for stem in output_stems(row_id, count)]
    assert [stem for stem, _ in owned] == ["a-0", "a-1", "a-2", "b", "D.x-0", "D.x-1"]  # specs.outputs' rule
    assert stems.tolist() == hash_strings([collision_key(stem) for stem, _ in owned]).tolist()
    assert owners.tolist() == hash_strings([row_id for _, row_id in owned]).tolist()
    many = pa.Table.from_pylist([_record(f"r{i}", i % 4) for i in range(1, 40)]).select(list(COLUMNS))
    want = [collision_key(stem) for i in range(1, 40) if i % 4 for stem in output_stems(f"r{i}", i % 4)]
    assert owned_stem_hashes(many)[0].tolist() == hash_strings(want).tolist()


def test_a_hash_that_matches_by_chance_fails_no_row(tmp_path):
    """Hashes only find candidates: the owner's record is read and compared exactly before a row fails."""
    _, owned = _records(tmp_path, [_record("a", 2)])
    forged = hash_strings(["zzz"])[0]  # as if "zzz" shared a 64-bit hash with a stem of a
    owned.stems = np.sort(np.append(owned.stems, forged))
    owned.owners = np.full(len(owned.stems), hash_strings(["a"])[0])
    assert owned.problems([_job("zzz", index=4)], SPECS) == {}
    assert set(owned.problems([_job("a-1", index=5)], SPECS)) == {5}


def test_an_empty_folder_owns_nothing(tmp_path):
    store = MetadataStore(Storage(), str(tmp_path))
    owned = OwnedOutputs().seal(store, store.index())
    assert len(owned) == 0 and owned.problems([_job(f"r{i}", index=i) for i in range(100)], SPECS) == {}
