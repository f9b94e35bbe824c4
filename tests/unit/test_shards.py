"""Shard sizing: big manifests become tens to hundreds of Prefect tasks, never one task per row."""

from __future__ import annotations

import math

import pytest

from ipaflow.tasks.shards import ShardCutter, auto_shard_size


def plan_shards(jobs, specs, keys, batch_size, shard_size=None):
    """All shards of a list of jobs at once, cut as a run cuts them."""
    cutter = ShardCutter(specs, shard_size or auto_shard_size(len(jobs), batch_size))
    return [shard for job in jobs for shard in cutter.add(job, keys[job.id])] + cutter.flush()


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_task_count_stays_sane(batch_size):
    for rows in (1, 7, 100, 1_000, 2_500, 5_000, 20_000, 100_000, 1_000_000):
        size = auto_shard_size(rows, batch_size)
        tasks = math.ceil(rows / size)
        assert size % batch_size == 0, (rows, size)  # whole batches: no ragged pipeline call per shard
        assert size >= 4 * batch_size  # a shard amortises the task's fixed cost over a few batches
        if rows >= 1_000:
            assert 10 <= tasks <= 1_000, (rows, tasks)
        if 1_000 <= rows <= 100_000:
            assert tasks <= 200, (rows, tasks)


def test_plan_of_a_big_two_spec_manifest():
    from ipaflow.specs.registry import SpecRegistry
    from ipaflow.specs.rows import resolve_rows

    specs = ["sdxl-text2img", "sd15-plus-face"]
    rows = [{"id": f"row-{i:05d}", "spec": specs[i % 7 == 0], "prompt": f"p{i}", "ip_image": f"/in/{i % 5}.png",
             "num_inference_steps": 2 + i % 2} for i in range(3_000)]
    registry = SpecRegistry([])
    jobs, bad = resolve_rows(rows, registry)
    assert not bad and len(jobs) == 3_000
    keys = {job.id: f"key-{job.id}" for job in jobs}
    shards = plan_shards(jobs, {name: registry.get(name) for name in specs}, keys, batch_size=4)

    assert 10 <= len(shards) <= 200
    seen = [job.id for shard in shards for job in shard.jobs]
    assert sorted(seen) == sorted(keys)  # every row in exactly one shard
    size = auto_shard_size(3_000, 4)
    for shard in shards:
        assert {job.spec for job in shard.jobs} == {shard.spec.name}  # a worker swaps pipelines between shards only
        assert len(shard.jobs) <= size
        assert shard.row_keys == {job.id: keys[job.id] for job in shard.jobs}
    for spec in specs:
        names = [s.name for s in shards if s.spec.name == spec]
        assert names == [f"render-{spec}-{n}" for n in range(len(names))]
    steps = [job.params["num_inference_steps"] for job in shards[0].jobs]
    assert steps == sorted(steps)  # rows that can share a pipeline call sit together
