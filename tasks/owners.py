"""Outputs owned across runs: a row may not write an output that another id's current record owns.

The census (``specs.census``) keeps the rows of one manifest from writing the same output; this keeps a run
from overwriting what an earlier run wrote into the same ``--out`` under another id. Run 1 renders
``{id: a, num_images: 2}`` as ``a-0`` and ``a-1``; run 2's row ``a-0`` would overwrite ``a-0``, leaving record
``a`` "ok" over an image it did not render. So planning fails such a row alone, naming the owner.

What a record owns is derived from the record alone: ``specs.outputs.output_stems(id, len(outputs))``, for every
layout (a container's members are named by the same stems), compared by ``collision_key`` (without case,
Unicode-normalised) like every other collision. Only current records (the latest per id) with status ``ok`` and
outputs own anything: a failed record owns nothing, and an id re-rendering its own outputs (with any
``num_images``, with or without ``--overwrite``) is its own owner.

At dataset scale the flow holds, per owned output, the 64-bit hash of its stem's collision key (sorted) and the
64-bit hash of its owner's id: 16 bytes, never a Python object per record. Each batch's stems are looked up
vectorised; the few rows that hit another owner's hash are confirmed exactly by reading the owners' records
from the parts that hold them (``RecordIndex``), so a 64-bit hash collision can neither fail a row nor name the
wrong owner.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ipaflow.core.hashing import hash_strings, members
from ipaflow.core.problems import Problem
from ipaflow.specs.outputs import collision_key, collision_keys, extension, output_stems
from ipaflow.specs.spec import Spec

COLUMNS = ("id", "status", "outputs")  # what deciding ownership reads from a record
SHOWN_STEMS = 3  # stems a reason names before "and N more"


def _stems(ids: pa.Array, counts: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """Every output stem of rows with ``ids`` writing ``counts`` outputs each, vectorised (the rule of
    ``specs.outputs.output_stems``: the id, or ``<id>-<k>`` for k = 0.. when a row writes several), and the row
    each stem belongs to."""
    parent = np.repeat(np.arange(len(counts)), counts)
    if not len(parent):
        return pa.array([], type=pa.string()), parent
    if (counts == 1).all():
        return ids, parent
    position = np.arange(len(parent)) - (np.cumsum(counts) - counts)[parent]
    # suffix 0 is "" (a row with one output: the stem is the id), suffix k+1 is "-k"
    suffixes = pa.array([""] + [f"-{k}" for k in range(int(counts.max()))], type=pa.string())
    which = np.where(counts[parent] == 1, 0, position + 1)
    return pc.binary_join_element_wise(ids.take(pa.array(parent)), suffixes.take(pa.array(which)), ""), parent


def owned_stem_hashes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(hash of each owned stem's collision key, hash of its owner's id) for the ``ok`` records of ``table``
    (columns ``id``, ``status``, ``outputs``), vectorised: one entry per output."""
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False)
    table = table.filter(ok)
    counts = pc.fill_null(pc.list_value_length(table.column("outputs").combine_chunks()), 0)
    counts = counts.to_numpy(zero_copy_only=False).astype(np.int64)
    if not counts.sum():
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    ids = pc.fill_null(table.column("id").combine_chunks(), "")
    stems, parent = _stems(ids, counts)
    return hash_strings(collision_keys(stems)), hash_strings(ids)[parent]


def _counts(jobs: Sequence, specs: dict[str, Spec]) -> np.ndarray:
    """How many outputs each job (a ``Job`` or a ``specs.checks.VouchedRow``) writes: ``specs.outputs.job_stems``'s
    rule (a video task's rows write one)."""
    video = {name: spec.profile.output == "video" for name, spec in specs.items()}
    return np.array([1 if video[job.spec] else int(job.params.get("num_images") or 1) for job in jobs], dtype=np.int64)


class OwnedOutputs:
    """The outputs the current records of an output folder own, as hashes, and the rows that would take one.

    Filled part by part while the records are scanned at run start (``add``), then ``seal``-ed with where the
    records live, for naming owners."""

    def __init__(self) -> None:
        self._stems: list[np.ndarray] = []
        self._owners: list[np.ndarray] = []
        self.stems = np.zeros(0, np.uint64)  # sorted
        self.owners = np.zeros(0, np.uint64)  # parallel: the owner's id hash
        self._metadata = None
        self._index = None

    def __len__(self) -> int:
        return len(self.stems)

    def add(self, table: pa.Table) -> None:
        stems, owners = owned_stem_hashes(table)
        if len(stems):
            self._stems.append(stems)
            self._owners.append(owners)

    def clear(self) -> None:
        self._stems, self._owners = [], []

    def seal(self, metadata, index) -> OwnedOutputs:
        """Sort what was added; ``metadata`` (``MetadataStore``) and ``index`` (its ``RecordIndex``) are where
        owners' records are read back when a row must name one."""
        if self._stems:
            stems, owners = np.concatenate(self._stems), np.concatenate(self._owners)
            order = np.argsort(stems, kind="stable")
            self.stems, self.owners = stems[order], owners[order]
        self._stems, self._owners = [], []
        self._metadata, self._index = metadata, index
        return self

    def problems(self, jobs: Sequence, specs: dict[str, Spec]) -> dict[int, tuple[Problem, ...]]:
        """Manifest index -> problems, for the jobs that would write an output another id's record owns."""
        if not len(self.stems) or not jobs:
            return {}
        ids = pa.array([job.id for job in jobs], type=pa.string())
        stems, rows = _stems(ids, _counts(jobs, specs))
        hashes = hash_strings(collision_keys(stems))
        order = np.argsort(hashes)  # sorted keys: numpy's binary search narrows from the previous key
        left = np.empty(len(hashes), dtype=np.int64)
        left[order] = np.searchsorted(self.stems, hashes[order])
        found = left < len(self.stems)
        found[found] = self.stems[left[found]] == hashes[found]
        hit = np.flatnonzero(found)
        if not len(hit):
            return {}
        own = hash_strings(ids)[rows[hit]]
        after = np.minimum(left[hit] + 1, len(self.stems) - 1)
        single = (after == left[hit]) | (self.stems[after] != hashes[hit])  # one record owns the stem
        suspects: list[tuple[int, np.uint64]] = [
            (int(i), self.owners[left[i]]) for i in hit[single & (self.owners[left[hit]] != own)]]
        right = np.searchsorted(self.stems, hashes[hit[~single]], "right")
        for i, end, mine in zip(hit[~single], right, own[~single]):  # several own it (written before this rule)
            suspects.extend((int(i), owner) for owner in self.owners[left[i]:end] if owner != mine)
        if not suspects:
            return {}
        owners = self._owner_records(np.array([owner for _, owner in suspects], dtype=np.uint64))
        taken: dict[int, dict[str, list[str]]] = {}
        for i, owner in sorted(suspects, key=lambda suspect: suspect[0]):
            job, stem = jobs[rows[i]], stems[i].as_py()
            for owner_id, keys in sorted(owners.get(int(owner), [])):
                if owner_id != job.id and collision_key(stem) in keys:
                    taken.setdefault(int(rows[i]), {}).setdefault(owner_id, []).append(stem)
        return {jobs[row].index: tuple(_problem(stolen, owner_id, extension(specs[jobs[row].spec]))
                                       for owner_id, stolen in sorted(by_owner.items()))
                for row, by_owner in taken.items()}

    def _owner_records(self, hashes: np.ndarray) -> dict[int, list[tuple[str, set[str]]]]:
        """Id hash -> [(id, collision keys of its stems)] of the current ok records whose id has one of
        ``hashes``, read from the parts that hold them."""
        wanted = np.unique(hashes)
        found: dict[int, list[tuple[str, set[str]]]] = {}
        if self._metadata is None or self._index is None:
            return found
        parts = [self._index.parts[number] for number in sorted(self._index.parts_holding(wanted))]
        for _, table in self._metadata.iter_tables(list(COLUMNS), parts):
            hashed_ids = hash_strings(table.column("id"))
            hit = members(hashed_ids, wanted)
            for record, hashed in zip(table.filter(pa.array(hit)).to_pylist(), hashed_ids[hit]):
                if record["status"] == "ok" and record["outputs"]:
                    keys = {collision_key(stem) for stem in output_stems(record["id"], len(record["outputs"]))}
                    found.setdefault(int(hashed), []).append((record["id"], keys))
        return found


def inside(uri: str, out: str) -> bool:
    """Whether a record's output URI (a file, or a container's ``#`` member) lies under ``out``: what ipaflow
    removes or rewrites for a record must be, whatever a damaged or hostile part says."""
    prefix = out.rstrip("/") + "/"
    rest = uri[len(prefix):] if uri.startswith(prefix) else ""
    parts = rest.split("#", 1)[0].split("/")
    return bool(rest) and not any(part in ("", ".", "..") for part in parts) and "\\" not in rest


def _problem(stems: list[str], owner: str, ext: str) -> Problem:
    shown = ", ".join(stems[:SHOWN_STEMS]) + (f" and {len(stems) - SHOWN_STEMS} more" if len(stems) > SHOWN_STEMS else "")
    verb = "belongs" if len(stems) == 1 else "belong"
    noun = "output" if len(stems) == 1 else "outputs"
    return Problem("id", f"its {noun} {shown} ({ext.lstrip('.')}) {verb} to row {owner} of an earlier run; "
                         "rename this row")
