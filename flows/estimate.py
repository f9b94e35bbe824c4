"""``ipaflow render --dry-run``: render a small sample per spec into a scratch folder, then estimate the time
of the whole manifest (pipeline build once per spec, plus seconds per row measured at the batch size)."""

from __future__ import annotations

import tempfile

from ipaflow.core.storage import Storage
from ipaflow.specs.manifest import open_manifest
from ipaflow.specs.options import RenderOptions
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import resolve_manifest
from ipaflow.tasks.keys import identify_inputs, row_key
from ipaflow.tasks.shards import ShardPlan
from ipaflow.tasks.worker import RunSettings, run_shard


def estimate_manifest(manifest: str, options: RenderOptions) -> list[dict]:
    storage = Storage(options=options.storage_options_dict())
    registry = SpecRegistry(options.specs, storage=storage)
    jobs, bad = resolve_manifest(open_manifest(manifest, storage=storage), registry)
    by_spec: dict[str, list] = {}
    for job in jobs:
        by_spec.setdefault(job.spec, []).append(job)
    identities = identify_inputs(storage, jobs)
    batch_size = options.batch_size
    rows = []
    with tempfile.TemporaryDirectory(prefix="ipaflow-dry-run-") as scratch:
        for name, spec_jobs in sorted(by_spec.items()):
            spec = registry.get(name)
            sample = spec_jobs[:batch_size]
            keys = {}
            for job in sample:
                try:
                    keys[job.id] = row_key(job, spec, identities)
                except Exception:  # noqa: BLE001 - a row with a missing input is not a good sample
                    pass
            sample = [job for job in sample if job.id in keys]
            if not sample:
                rows.append({"spec": name, "rows": len(spec_jobs), "sampled": 0, "build_s": None,
                             "s_per_row": None, "estimate_s": None})
                continue
            settings = RunSettings(run_id="dry-run", out=scratch, options=options)
            stats = run_shard(ShardPlan(name=f"dry-run-{name}", spec=spec, jobs=sample, row_keys=keys), settings)
            per_row = max(stats.seconds - stats.build_seconds, 0.0) / len(sample)
            rows.append({"spec": name, "rows": len(spec_jobs), "sampled": len(sample),
                         "build_s": round(stats.build_seconds, 2), "s_per_row": round(per_row, 3),
                         "estimate_s": round(stats.build_seconds + per_row * len(spec_jobs), 1)})
    rows.append({"spec": "(invalid rows)", "rows": len(bad), "sampled": 0, "build_s": None, "s_per_row": None,
                 "estimate_s": 0.0})
    return rows


def print_estimate(rows: list[dict]) -> None:
    print(f"{'spec':24} {'rows':>7} {'sampled':>8} {'build s':>8} {'s/row':>8} {'estimate':>10}")
    total = 0.0
    for row in rows:
        fmt = lambda v, spec="": "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{row['spec']:24} {row['rows']:>7} {row['sampled']:>8} {fmt(row['build_s'], '.1f'):>8} "
              f"{fmt(row['s_per_row'], '.3f'):>8} {fmt(row['estimate_s'], '.0f'):>9}s")
        total += row["estimate_s"] or 0.0
    print(f"estimated total on one worker: {total:.0f}s ({total / 3600:.2f} h), excluding start-up")
