"""Fencing: every lease carries a token one above the last one taken on the folder; a run's writes go through a
``FencedStorage`` that checks the run still holds its token before each write and delete, and raises
``LeaseLost`` (exit status 4) instead of writing once another run took the folder over. The same on a local disk
and on an object store (memory://)."""

from __future__ import annotations

import json
import pickle
import time
import uuid
from dataclasses import replace

import pytest

from ipaflow.core.errors import EXIT_LEASE_LOST
from ipaflow.core.lease import LEASE_FILE, TOKEN_FILE, FencedStorage, LeaseLost, OutputLease
from ipaflow.core.storage import Storage, join
from ipaflow.specs.options import RenderOptions
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.metadata_schema import make_record, records_table, to_parquet_bytes
from ipaflow.tasks.worker import RunSettings


@pytest.fixture(params=["local", "memory"])
def out(request, tmp_path):
    return str(tmp_path / "out") if request.param == "local" else f"memory://fence-{uuid.uuid4().hex}/out"


class CountingStorage(Storage):
    """A real storage that counts its reads of the lease."""

    reads = 0

    def read_bytes(self, uri: str) -> bytes:
        if uri.endswith(LEASE_FILE):
            CountingStorage.reads += 1
        return super().read_bytes(uri)


def _pause(lease: OutputLease) -> None:
    """The holder stops renewing, as a process under SIGSTOP does."""
    lease._stop.set()
    lease._beat.join()


def test_each_lease_taken_has_a_higher_token(out):
    storage = Storage()
    with OutputLease(storage, out, run="first") as first:
        assert first.token == 1
    with OutputLease(storage, out, run="second") as second:  # given back, not taken over: still counted
        assert second.token == 2
        assert json.loads(storage.read_bytes(join(out, LEASE_FILE)))["token"] == 2
    paused = OutputLease(storage, out, run="paused", ttl=0.3).acquire()
    _pause(paused)
    time.sleep(0.5)
    with OutputLease(storage, out, run="taker") as taker:
        assert (taker.token, taker.taken_over.token, taker.taken_over.run) == (4, 3, "paused")
    assert json.loads(storage.read_bytes(join(out, TOKEN_FILE))) == {"token": 4, "run": "taker"}


def test_a_lease_of_an_older_ipaflow_is_read_and_its_takers_count_on(out):
    storage = Storage()
    storage.write_atomic(join(out, TOKEN_FILE), json.dumps({"token": 7, "run": "old"}).encode())
    old = {"token": "a1b2c3", "machine": "elsewhere", "pid": 1, "run": "old", "started": 0.0, "heartbeat": 0.0,
           "ttl": 60.0}  # its token an id, not a number: token 0
    storage.write_atomic(join(out, LEASE_FILE), json.dumps(old).encode())
    with OutputLease(storage, out) as lease:
        assert (lease.taken_over.token, lease.taken_over.id, lease.token) == (0, "a1b2c3", 8)


def test_a_run_that_lost_its_lease_writes_nothing_and_says_who_took_it(out):
    storage = Storage()
    paused = OutputLease(storage, out, run="a", ttl=0.4).acquire()
    fenced = FencedStorage(fence=paused.fence())
    fenced.write_atomic(join(out, "images/x.png"), b"before")  # held: written
    _pause(paused)
    time.sleep(0.6)  # past the ttl: another run may take over
    with OutputLease(storage, out, run="b") as taker:
        for write in (lambda: fenced.write_atomic(join(out, "images/x.png"), b"after"),
                      lambda: fenced.delete(join(out, "images/x.png")),
                      lambda: fenced.create_exclusive(join(out, "images/y.png"), b"after")):
            with pytest.raises(LeaseLost) as caught:
                write()
        assert str(caught.value) == (f"lost the lease on {out} to run b (token {taker.token}); stopped, what it "
                                     f"wrote before is safe, re-run to resume")
        assert caught.value.exit_code == EXIT_LEASE_LOST == 4
    assert storage.read_bytes(join(out, "images/x.png")) == b"before" and not storage.exists(join(out, "images/y.png"))
    with pytest.raises(LeaseLost, match=r"to run b \(token 2\)"):  # b gave the lease back: the token file says who
        fenced.check_lease()
    paused.release()


def test_a_removed_lease_stops_its_run(out):
    storage = Storage()
    with OutputLease(storage, out, run="a", ttl=0.2) as lease:
        fence = lease.fence()
        fence.check()
        storage.delete(join(out, LEASE_FILE))  # by hand
        time.sleep(0.15)  # past ttl / 2: the fence reads the lease again
        with pytest.raises(LeaseLost, match=r"its file is gone or damaged; this run's token was 1\)"):
            fence.check()


def test_the_fence_reads_the_lease_only_when_its_last_heartbeat_is_older_than_half_the_ttl(tmp_path):
    out = str(tmp_path / "out")
    with OutputLease(Storage(), out, ttl=10) as lease:
        fence = lease.fence(CountingStorage())
        CountingStorage.reads = 0
        for _ in range(1000):
            fence.check()
        assert CountingStorage.reads == 1  # the first check; the others trust the heartbeat it read
        fence._seen = replace(fence._seen, heartbeat=time.time() - lease.ttl / 2)  # as after a pause
        fence.check()
        assert CountingStorage.reads == 2


def test_lease_lost_crosses_processes_and_counts_the_safe_rows():
    lost = pickle.loads(pickle.dumps(LeaseLost("s3://b/r", "run b", 5)))  # noqa: S301 - our own bytes
    assert str(lost.at("s3://b/r", 12)) == ("lost the lease on s3://b/r to run b (token 5); stopped, 12 rows are "
                                            "safe, re-run to resume")


def test_the_run_settings_carry_the_fence_to_every_shard(tmp_path):
    out = str(tmp_path / "out")
    with OutputLease(Storage(), out, run="a") as lease:
        settings = RunSettings(run_id="r", out=out, options=RenderOptions(), lease_token=lease.token,
                               lease_holder=lease.id)
        storage = pickle.loads(pickle.dumps(settings)).storage()  # noqa: S301 - as a Dask worker gets it
        storage.write_atomic(join(out, "ok"), b"1")
        wrong = settings.model_copy(update={"lease_token": lease.token + 1}).storage()
        with pytest.raises(LeaseLost):
            wrong.write_atomic(join(out, "no"), b"1")
    assert RunSettings(run_id="r", out=out).storage().fence is None  # no lease (tools, tests): unfenced


def test_journal_files_name_their_token_and_a_runs_own_fold_ignores_older_ones(tmp_path, caplog):
    """B took the folder over from a paused A and folded A's journal when it started; a journal file A had under
    way at the pause lands later: B's fold at its end removes it unread, and the records B wrote stand."""
    out = str(tmp_path / "out")
    plain = Storage()
    a = OutputLease(plain, out, run="a", ttl=0.3).acquire()
    a_store = MetadataStore(FencedStorage(fence=a.fence()), out)
    a_store.journal("run-a", "s0-x-00000", [_record("r0", "run-a")])
    assert [name.rsplit("/", 1)[1] for name in a_store.journal_files()] == ["s0-x-00000-t1.parquet"]
    _pause(a)
    time.sleep(0.4)
    with OutputLease(plain, out, run="b") as b:
        b_store = MetadataStore(FencedStorage(fence=b.fence()), out)
        b_store.fold("run-b-recovered", lease_token=0)  # B's start: every journal there is, A's included
        late = _record("r1", "run-a")  # rendered by A before its pause; its journal file lands after B started
        plain.write_atomic(join(out, "_ipaflow/journal/run-a/s0-x-00001-t1.parquet"),
                           to_parquet_bytes(records_table([late])))
        b_store.journal("run-b", "s0-y-00000", [_record("r1", "run-b"), _record("r2", "run-b")])
        with caplog.at_level("WARNING", logger="ipaflow.metadata"):
            folded = b_store.fold("run-b", lease_token=b.token)
    assert folded.files == 1 and "written under an older lease token" in caplog.text
    assert not b_store.journal_files()
    records = b_store.load()
    assert {i: r["run_id"] for i, r in records.items()} == {"r0": "run-a", "r1": "run-b", "r2": "run-b"}
    a.release()


def _record(row_id: str, run: str) -> dict:
    return make_record(job_id=row_id, spec="s", status="ok", run_id=run, key=f"k-{row_id}")


class PausedAfterRead(Storage):
    """A real storage whose first read of the lease is followed by a pause, during which another run takes the
    lease over (what a SIGSTOP between a heartbeat's read and its write looks like)."""

    taker: dict | None = None

    def read_bytes(self, uri: str) -> bytes:
        data = super().read_bytes(uri)
        if uri.endswith(LEASE_FILE) and PausedAfterRead.taker is not None:
            taker, PausedAfterRead.taker = PausedAfterRead.taker, None
            Storage().write_atomic(uri, json.dumps(taker).encode())
            time.sleep(0.2)
        return data


def test_a_heartbeat_paused_after_its_read_does_not_overwrite_the_run_that_took_over(tmp_path):
    out = str(tmp_path / "out")
    lease = OutputLease(PausedAfterRead(), out, run="a", ttl=0.4).acquire()
    _pause(lease)  # the beats are driven by hand below
    PausedAfterRead.taker = {"token": 2, "id": "b-id", "machine": "elsewhere", "pid": 1, "run": "b",
                             "started": time.time(), "heartbeat": time.time(), "ttl": 60.0}
    assert lease._renew() is False  # the read before the pause was stale: read again, and it is b's
    assert json.loads(Storage().read_bytes(join(out, LEASE_FILE)))["id"] == "b-id"
