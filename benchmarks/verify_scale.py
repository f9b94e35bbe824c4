"""``ipaflow verify`` at dataset scale: the time and peak memory of checking an output folder of N records (one
empty-content output file each, files layout, records in parts of 2048 as a fold writes them), without
``--deep``. Each check runs in a fresh process (its peak RSS is ``ru_maxrss``); --repeats checks, the median
time printed, with the peak RSS above the interpreter's own (the same process importing ipaflow only).

    python benchmarks/verify_scale.py                   # 1,000,000 records
    python benchmarks/verify_scale.py --records 100000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHECK = """
import resource, sys, time
from ipaflow.core.storage import Storage
from ipaflow.flows.verify import verify_folder
if sys.argv[1] != "-":
    start = time.perf_counter()
    problems = verify_folder(sys.argv[1], Storage(), say=lambda line: None)
    print(time.perf_counter() - start, problems)
else:
    print(0.0, 0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def build(out: str, records: int) -> None:
    import pyarrow as pa

    from ipaflow.core.storage import Storage
    from ipaflow.tasks.metadata_fold import PART_ROWS
    from ipaflow.tasks.metadata_schema import CORE_SCHEMA, SCHEMA_FILE, now, to_parquet_bytes

    storage = Storage()
    os.makedirs(os.path.join(out, "images"))
    for start in range(0, records, PART_ROWS):
        numbers = range(start, min(records, start + PART_ROWS))
        ids = [f"row-{number:07d}" for number in numbers]
        uris = [os.path.join(out, "images", f"{row_id}.png") for row_id in ids]
        for uri in uris:
            with open(uri, "wb"):
                pass
        count = len(ids)
        columns = {"id": ids, "spec": ["sdxl-text2img"] * count, "status": ["ok"] * count, "error": [None] * count,
                   "outputs": [[uri] for uri in uris], "seed": list(numbers),
                   "params": ['{"prompt": "a bear"}'] * count, "key": [f"k{n}" for n in numbers],
                   "elapsed_s": [0.1] * count, "batch_size": [1] * count, "finished_at": [now()] * count,
                   "run_id": ["bench"] * count, "layout": ["files"] * count}
        table = pa.table(columns, schema=CORE_SCHEMA)
        storage.write_atomic(os.path.join(out, "metadata", f"part-bench-{start // PART_ROWS:05d}.parquet"),
                             to_parquet_bytes(table))
    storage.write_atomic(os.path.join(out, SCHEMA_FILE), to_parquet_bytes(CORE_SCHEMA.empty_table()))


def check(out: str) -> tuple[float, int, float]:
    lines = subprocess.run([sys.executable, "-c", CHECK, out], capture_output=True, text=True, check=True).stdout
    timing, rss = lines.splitlines()
    seconds, problems = timing.split()
    return float(seconds), int(problems), float(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ipaflow-verify-") as root:
        out = os.path.join(root, "out")
        started = time.perf_counter()
        build(out, args.records)
        print(f"built {args.records:,} records and outputs in {time.perf_counter() - started:.0f} s")
        base = check("-")[2]
        runs = [check(out) for _ in range(args.repeats)]
        assert all(problems == 0 for _, problems, _ in runs), runs
        seconds = statistics.median(s for s, _, _ in runs)
        peak = max(rss for _, _, rss in runs)
        print(f"verify, {args.records:,} records: median {seconds:.1f} s over {args.repeats} "
              f"({args.records / seconds:,.0f} records/s); peak RSS {peak:.0f} MiB, {peak - base:.0f} MiB above "
              f"the interpreter with ipaflow imported ({base:.0f} MiB)")


if __name__ == "__main__":
    main()
