"""Unreadable metadata is set aside and rebuilt: a torn part and a journal with a garbled tail move under
_ipaflow/unreadable/ with one WARNING each, every reader keeps working, and the records come back from the
parameters the outputs embed, in every layout, so intact rows are done (not rendered again)."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from util import write_folder

from ipaflow.core.storage import Storage
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.metadata_rebuild import UNREADABLE_DIR

SAME = ["id", "spec", "status", "outputs", "seed", "params", "key", "layout", "note"]


def _records(store) -> list[dict]:
    return sorted(({k: r.get(k) for k in SAME} for r in store.load().values()), key=lambda r: r["id"])


@pytest.mark.parametrize("layout", ["files", "sharded", "webdataset", "parquet"])
def test_a_torn_part_is_set_aside_and_its_records_rebuilt_from_the_outputs(tmp_path, layout, caplog):
    out = tmp_path / "out"
    store = write_folder(out, layout)
    before = _records(store)
    assert [r["id"] for r in before] == ["a", "b", "c.d"]
    (part,) = (out / "metadata").glob("part-*.parquet")
    part.write_bytes(part.read_bytes()[:-40])  # a torn copy: the footer is gone

    store = MetadataStore(Storage(), str(out))
    with caplog.at_level(logging.WARNING, logger="ipaflow.metadata"):
        store.repair(store.index())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and part.name in r.getMessage()]
    assert len(warnings) == 1 and "_ipaflow/unreadable/" in warnings[0]
    assert not part.exists() and (out / UNREADABLE_DIR / f"metadata--{part.name}").exists()
    store.fold("r2-recovered")
    assert _records(store) == before
    assert sorted(pd.read_parquet(out / "metadata")["id"]) == ["a", "b", "c.d"]


def test_a_journal_with_a_garbled_tail_is_set_aside_and_rebuilt(tmp_path):
    out = tmp_path / "out"
    store = write_folder(out, "files")
    before = _records(store)
    (part,) = (out / "metadata").glob("part-*.parquet")
    journal = out / "_ipaflow" / "journal" / "r2" / "s0.parquet"
    journal.parent.mkdir(parents=True)
    journal.write_bytes(part.read_bytes()[:-8] + b"garbled!")
    part.unlink()  # its records are only in the damaged journal now (a run killed before its fold)

    store = MetadataStore(Storage(), str(out))
    store.repair(store.index())
    assert not journal.exists() and (out / UNREADABLE_DIR / "_ipaflow--journal--r2--s0.parquet").exists()
    store.fold("r3-recovered")
    assert _records(store) == before


def test_a_row_missing_an_output_is_not_rebuilt(tmp_path):
    out = tmp_path / "out"
    write_folder(out, "files")
    (part,) = (out / "metadata").glob("part-*.parquet")
    part.write_bytes(b"PAR1 not a part")
    (out / "images" / "b-1.png").unlink()
    store = MetadataStore(Storage(), str(out))
    store.repair(store.index())
    store.fold("r2")
    assert sorted(store.load()) == ["a", "c.d"]  # b renders again
