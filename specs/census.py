"""The whole-manifest rules, decided before rows stream: duplicate ids and colliding outputs.

A row can only be judged alone except for these two rules, so they get a pass of their own over the columns
that decide them (``id``, ``spec``, ``num_images``): each id and each output stem becomes one uint64 (their
``collision_key``, hashed), and sorting those finds the candidates. Only when there are candidates are the
rows concerned read again and judged exactly, with the reference rules of ``specs.rows`` (string equality, the
row's own checks); the result is the small map ``offenders``: manifest index -> what the streaming pass adds to
that row's problems. Memory: ~9 bytes per row, whatever the ids.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ipaflow.core.hashing import hash_strings, members, repeated
from ipaflow.core.problems import Problem, RowFailed
from ipaflow.specs.checks import ids_ok, spec_numbers
from ipaflow.specs.manifest import Manifest, RowBatch
from ipaflow.specs.outputs import collision_key, output_stems
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import check_id, colliding_outputs, duplicate_problem, integral, resolve_row, row_label

CENSUS_COLUMNS = ("id", "spec", "num_images")


@dataclass
class ManifestWideProblems:
    """What the whole-manifest rules add to one row: a duplicate id (prepended to its problems), or colliding
    outputs (the row is otherwise valid: these are its problems)."""

    duplicate: Problem | None = None
    collisions: list[Problem] = field(default_factory=list)


@dataclass
class Census:
    rows: int
    offenders: dict[int, ManifestWideProblems]
    specs: Counter  # rows per spec cell naming a known spec


def _canonical_ids(batch: RowBatch) -> tuple[list[str | None], np.ndarray]:
    """Each row's id as ``check_id`` returns it (None when the id is unusable), and which rows have one."""
    n = batch.num_rows
    column = batch.columns.get("id")
    ok = ids_ok(column, n)
    values = batch.values("id")
    ids: list[str | None] = [None] * n
    for offset in range(n):
        if ok[offset]:
            ids[offset] = str(values[offset])
        elif values[offset] is not None:
            try:
                ids[offset] = check_id(values[offset])
                ok[offset] = True
            except RowFailed:
                pass
    return ids, ok


def _output_counts(batch: RowBatch, registry: SpecRegistry, names: list[str], numbers: np.ndarray) -> np.ndarray:
    """How many outputs each row would write if it were valid (a row that is not valid writes none, so any
    count is as good as another for it)."""
    n = batch.num_rows
    counts = np.ones(n, dtype=np.int64)
    column = batch.columns.get("num_images")
    cells = batch.values("num_images") if column is not None else None
    for position in np.unique(numbers[numbers >= 0]):
        spec = registry.get(names[int(position)])
        if spec.profile.output == "video" or "num_images" not in spec.profile.all_params:
            continue
        default = int(spec.default_params().get("num_images") or 1)
        rows = np.flatnonzero(numbers == position)
        if cells is None:
            counts[rows] = default
            continue
        for offset in rows:
            value = cells[offset]
            if value is None:
                counts[offset] = default
                continue
            try:
                count = integral("num_images", value)
            except RowFailed:
                continue
            counts[offset] = count if 1 <= count <= 64 else 1
    return counts


def take_census(manifest: Manifest, registry: SpecRegistry, limit: int | None = None) -> Census:
    """One pass over ``id``, ``spec`` and ``num_images``; a second, over the candidate rows only, when some
    ids or output stems share a hash."""
    id_hashes, id_valid, single = [], [], []
    stem_hashes, stem_rows = [], []
    spec_counts: Counter = Counter()
    rows = 0
    for batch in manifest.iter_batches(columns=CENSUS_COLUMNS):
        n = batch.num_rows
        rows += n
        ids, ok = _canonical_ids(batch)
        id_hashes.append(hash_strings([collision_key(i) if i is not None else "" for i in ids]))
        id_valid.append(ok)
        names, numbers = spec_numbers(batch.columns.get("spec"), registry, n)
        for position, count in zip(*np.unique(numbers[numbers >= 0], return_counts=True)):
            spec_counts[names[int(position)]] += int(count)
        counts = _output_counts(batch, registry, names, numbers)
        known = ok & (numbers >= 0)
        single.append(known & (counts == 1))
        for offset in np.flatnonzero(known & (counts > 1)):
            stems = output_stems(ids[offset], int(counts[offset]))
            stem_hashes.append(hash_strings([collision_key(stem) for stem in stems]))
            stem_rows.append(np.full(len(stems), batch.start + offset, dtype=np.int64))
    hashes = np.concatenate(id_hashes) if id_hashes else np.zeros(0, np.uint64)
    valid = np.concatenate(id_valid) if id_valid else np.zeros(0, bool)
    singles = np.concatenate(single) if single else np.zeros(0, bool)
    multi = np.concatenate(stem_hashes) if stem_hashes else np.zeros(0, np.uint64)
    multi_rows = np.concatenate(stem_rows) if stem_rows else np.zeros(0, np.int64)

    duplicated = repeated(hashes[valid])
    stems = np.concatenate([hashes[singles], multi])
    clashing = np.intersect1d(repeated(stems), multi) if len(multi) else np.zeros(0, np.uint64)
    candidates = set(np.flatnonzero(valid & members(hashes, duplicated)).tolist())
    candidates |= set(np.flatnonzero(singles & members(hashes, clashing)).tolist())
    candidates |= set(multi_rows[members(multi, clashing)].tolist())
    del hashes, valid, singles, multi, multi_rows
    offenders = _judge(manifest, registry, candidates) if candidates else {}
    return Census(rows=rows if limit is None else min(rows, limit), offenders=offenders, specs=spec_counts)


def _judge(manifest: Manifest, registry: SpecRegistry, candidates: set[int]) -> dict[int, ManifestWideProblems]:
    """The exact rules of ``specs.rows.resolve_rows`` over the candidate rows (every row that can share an id
    or a stem with another is among them)."""
    picked: dict[int, dict] = {}
    bases: dict[int, str] = {}
    ordered = sorted(candidates)
    for batch in manifest.iter_batches():
        if batch.start > ordered[-1]:
            break
        low, high = bisect_left(ordered, batch.start), bisect_left(ordered, batch.start + batch.num_rows)
        for index in ordered[low:high]:
            picked[index] = batch.row(index - batch.start)
            bases[index] = batch.base
    groups: dict[str, list[int]] = {}
    labels: dict[int, str] = {}
    for index in sorted(picked):
        label = row_label(picked[index], index)
        if not label.startswith("#"):
            groups.setdefault(collision_key(label), []).append(index)
            labels[index] = label
    offenders: dict[int, ManifestWideProblems] = {}
    for where in groups.values():
        if len(where) > 1:
            for index in where:
                offenders[index] = ManifestWideProblems(duplicate=duplicate_problem(where, [labels[i] for i in where],
                                                                                     _positions(manifest, where)))
    jobs = []
    for index in sorted(picked):
        if index in offenders:
            continue
        try:
            jobs.append(resolve_row(picked[index], index, registry, bases[index]))
        except RowFailed:
            continue
    for index, problems in colliding_outputs(jobs, registry, manifest.where if manifest.folder else None).items():
        offenders[index] = ManifestWideProblems(collisions=problems)
    return offenders


def _positions(manifest: Manifest, indexes: list[int]) -> list[str] | None:
    """Where rows of a folder manifest lie (file and row), for the messages; None for a one-file manifest."""
    where = [manifest.where(index) for index in indexes]
    return None if None in where else where
