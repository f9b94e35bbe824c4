"""The lease on an output folder: a second run is refused while the first lives (its heartbeat keeps the lease
fresh past its ttl), a dead run's lease does not block forever (expired, or its local process gone), an
unusable folder is said in one line; the same on a local disk and on an object store (memory://, no flock)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest

from ipaflow.core.lease import LEASE_FILE, OutputInUse, OutputLease, OutputUnusable, _machine
from ipaflow.core.storage import Storage, join


@pytest.fixture(params=["local", "memory"])
def out(request, tmp_path):
    return str(tmp_path / "out") if request.param == "local" else f"memory://lease-{uuid.uuid4().hex}/out"


def _write(storage: Storage, out: str, **fields) -> None:
    holder = {"token": "other", "machine": "elsewhere", "pid": 1, "run": "nightly", "started": time.time(),
              "heartbeat": time.time(), "ttl": 60.0, **fields}
    storage.write_atomic(join(out, LEASE_FILE), json.dumps(holder).encode())


def test_a_second_run_is_refused_until_the_first_ends(out):
    storage = Storage()
    first = OutputLease(storage, out, run="first", ttl=0.4).acquire()
    try:
        time.sleep(1.0)  # past its ttl: only the heartbeat keeps it
        with pytest.raises(OutputInUse) as caught:
            OutputLease(storage, out, run="second").acquire()
        message = str(caught.value)
        assert f"--out {out} is in use by run first on " in message and "last seen 0 s ago" in message
        assert "wait for that run to end or choose another --out" in message
    finally:
        first.release()
    assert not storage.exists(join(out, LEASE_FILE))
    with OutputLease(storage, out, run="second"):
        assert storage.exists(join(out, LEASE_FILE))


def test_a_dead_runs_lease_does_not_block(out, caplog):
    storage = Storage()
    _write(storage, out, heartbeat=time.time() - 120, ttl=60.0)  # another machine, silent for two minutes
    with OutputLease(storage, out) as lease:  # a lease written before flow_run was recorded: still read
        assert (lease.taken_over.run, lease.taken_over.flow_run) == ("nightly", "")
    assert "taking over the lease" in caplog.text and "last seen 120 s ago" in caplog.text

    lost = OutputLease(storage, out, run="lost", flow_run="0b5e").acquire()  # its flow run, for the next to close
    lost._stop.set()  # dies without a word: no more heartbeats, the lease left behind
    _write(storage, out, **{**json.loads(storage.read_bytes(join(out, LEASE_FILE))), "heartbeat": 0.0})
    with OutputLease(storage, out) as lease:
        assert (lease.taken_over.run, lease.taken_over.flow_run) == ("lost", "0b5e")

    dead = subprocess.Popen(["true"])
    dead.wait()
    _write(storage, out, machine=_machine(), pid=dead.pid)  # fresh, but its process on this machine is gone
    with OutputLease(storage, out):
        pass

    _write(storage, out)  # fresh, on another machine: in use
    with pytest.raises(OutputInUse):
        OutputLease(storage, out).acquire()


def test_a_damaged_lease_counts_as_expired(out):
    storage = Storage()
    storage.write_atomic(join(out, LEASE_FILE), b"{not json")
    with OutputLease(storage, out):
        pass


def test_an_out_that_is_a_file_is_unusable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputUnusable, match=r"cannot write to --out .*/file: it is a file, not a folder"):
        OutputLease(Storage(), str(tmp_path / "file")).acquire()
    with pytest.raises(OutputUnusable, match=r"cannot write to --out .*/file/sub: a part of the path is a file"):
        OutputLease(Storage(), str(tmp_path / "file" / "sub")).acquire()
