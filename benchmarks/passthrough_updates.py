"""What updating passthrough values costs when every record changes: a manifest that gains a column.

    python benchmarks/passthrough_updates.py --sizes 100000 1000000 [--rounds 3] [--work DIR]

Per size, an output folder holding that many ``ok`` records (written through ipaflow's journal and fold, with a
passthrough column ``note``) is copied, then, each in a process of its own (wall time and peak RSS of the
process, read with wait4):

- ``rewrite``: the baseline, a fold of a new record for every id (what re-rendering every row costs the
  metadata, without the rendering);
- ``update``: what a run does when the manifest gained a column ``added``: scan the records for their
  passthrough hashes (``passthrough_hashes`` over ``note`` and ``added``), hash the manifest's rows the same
  way and compare (every row differs), journal the updates in files of 4096, and fold them.

Printed per size: medians over ``--rounds`` of each step's seconds, peak RSS and bytes written, and the ratio of
the update's fold to the rewrite's fold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILE_ROWS = 4096


def _records(start: int, stop: int, run: str, **extra_of) -> list[dict]:
    from ipaflow.tasks.metadata_schema import make_record

    return [make_record(job_id=f"row-{i:08d}", spec="sd15-full-face", status="ok", run_id=run, key=f"{i:064x}",
                        outputs=[f"/renders/images/row-{i:08d}.png"], seed=i, params={"prompt": f"prompt {i}"},
                        layout="files", extra={name: make(i) for name, make in extra_of.items()})
            for i in range(start, stop)]


def child_fill(out: str, size: int) -> None:
    from ipaflow.core.storage import Storage
    from ipaflow.tasks.metadata import MetadataStore

    store = MetadataStore(Storage(), out)
    for start in range(0, size, FILE_ROWS):
        store.journal("fill", f"fill-{start:09d}", _records(start, min(size, start + FILE_ROWS), "fill",
                                                            note=lambda i: f"note {i}"))
    store.fold("fill")


def child_rewrite(out: str, size: int) -> dict:
    from ipaflow.core.storage import Storage
    from ipaflow.tasks.metadata import MetadataStore

    store = MetadataStore(Storage(), out)
    started = time.perf_counter()
    for start in range(0, size, FILE_ROWS):
        store.journal("again", f"again-{start:09d}", _records(start, min(size, start + FILE_ROWS), "again",
                                                              note=lambda i: f"note {i}", added=lambda i: i))
    journaled = time.perf_counter()
    folded = store.fold("again")
    return {"journal_s": round(journaled - started, 2), "fold_s": round(time.perf_counter() - journaled, 2),
            "bytes": folded.bytes_written}


def child_update(out: str, size: int) -> dict:
    import numpy as np
    import pyarrow.compute as pc

    from ipaflow.core.hashing import members
    from ipaflow.core.storage import Storage
    from ipaflow.tasks.metadata import MetadataStore
    from ipaflow.tasks.metadata_scans import passthrough_hashes, row_passthrough_hashes

    store = MetadataStore(Storage(), out)
    names = ["added", "note"]
    started = time.perf_counter()
    chunks = []

    def collect(_, table):
        ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False)
        chunks.append(passthrough_hashes(table.filter(ok), names))

    index = store.index(collect, ["status", *names])
    current = np.unique(np.concatenate(chunks))
    scanned = time.perf_counter()
    updated = 0
    for start in range(0, size, FILE_ROWS):
        ids = [f"row-{i:08d}" for i in range(start, min(size, start + FILE_ROWS))]
        values = [{"note": f"note {i}", "added": i} for i in range(start, min(size, start + FILE_ROWS))]
        stale = ~members(row_passthrough_hashes(ids, values, names), current)
        rows = [{"id": row_id, **value} for row_id, value, changed in zip(ids, values, stale) if changed]
        updated += len(rows)
        store.journal_updates("update", f"updates-{start:09d}", rows, names)
    compared = time.perf_counter()
    folded = store.fold("update", index)
    assert updated == size == folded.updated, (updated, size, folded.updated)
    return {"scan_s": round(scanned - started, 2), "compare_and_journal_s": round(compared - scanned, 2),
            "fold_s": round(time.perf_counter() - compared, 2), "bytes": folded.bytes_written}


def _measured(command: list[str]) -> tuple[dict, float, float]:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    output = process.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command} failed")
    return (json.loads(output.strip().splitlines()[-1]) if output.strip() else {}), wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, out, size = args.child
        result = {"fill": child_fill, "rewrite": child_rewrite, "update": child_update}[what](out, int(size))
        print(json.dumps(result or {}), flush=True)
        os._exit(0)  # measured: skip interpreter teardown (an arrow thread pool once aborted it here)
    work = Path(args.work or tempfile.mkdtemp(prefix="ipaflow-passthrough-bench-"))
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    for size in args.sizes:
        base = work / f"records-{size}"
        if not (base / "metadata").exists():
            _measured(me + ["fill", str(base), str(size)])
        metadata_bytes = sum(p.stat().st_size for p in (base / "metadata").glob("*.parquet"))
        runs: dict[str, list[dict]] = {"rewrite": [], "update": []}
        for _ in range(args.rounds):
            for what in runs:
                copy = work / f"{what}-{size}"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(base, copy)
                result, wall, rss = _measured(me + [what, str(copy), str(size)])
                runs[what].append({**result, "wall_s": round(wall, 2), "peak_rss_mb": round(rss)})
                shutil.rmtree(copy)
        medians = {what: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]} for what, rounds in runs.items()}
        ratio = round(medians["update"]["fold_s"] / medians["rewrite"]["fold_s"], 2)
        print(json.dumps({"records": size, "metadata_bytes": metadata_bytes, "rounds": args.rounds, **medians,
                          "update_fold_over_rewrite_fold": ratio}))


if __name__ == "__main__":
    main()
