"""``ipaflow render --dry-run``: render a sample of each spec into a scratch folder and estimate the run.

Rows are judged as a render into the same ``--out`` judges them (``flows.open_run``): the rows it would reject
and the rows already done there are counted in lines of their own, neither sampled nor estimated.

Per spec, the sample is a warm-up batch (the pipeline build, first-call costs) and three more batches,
each timed on its own; the estimate is the build plus the median seconds per row of the timed batches times the
spec's valid rows, and its spread comes from the fastest and slowest timed batch. Each shard task also costs a
fixed overhead in a real run (the Prefect task, journaling; ``SHARD_OVERHEAD_S``, measured on a 2-core box),
counted per shard. When a sample fails (a pipeline that cannot be built, rows that fail), the reason is printed
and no estimate is given: a number from a broken sample would mislead.
"""

from __future__ import annotations

import gc
import statistics
import tempfile

from ipaflow.flows.open_run import judge_rows, open_run, scan_records
from ipaflow.specs.checks import as_job
from ipaflow.specs.options import RenderOptions
from ipaflow.tasks.metadata import MetadataStore
from ipaflow.tasks.shards import ShardPlan, auto_shard_size
from ipaflow.tasks.worker import RunSettings, run_shard

TIMED_BATCHES = 3  # after one warm-up batch
SHARD_OVERHEAD_S = 0.15  # per shard task in a real run beyond its rows (submission, journal, result)


def _sample(jobs: list, wanted: int) -> list:
    """``wanted`` rows from ``jobs``, repeating them under new ids when the spec has fewer."""
    sample = list(jobs[:wanted])
    copy = 1
    while len(sample) < wanted and jobs:
        sample += [job.model_copy(update={"id": f"{job.id}-dry{copy}"}) for job in jobs[:wanted - len(sample)]]
        copy += 1
    return sample


def estimate_manifest(manifest: str, out: str, options: RenderOptions) -> list[dict]:
    """Judge every row as a render into ``out`` would (``flows.open_run``: the same rules, the same done rows,
    nothing written there), render a sample of each spec's rows to render into a scratch folder, and estimate.

    Returns:
        One dict per spec with rows to render (``spec``, ``rows``, ``sampled``, ``build_s``, ``s_per_row``,
        ``estimate_s``, ``low_s``, ``high_s``, ``problem``), then one for the rows a render would reject and one
        for the rows already done in ``out`` (estimated at 0 s).
    """
    run = open_run(manifest, options)
    wanted = options.batch_size * (1 + TIMED_BATCHES)
    counts: dict[str, int] = {}
    picked: dict[str, list[tuple]] = {}  # per spec, the first rows to render with their keys
    invalid = skipped = 0
    for judged in judge_rows(run, scan_records(run, MetadataStore(run.storage, out))):
        invalid += len(judged.rejected)
        skipped += len(judged.done)
        for job, key in judged.to_render:
            counts[job.spec] = counts.get(job.spec, 0) + 1
            if len(picked.setdefault(job.spec, [])) < wanted:
                picked[job.spec].append((as_job(job), key))
    shard_size = options.shard_size or auto_shard_size(run.census.rows, options.batch_size)
    with tempfile.TemporaryDirectory(prefix="ipaflow-dry-run-") as scratch:
        settings = RunSettings(run_id="dry-run", out=scratch, options=options)
        rows = [_estimate_spec(run.registry.get(name), picked[name], counts[name], wanted, shard_size, settings)
                for name in sorted(counts)]
    return rows + [_line(label, count, estimate_s=0.0, low_s=0.0, high_s=0.0)
                   for label, count in (("(invalid rows)", invalid), ("(already done)", skipped))]


def _line(spec: str, rows: int, **values) -> dict:
    return {"spec": spec, "rows": rows, "sampled": 0, "build_s": None, "s_per_row": None, "estimate_s": None,
            "low_s": None, "high_s": None, "problem": None, **values}


def _estimate_spec(spec, picked: list[tuple], count: int, wanted: int, shard_size: int, settings: RunSettings) -> dict:
    """One spec's line: a sample of its rows rendered, timed per batch after the warm-up, scaled to ``count``."""
    row = _line(spec.name, count)
    keys = {job.id: key for job, key in picked}
    usable = [job for job, _ in picked]
    sample = _sample(usable, wanted)
    sample_keys = {job.id: keys[usable[i % len(usable)].id] for i, job in enumerate(sample)}  # a copy: its source's
    shard = ShardPlan(name=f"dry-run-{spec.name}", spec=spec, jobs=sample, row_keys=sample_keys)
    gc.collect()
    gc.freeze()  # as a run does (ipaflow.flows.cli): a full collection inside a timed batch skews it
    try:
        stats = run_shard(shard, settings)
    finally:
        gc.unfreeze()
    row["sampled"], row["build_s"] = len(sample), round(stats.build_seconds, 2)
    if stats.pipeline_problem is not None:
        row["problem"] = str(stats.pipeline_problem)
        return row
    if stats.failed:
        row["problem"] = f"{stats.failed} of {len(sample)} sample rows failed: {stats.failures[0].error}"
        return row
    ends, sizes = stats.batch_ends, stats.batch_rows
    per_row = [(ends[i] - ends[i - 1]) / sizes[i] for i in range(1, len(ends))]
    if len(per_row) < TIMED_BATCHES:
        row["problem"] = f"only {len(per_row)} batch(es) could be timed after the warm-up"
        return row
    fixed = stats.build_seconds + -(-count // shard_size) * SHARD_OVERHEAD_S
    middle = statistics.median(per_row)
    row.update(s_per_row=round(middle, 4), estimate_s=round(fixed + middle * count, 1),
               low_s=round(fixed + min(per_row) * count, 1), high_s=round(fixed + max(per_row) * count, 1))
    return row


def print_estimate(rows: list[dict]) -> int:
    """Print the table and the total; returns the exit code (1 when a sample failed: no total then)."""
    print(f"{'spec':24} {'rows':>8} {'sampled':>8} {'build s':>8} {'s/row':>8} {'estimate':>10}  spread")
    fmt = lambda v, spec="": "-" if v is None else format(v, spec)  # noqa: E731
    failed = [row for row in rows if row["problem"]]
    for row in rows:
        spread = f"{fmt(row['low_s'], '.0f')}-{fmt(row['high_s'], '.0f')}s" if row["low_s"] is not None else ""
        print(f"{row['spec']:24} {row['rows']:>8} {row['sampled']:>8} {fmt(row['build_s'], '.1f'):>8} "
              f"{fmt(row['s_per_row'], '.3f'):>8} {fmt(row['estimate_s'], '.0f'):>9}s  {spread}")
    for row in failed:
        print(f"cannot estimate spec {row['spec']}: {row['problem']}")
    if failed:
        print("no estimate: the sample failed (see above)")
        return 1
    total = sum(row["estimate_s"] for row in rows)
    low, high = sum(row["low_s"] for row in rows), sum(row["high_s"] for row in rows)
    print(f"estimated total on one worker: {total:.0f}s ({total / 3600:.2f} h; spread {low:.0f}-{high:.0f}s), "
          "excluding start-up")
    return 0
