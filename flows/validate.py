"""``ipaflow validate``: every check that ``render`` makes before rendering, plus reading and decoding every
input, without loading a model (nothing here imports torch). One problem per line: ``row id, column, reason``;
the reasons are the ones ``render`` records for the same rows."""

from __future__ import annotations

from ipaflow.core.problems import FailedRow, RowFailed
from ipaflow.core.storage import Storage
from ipaflow.specs.manifest import open_manifest
from ipaflow.specs.options import RenderOptions
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import resolve_manifest
from ipaflow.tasks.inputs import InputFetcher

WINDOW = 64


def validate_manifest(manifest: str, options: RenderOptions = RenderOptions(),
                      check_inputs: bool = True) -> tuple[list[FailedRow], int]:
    """The failed rows, in manifest order, and the number of rows checked."""
    storage = Storage(options=options.storage_options_dict())
    registry = SpecRegistry(options.specs, storage=storage)
    opened = open_manifest(manifest, storage=storage)
    jobs, failed = resolve_manifest(opened, registry)
    if check_inputs and jobs:
        specs = {job.spec: registry.get(job.spec) for job in jobs}
        fetcher = InputFetcher(storage, jobs, specs)
        try:
            for start in range(0, len(jobs), WINDOW):
                window = jobs[start:start + WINDOW]
                fetcher.prefetch(window)
                for job in window:
                    try:
                        fetcher.get(job)
                    except RowFailed as exc:
                        failed.append(FailedRow(row=job.id, problems=exc.problems, index=job.index, spec=job.spec))
        finally:
            fetcher.close()
    failed.sort(key=lambda row: row.index)
    return failed, opened.num_rows
