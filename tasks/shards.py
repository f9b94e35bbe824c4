"""Cutting the rows to render into shards: one Prefect task each, sized to keep the task count sane.

Rows are grouped by spec (a worker swaps pipelines only between groups) and, within a spec, ordered so that
rows which can share a pipeline call sit next to each other.
"""

from __future__ import annotations

import math
from collections import defaultdict

from pydantic import BaseModel

from ipaflow.specs.rows import Job
from ipaflow.specs.spec import Spec

TARGET_SHARDS = 128  # about this many tasks for a large manifest
MAX_SHARD_ROWS = 1024


class ShardPlan(BaseModel):
    name: str  # render-<spec>-<n>
    spec: Spec
    jobs: list[Job]
    row_keys: dict[str, str]  # id -> key (a field named `keys` would confuse dict(model))


def auto_shard_size(num_rows: int, batch_size: int) -> int:
    """Rows per shard: a few batches at least, about TARGET_SHARDS shards for big manifests."""
    size = max(batch_size * 4, math.ceil(num_rows / TARGET_SHARDS))
    size = math.ceil(size / batch_size) * batch_size
    return min(size, max(MAX_SHARD_ROWS, batch_size))


def plan_shards(jobs: list[Job], specs: dict[str, Spec], keys: dict[str, str], batch_size: int,
                shard_size: int | None = None) -> list[ShardPlan]:
    by_spec: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        by_spec[job.spec].append(job)
    size = shard_size or auto_shard_size(len(jobs), batch_size)
    shards = []
    for spec_name in sorted(by_spec):
        ordered = sorted(by_spec[spec_name], key=lambda job: (job.call_group(), job.index))
        for number, start in enumerate(range(0, len(ordered), size)):
            chunk = ordered[start:start + size]
            shards.append(
                ShardPlan(
                    name=f"render-{spec_name}-{number}",
                    spec=specs[spec_name],
                    jobs=chunk,
                    row_keys={job.id: keys[job.id] for job in chunk},
                )
            )
    return shards
