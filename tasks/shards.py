"""Cutting the rows to render into shards: one Prefect task each, sized to keep the task count sane.

Rows are grouped by spec (a worker swaps pipelines only between groups) and, within a shard, ordered so that
rows which can share a pipeline call sit next to each other. ``ShardCutter`` does it as rows stream: one
buffer per spec, a shard out as soon as a buffer is full, so the first shard leaves long before the manifest
is read, and at most (specs + 1) shards of rows are held.
"""

from __future__ import annotations

import math
from collections import defaultdict

from pydantic import BaseModel

from ipaflow.specs.outputs import DEFAULT_LAYOUT, layout_of
from ipaflow.specs.rows import Job
from ipaflow.specs.spec import Spec

TARGET_SHARDS = 128  # about this many tasks for a large manifest
MAX_SHARD_ROWS = 1024


class ShardPlan(BaseModel):
    name: str  # render-<spec>-<n>
    spec: Spec
    jobs: list[Job]
    row_keys: dict[str, str]  # id -> key (a field named `keys` would confuse dict(model))
    layout: str = DEFAULT_LAYOUT  # where its outputs go (specs.outputs)
    manifests: dict[str, str] = {}  # id -> the manifest file the row came from (its records' ``manifest``)


def auto_shard_size(num_rows: int, batch_size: int) -> int:
    """Rows per shard: a few batches at least, about TARGET_SHARDS shards for big manifests."""
    size = max(batch_size * 4, math.ceil(num_rows / TARGET_SHARDS))
    size = math.ceil(size / batch_size) * batch_size
    return min(size, max(MAX_SHARD_ROWS, batch_size))


class ShardCutter:
    """Rows in, shards out: ``add`` returns the shards its rows filled; ``flush`` the partly filled ones."""

    def __init__(self, specs: dict[str, Spec], size: int, layout: str | None = None):
        self.specs, self.size, self.layout = specs, size, layout
        self._buffers: dict[str, list[tuple[Job, str]]] = defaultdict(list)
        self._numbers: dict[str, int] = defaultdict(int)

    def _cut(self, spec_name: str, rows: list[tuple[Job, str]]) -> ShardPlan:
        rows = sorted(rows, key=lambda item: (item[0].call_group(), item[0].index))
        number = self._numbers[spec_name]
        self._numbers[spec_name] += 1
        spec = self.specs[spec_name]
        return ShardPlan(name=f"render-{spec_name}-{number}", spec=spec, jobs=[j for j, _ in rows],
                         row_keys={j.id: k for j, k in rows}, layout=layout_of(spec, self.layout))

    def add(self, job: Job, key: str) -> list[ShardPlan]:
        buffer = self._buffers[job.spec]
        buffer.append((job, key))
        if len(buffer) < self.size:
            return []
        self._buffers[job.spec] = []
        return [self._cut(job.spec, buffer)]

    def flush(self) -> list[ShardPlan]:
        shards = [self._cut(name, rows) for name, rows in sorted(self._buffers.items()) if rows]
        self._buffers.clear()
        return shards

