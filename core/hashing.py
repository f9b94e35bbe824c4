"""64-bit hashes of many strings at once, for the whole-manifest rules and the records index.

At dataset scale the flow may not hold millions of ids or keys as Python strings, but it may hold one uint64
per row (10M rows: 80 MB). ``hash_strings`` hashes an Arrow string array in numpy, one byte position at a
time over the whole batch (FNV-1a over the bytes and the length, then the splitmix64 finaliser), at ~1 s per
10M short ids on one core.

A 64-bit hash is a filter, not a proof: code that must be exact (duplicate ids, colliding outputs) treats equal
hashes as candidates and compares the strings themselves. Where a hash alone decides (the records index: is
this id's record superseded, is this (id, key) done), two different strings share a hash with a probability of
about n*m / 2**64 for n rows against m records (1M x 1M: 5e-8 per run).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_CHUNK = 1 << 16


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))
        h = h * np.uint64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> np.uint64(27))
        h = h * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _hash_chunk(array: pa.Array) -> np.ndarray:
    _, offsets_buffer, data_buffer = array.buffers()
    width = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=width)[array.offset:array.offset + len(array) + 1].astype(np.int64)
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(array), _FNV_OFFSET, dtype=np.uint64)
    longest = int(lengths.max()) if len(lengths) else 0
    with np.errstate(over="ignore"):
        for position in range(longest):
            active = lengths > position
            if active.all():
                h = (h ^ data[starts + position]) * _FNV_PRIME
            else:
                where = np.flatnonzero(active)
                h[where] = (h[where] ^ data[starts[where] + position]) * _FNV_PRIME
        h = (h ^ lengths.astype(np.uint64)) * _FNV_PRIME
    return _mix(h)


def hash_strings(values) -> np.ndarray:
    """One uint64 per string of ``values`` (an Arrow string array, chunked array, or a list of str). Nulls
    hash like the empty string: mask them yourself where that matters."""
    if isinstance(values, pa.ChunkedArray):
        return np.concatenate([hash_strings(chunk) for chunk in values.chunks]) if values.num_chunks else \
            np.zeros(0, np.uint64)
    if not isinstance(values, pa.Array):
        values = pa.array(values, type=pa.string())
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = pc.cast(values, pa.string())
    values = values.fill_null("") if values.null_count else values
    return np.concatenate([_hash_chunk(values.slice(start, _CHUNK)) for start in range(0, len(values), _CHUNK)]) \
        if len(values) else np.zeros(0, np.uint64)


def hash_joined(*columns, separator: str = "\x00") -> np.ndarray:
    """Hash of the columns joined row by row with ``separator`` (a NUL: no id, key or name holds one)."""
    arrays = [c if isinstance(c, (pa.Array, pa.ChunkedArray)) else pa.array(c, type=pa.string()) for c in columns]
    arrays = [pc.cast(a, pa.string()).fill_null("") for a in arrays]
    return hash_strings(pc.binary_join_element_wise(*arrays, separator))


def members(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Boolean mask: which ``values`` occur in ``sorted_set`` (a sorted uint64 array)."""
    if not len(sorted_set) or not len(values):
        return np.zeros(len(values), dtype=bool)
    where = np.searchsorted(sorted_set, values)
    where[where == len(sorted_set)] = 0
    return sorted_set[where] == values


def repeated(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values that occur more than once."""
    if len(values) < 2:
        return np.zeros(0, dtype=values.dtype)
    ordered = np.sort(values)
    same = ordered[1:] == ordered[:-1]
    return np.unique(ordered[1:][same])


def hash_combine(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """One uint64 per row from two hashes of it, order-sensitive (the hash of a tuple, column by column)."""
    with np.errstate(over="ignore"):
        return _mix(left * _FNV_PRIME ^ _mix(right + np.uint64(0x9E3779B97F4A7C15)))
