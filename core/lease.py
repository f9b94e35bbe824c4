"""One run at a time per output folder: a lease in ``<out>/_ipaflow/lease.json``.

Two runs writing into one ``--out`` fold each other's journals and record each other's rows as failed, so a
run takes the lease before it writes anything and a second run is refused with a message that says who holds
it. The lease is a small JSON object, so it works the same on a local disk and on an object store (where
there is no flock):

- taking it: created only if absent (a local hard link, S3's conditional PUT), so of two runs starting
  together one wins;
- holding it: a heartbeat thread rewrites it every ``ttl / 4`` seconds;
- a dead run's lease does not block forever: it expires ``ttl`` seconds after its last heartbeat (clocks of
  the machines involved are assumed to agree within that), and at once when its holder ran on this machine
  (same host and process namespace) and that process is gone, as after a SIGKILL;
- giving it back: deleted when the run ends, whatever the way it ends.

Fencing: each lease carries a **token**, a number one above the token of the lease it replaced (or of the last
lease given back: ``_ipaflow/lease-token.json``), so a run that took over holds a higher token than the one it
replaced. Everything a run writes into ``--out`` goes through a ``FencedStorage``, whose every write and
delete first asks its ``Fence`` whether the lease still holds this run's token; a run that lost it (paused past
the ttl, as by SIGSTOP, a GC pause, a suspended laptop or a VM migration, and taken over) raises ``LeaseLost``
instead of writing. The fence reads the lease (one small GET) unless the heartbeat it last read is so recent
that no other run can have taken over yet: another run takes the lease only ``ttl`` after its last heartbeat,
the fence trusts one for ``ttl / 2``.

    with OutputLease(storage, out, run="nightly-2026-12-01") as lease:
        fenced = FencedStorage(fence=lease.fence())
        ...  # write into out through ``fenced``

``OutputInUse`` and ``OutputUnusable`` say, in one line, why a run cannot start (``UserError``, exit status 2);
``LeaseLost`` why it stopped (exit status 4).
A run stopped because its store is unreachable leaves the lease to expire: the store cannot be told.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

from ipaflow.core.deadlines import seconds_from_environment
from ipaflow.core.errors import EXIT_LEASE_LOST, UserError
from ipaflow.core.input_reads import InputRefused
from ipaflow.core.outages import StorageUnreachable
from ipaflow.core.storage import Storage, describe_error, is_local, join

log = logging.getLogger("ipaflow.lease")

LEASE_FILE = "_ipaflow/lease.json"
TOKEN_FILE = "_ipaflow/lease-token.json"  # the last lease taken: its token (the next one is higher) and run
LEASE_TTL_ENV = "IPAFLOW_LEASE_TTL"
DEFAULT_TTL_S = 60.0
MAX_LEASE_BYTES = 64 * 1024


class OutputInUse(UserError):
    """Another live run holds the output folder (nothing ran: exit status 2)."""


class OutputUnusable(UserError):
    """The output folder cannot be written (a file, read-only, full, no permission, ...): exit status 2."""


class LeaseLost(UserError):
    """Another run took over this run's lease (this one was paused past the ttl): it stopped before writing
    again; exit status 4."""

    exit_code = EXIT_LEASE_LOST

    def __init__(self, where: str, by: str, token: int, safe: int | None = None):
        """``by``: the run that holds the lease now ("run <name>"), or "" when the lease is gone."""
        self.where, self.by, self.token, self.safe = where, by, token, safe
        rows = "what it wrote before is safe" if safe is None else f"{safe} row{'s are' if safe != 1 else ' is'} safe"
        lost = f"to {by} (token {token})" if by else f"(its file is gone or damaged; this run's token was {token})"
        super().__init__(f"lost the lease on {where} {lost}; stopped, {rows}, re-run to resume")

    def __reduce__(self):  # raised in a Dask worker, read in the flow's process
        return LeaseLost, (self.where, self.by, self.token, self.safe)

    def at(self, where: str, safe: int | None = None) -> LeaseLost:
        """The same loss said of ``where`` (the run's --out, redacted), with the count of rows that are safe."""
        return LeaseLost(where, self.by, self.token, self.safe if safe is None else safe)


def _machine() -> str:
    """This host, and on Linux its process namespace: pids are only comparable within one."""
    try:
        namespace = f"/pidns:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        namespace = ""
    return socket.gethostname() + namespace


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _ttl_from_environment() -> float:
    return seconds_from_environment(LEASE_TTL_ENV) or DEFAULT_TTL_S


@dataclass(frozen=True)
class Holder:
    """What a lease file says: ``token`` is the fencing token, ``id`` tells two takers of one token apart."""

    token: int
    id: str
    machine: str
    pid: int
    run: str
    started: float  # time.time()
    heartbeat: float
    ttl: float
    flow_run: str = ""  # the holder's Prefect flow run id: a run that takes over a dead lease marks it Crashed

    def expired(self, now: float) -> bool:
        return now > self.heartbeat + self.ttl

    def gone(self) -> bool:
        """Its process died on this machine (a SIGKILL leaves no time to give the lease back)."""
        return self.machine == _machine() and _process_gone(self.pid)

    def describe(self, now: float) -> str:
        started = datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        host = self.machine.split("/pidns:", 1)[0]
        name = f"run {self.run} " if self.run else "a run "
        return f"{name}on {host} (pid {self.pid}), started {started}, last seen {max(0, now - self.heartbeat):.0f} s ago"

    def holds(self, token: int, holder_id: str) -> bool:
        return (self.token, self.id) == (token, holder_id)


DAMAGED = Holder(token=0, id="", machine="", pid=0, run="", started=0.0, heartbeat=0.0, ttl=0.0)


def parse_holder(data: bytes) -> Holder:
    """A lease file's holder; ValueError, KeyError or TypeError when it is damaged. A lease written before
    tokens were numbers (its ``token`` an id) reads as token 0."""
    fields = json.loads(bytes(data))
    token = fields["token"]
    numbered = isinstance(token, int) and not isinstance(token, bool)
    values = {name: fields[name] for name in Holder.__dataclass_fields__ if name not in ("token", "id", "flow_run")}
    return Holder(token=token if numbered else 0, id=str(fields.get("id", "" if numbered else token)),
                  flow_run=str(fields.get("flow_run", "")), **values)


def read_holder(storage: Storage, uri: str, as_input: bool = False) -> Holder | None:
    """The holder of the lease at ``uri``, None when there is none; a damaged one (unreadable, too large) is
    ``DAMAGED`` (token 0), said in one WARNING. Read as ipaflow's own file (bounded, one GET: an unreachable
    store is one outage, ``ipaflow.core.outages``), or ``as_input`` (the first look, before the run holds it)."""
    try:
        data = storage.read_input(uri, MAX_LEASE_BYTES) if as_input else storage.read_bytes(uri)
        if len(data) > MAX_LEASE_BYTES:
            raise InputRefused(f"larger than {MAX_LEASE_BYTES} bytes")
        return parse_holder(data)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, InputRefused) as exc:
        log.warning("the lease %s is damaged (%s); taking it as expired", storage.redact(uri), exc)
        return DAMAGED


def last_taken(storage: Storage, out: str) -> tuple[int, str]:
    """The token and run of the last lease taken on ``out`` (``TOKEN_FILE``); (0, "") for none, or a damaged file."""
    try:
        fields = json.loads(storage.read_bytes(join(out, TOKEN_FILE))[:MAX_LEASE_BYTES])
        token = fields["token"]
        if isinstance(token, int) and not isinstance(token, bool) and token > 0:
            return token, str(fields.get("run", ""))
    except FileNotFoundError:
        return 0, ""
    except (ValueError, KeyError, TypeError):
        pass
    log.warning("%s is damaged; the next token is one above the lease's", storage.redact(join(out, TOKEN_FILE)))
    return 0, ""


@dataclass
class Fence:
    """What a run's writers check before each write: that the lease on ``out`` still holds ``token`` and
    ``holder`` (``check``). One per process: ``RunSettings.storage`` builds it from the token and holder the
    flow hands every shard task, in whichever process it runs."""

    out: str
    token: int
    holder: str
    storage: Storage = field(default_factory=Storage, repr=False)  # where the lease is read (the run's options)
    _seen: Holder | None = field(default=None, repr=False, compare=False)  # the last lease read that was ours

    def check(self) -> None:
        """Return when this run still holds the lease; raise ``LeaseLost`` when it does not. Reads the lease
        (one small GET) unless the last read showed this run's heartbeat less than ``ttl / 2`` ago: another run
        takes a lease only ``ttl`` after its last heartbeat (clocks are assumed to agree within ``ttl / 2``)."""
        seen = self._seen
        if seen is not None and time.time() < seen.heartbeat + seen.ttl / 2:
            return
        holder = read_holder(self.storage, join(self.out, LEASE_FILE))
        if holder is not None and holder.holds(self.token, self.holder):
            self._seen = holder
            return
        self._seen = None
        raise LeaseLost(self.storage.redact(self.out), *self._taker(holder))

    def _taker(self, holder: Holder | None) -> tuple[str, int]:
        """Who holds the lease now, and its token; ("", this run's token) when nobody does (removed or damaged)."""
        if holder is None:  # given back since: the token file names the last run that took it, if not this one
            token, run = last_taken(self.storage, self.out)
            holder = replace(DAMAGED, token=token, run=run, id="?") if token > self.token else DAMAGED
        if not holder.id:
            return "", self.token
        return (f"run {holder.run}" if holder.run else "another run"), holder.token


_TOKEN_SUFFIX = re.compile(r"-t(\d+)(\.[^/.]*)?$")


def token_suffix(token: int) -> str:
    """What a file name carries of the lease token it is written under (a journal file's): ``-t<token>``, or
    nothing for 0 (no lease)."""
    return f"-t{token}" if token else ""


def token_in_name(uri: str) -> int:
    """The lease token a file's name carries (``token_suffix``, before its extension); 0 for none."""
    found = _TOKEN_SUFFIX.search(uri)
    return int(found.group(1)) if found else 0


def lease_token(storage: Storage) -> int:
    """The lease token a storage's writes are fenced with (``FencedStorage``); 0 for any other storage."""
    fence = getattr(storage, "fence", None)
    return fence.token if fence is not None else 0


@dataclass
class FencedStorage(Storage):
    """A run's storage: every write and delete first checks the run's ``Fence`` (``LeaseLost`` instead of a
    write once another run holds the lease). Reads are not fenced."""

    fence: Fence | None = field(default=None, repr=False)

    def write_atomic(self, uri: str, data: bytes) -> None:
        self.check_lease()
        super().write_atomic(uri, data)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        self.check_lease()
        return super().create_exclusive(uri, data)

    def delete(self, uri: str) -> None:
        self.check_lease()
        super().delete(uri)

    def check_lease(self) -> None:
        """``LeaseLost`` when the run no longer holds its lease (``Fence.check``); nothing without a fence."""
        if self.fence is not None:
            self.fence.check()


class OutputLease:
    def __init__(self, storage: Storage, out: str, run: str = "", ttl: float | None = None, flow_run: str = ""):
        self.storage = storage
        self.out = out
        self.uri = join(out, LEASE_FILE)
        self.run = run
        self.flow_run = flow_run
        self.taken_over: Holder | None = None  # the dead run whose lease this one took over, if any
        self.ttl = ttl if ttl is not None else _ttl_from_environment()
        self.id = uuid.uuid4().hex
        self.token = 0  # the fencing token, set when the lease is taken
        self._started = time.time()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- reading and writing the file -----------------------------------------------------------------------
    def _holder(self, renewing: bool = False) -> Holder | None:
        """The lease's holder (``read_holder``); ``renewing``: read as ipaflow's own file (the heartbeat), so
        that an unreachable store is one outage said every 30 s, not a warning per beat."""
        return read_holder(self.storage, self.uri, as_input=not renewing)

    def fence(self, storage: Storage | None = None) -> Fence:
        """This run's fence (``Fence``); ``storage`` reads the lease (default: the lease's own)."""
        return Fence(self.out, self.token, self.id, storage or self.storage)

    def _content(self) -> bytes:
        now = time.time()
        holder = Holder(token=self.token, id=self.id, machine=_machine(), pid=os.getpid(), run=self.run,
                        started=self._started, heartbeat=now, ttl=self.ttl, flow_run=self.flow_run)
        return json.dumps(asdict(holder), sort_keys=True).encode()

    def _unusable(self, exc: BaseException) -> OutputUnusable:
        return OutputUnusable(f"cannot write to --out {self.storage.redact(self.out)}: "
                              f"{self.storage.redact(describe_error(exc))}")

    # -- the lease's life -----------------------------------------------------------------------------------
    def acquire(self) -> OutputLease:
        """Take the lease, or raise OutputInUse (a live run holds it) or OutputUnusable (--out cannot be written)."""
        if is_local(self.out):
            path = self.storage.fs(self.out)[1]
            if os.path.exists(path) and not os.path.isdir(path):
                raise OutputUnusable(f"cannot write to --out {self.out}: it is a file, not a folder")
        try:
            for _ in range(5):  # each pass either ends or saw the lease change under it
                holder = self._holder()
                now = time.time()
                if holder is not None and not holder.expired(now) and not holder.gone():
                    raise OutputInUse(
                        f"--out {self.storage.redact(self.out)} is in use by {holder.describe(now)}; wait for that "
                        f"run to end or choose another --out (if it died, its lease ends {holder.ttl:g} s after it "
                        f"was last seen, or remove {self.storage.redact(self.uri)})")
                if holder is not None:
                    log.warning("taking over the lease on %s left by %s", self.storage.redact(self.out),
                                holder.describe(now))
                    self.storage.delete(self.uri)
                self.token = max(holder.token if holder else 0, last_taken(self.storage, self.out)[0]) + 1
                if self.storage.create_exclusive(self.uri, self._content()):
                    if holder is None or self._still_ours():
                        self.taken_over = holder
                        self.storage.write_atomic(join(self.out, TOKEN_FILE),
                                                  json.dumps({"token": self.token, "run": self.run}).encode())
                        break
            else:
                raise OutputInUse(f"--out {self.storage.redact(self.out)}: another run keeps taking its lease")
        except OSError as exc:
            raise self._unusable(exc) from None
        self._beat = threading.Thread(target=self._heartbeat, name="ipaflow-lease", daemon=True)
        self._beat.start()
        return self

    def _still_ours(self) -> bool:
        """After taking over an expired lease: another run that took it over at the same moment deletes and
        writes too; a short pause and a second look leave one of the two holding it."""
        time.sleep(min(0.5, self.ttl / 10))
        holder = self._holder()
        return holder is not None and holder.holds(self.token, self.id)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self._renew():
                    return
            except StorageUnreachable:  # said once by the run as it stops
                return
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried at the next one
                log.warning("could not renew the lease on %s: %s", self.storage.redact(self.out),
                            self.storage.redact(describe_error(exc)))

    def _renew(self) -> bool:
        """Rewrite the lease if it is still this run's; False when it is not. A read that took more than
        ``ttl / 4`` (the process was paused after it, say) may be stale: it is read again before the write."""
        for _ in range(3):
            read = time.time()
            holder = self._holder(renewing=True)
            if holder is None or not holder.holds(self.token, self.id):
                log.info("the lease on %s was taken by %s; this run no longer holds --out (its next write "
                         "stops it)", self.storage.redact(self.out),
                            holder.describe(time.time()) if holder else "nobody")
                return False
            if time.time() - read < self.ttl / 4:
                break
        self.storage.write_atomic(self.uri, self._content())
        return True

    def release(self, unreachable: bool = False) -> None:
        """Stop the heartbeat and delete the lease if it is still ours; with ``unreachable`` (the run stops
        because the store is), without touching the store: the lease then expires ``ttl`` after its last beat."""
        self._stop.set()
        if self._beat is None:
            return
        self._beat.join(timeout=5)
        self._beat = None
        if unreachable:
            log.info("the lease on %s is left to expire (%g s after its last renewal): its store is unreachable",
                        self.storage.redact(self.out), self.ttl)
            return
        try:
            holder = self._holder()
            if holder is not None and holder.holds(self.token, self.id):
                self.storage.delete(self.uri)
        except Exception as exc:  # noqa: BLE001 - the lease then expires on its own
            log.warning("could not remove the lease on %s: %s", self.storage.redact(self.out),
                        self.storage.redact(describe_error(exc)))

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.release(unreachable=isinstance(exc, StorageUnreachable))
