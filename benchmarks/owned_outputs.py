"""What the rule "a row may not take another id's output" (``ipaflow.tasks.owners``) costs a run at scale.

    python benchmarks/owned_outputs.py --records 1000000 [--rounds 5]

Records in parts of 2048 (``tasks.metadata_fold.PART_ROWS``), a quarter with ``num_images: 4``, the rest with one:

- ``build``: ``OwnedOutputs.add`` over every part then ``seal`` (what a run adds to its start-up scan of the
  records), seconds, and the bytes the sealed arrays hold;
- ``lookup``: ``OwnedOutputs.problems`` over every id re-rendered in batches of 4096 (each row finds its own
  outputs: the common re-run after a change of parameters), seconds;
- ``baseline``: the same batches' stems built and hashed only (what any per-stem check costs), seconds.

Medians over ``--rounds``; the ratio lookup / baseline says what the owner check adds over merely naming the stems.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyarrow as pa

from ipaflow.core.hashing import hash_strings
from ipaflow.specs.outputs import collision_keys, output_stems
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import Job
from ipaflow.tasks.owners import OwnedOutputs

PART_ROWS = 2048
BATCH = 4096


def parts(records: int) -> list[pa.Table]:
    tables = []
    for start in range(0, records, PART_ROWS):
        ids = [f"row-{i:09d}" for i in range(start, min(records, start + PART_ROWS))]
        outputs = [[f"/o/images/{i}.png"] if n % 4 else [f"/o/images/{i}-{k}.png" for k in range(4)]
                   for n, i in enumerate(ids)]
        tables.append(pa.table({"id": ids, "status": ["ok"] * len(ids), "outputs": outputs}))
    return tables


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tables = parts(args.records)
    specs = {"sdxl-text2img": SpecRegistry().get("sdxl-text2img")}
    batches = []
    for table in tables:
        ids = table.column("id").to_pylist()
        counts = [len(o) for o in table.column("outputs").to_pylist()]
        batches.append([Job.model_construct(id=i, spec="sdxl-text2img", index=0, seed=0, params={"num_images": c},
                                            inputs={}, extra={}) for i, c in zip(ids, counts)])
    jobs = [job for batch in batches for job in batch]
    batches = [jobs[start:start + BATCH] for start in range(0, len(jobs), BATCH)]
    build, lookup, baseline = [], [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        owned = OwnedOutputs()
        for table in tables:
            owned.add(table)
        owned.seal(None, None)
        build.append(time.perf_counter() - started)
        started = time.perf_counter()
        assert not any(owned.problems(batch, specs) for batch in batches)
        lookup.append(time.perf_counter() - started)
        started = time.perf_counter()
        for batch in batches:
            stems = [s for job in batch for s in output_stems(job.id, job.params["num_images"])]
            hash_strings(collision_keys(pa.array(stems, type=pa.string())))
        baseline.append(time.perf_counter() - started)
    held = owned.stems.nbytes + owned.owners.nbytes
    print(f"{args.records} records, {len(owned)} owned outputs, {held / 1e6:.1f} MB held "
          f"({held / len(owned):.0f} bytes per output)")
    b, lk, base = (statistics.median(v) for v in (build, lookup, baseline))
    print(f"build {b:.2f}s  lookup {lk:.2f}s  baseline {base:.2f}s  lookup/baseline {lk / base:.2f} "
          f"(medians of {args.rounds})")


if __name__ == "__main__":
    main()
