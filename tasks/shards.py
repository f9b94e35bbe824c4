"""Cutting the rows to render into shards: one Prefect task each, sized to keep the task count sane.

Rows are grouped by spec (a worker swaps pipelines only between groups) and, within a spec, ordered so that
rows which can share a pipeline call sit next to each other.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

from pydantic import BaseModel

from specs.jobs import Job
from specs.spec import Spec

# Rows per pipeline call unless told otherwise: 8 measured 2-4x the throughput of single rows on a CPU and on
# an H200; a batch that does not fit in GPU memory is split (and the smaller size remembered).
DEFAULT_BATCH_SIZE = 8
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


def _compat_order(job: Job) -> str:
    """Rows with equal values here can usually share a call (inputs decide the rest at render time)."""
    params = {k: v for k, v in job.params.items() if k not in ("prompt", "negative_prompt")}
    params["has_negative"] = job.params.get("negative_prompt") is not None
    params["solo"] = job.num_images > 1 or "ip_mask" in job.inputs
    return json.dumps(params, sort_keys=True)


def plan_shards(jobs: list[Job], specs: dict[str, Spec], keys: dict[str, str], batch_size: int,
                shard_size: int | None = None) -> list[ShardPlan]:
    by_spec: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        by_spec[job.spec].append(job)
    size = shard_size or auto_shard_size(len(jobs), batch_size)
    shards = []
    for spec_name in sorted(by_spec):
        ordered = sorted(by_spec[spec_name], key=lambda job: (_compat_order(job), job.index))
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
