"""What naming outputs relative to ``--out`` costs the readers of the records, in memory (no storage, no model).

    python benchmarks/relocatable_outputs.py [--records 1000000] [--reps 5]

Builds one Arrow table of ``--records`` ok records (one output each, ``images/<id>.png``; a tenth with two) and
times, median of ``--reps``:

- the done check's pass over it (``tasks.metadata_scans.done_hashes``: output names from each record, relative or
  absolute, looked up in the folder's listing) against the same pass over absolute URIs stripped of ``--out``'s
  prefix, as it was done when records held absolute URIs;
- ``specs.outputs.resolve_outputs``, which turns the names into URIs under ``--out`` for every reader of current
  records (``ipaflow records``, verify, the gallery, the dataset card), against reading the column as it is.

Prints the medians and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = "s3://bucket/renders"


def table(records: int, absolute: bool) -> pa.Table:
    ids = [f"row-{i:08d}" for i in range(records)]
    prefix = OUT + "/" if absolute else ""
    outputs = [[f"{prefix}images/{i}-0.png", f"{prefix}images/{i}-1.png"] if n % 10 == 0 else
               [f"{prefix}images/{i}.png"] for n, i in enumerate(ids)]
    return pa.table({"id": ids, "status": ["ok"] * records, "key": [f"k{n}" for n in range(records)],
                     "outputs": pa.array(outputs, pa.list_(pa.string())), "layout": ["files"] * records})


def prefix_done_hashes(records: pa.Table, out: str, present) -> np.ndarray:
    """The done check as it was with absolute records: ``out``'s prefix stripped (for the comparison only)."""
    from ipaflow.core.hashing import hash_joined

    outputs = records.column("outputs").combine_chunks()
    flat = pc.replace_substring_regex(pc.list_flatten(outputs), "#.*$", "")
    parents = pc.list_parent_indices(outputs).to_numpy(zero_copy_only=False)
    prefix = out.rstrip("/") + "/"
    inside = pc.starts_with(flat, prefix).to_numpy(zero_copy_only=False)
    missing = ~(present(pc.utf8_slice_codeunits(flat, len(prefix))) & inside)
    absent = np.zeros(records.num_rows, dtype=bool)
    np.logical_or.at(absent, parents, missing)
    return hash_joined(records.column("id"), records.column("key"), records.column("layout"))[~absent]


def median_seconds(call, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    from ipaflow.core.hashing import hash_strings, members
    from ipaflow.specs.outputs import resolve_outputs
    from ipaflow.tasks.metadata_scans import done_hashes

    relative, absolute = table(args.records, False), table(args.records, True)
    listing = np.unique(hash_strings(pc.list_flatten(relative.column("outputs").combine_chunks())))

    def present(paths):
        return members(hash_strings(paths), listing)

    assert len(done_hashes(relative, OUT, present)) == args.records
    assert len(prefix_done_hashes(absolute, OUT, present)) == args.records
    new = median_seconds(lambda: done_hashes(relative, OUT, present), args.reps)
    old = median_seconds(lambda: prefix_done_hashes(absolute, OUT, present), args.reps)
    print(f"done check, {args.records} records: names {new:.3f}s, absolute URIs by prefix {old:.3f}s "
          f"(ratio {new / old:.2f})")
    resolved = median_seconds(lambda: resolve_outputs(relative, OUT), args.reps)
    plain = median_seconds(lambda: relative.column("outputs").combine_chunks(), args.reps)
    print(f"outputs resolved under --out: {resolved:.3f}s ({resolved / args.records * 1e9:.0f} ns per record; "
          f"reading the column as it is: {plain:.3f}s)")


if __name__ == "__main__":
    main()
