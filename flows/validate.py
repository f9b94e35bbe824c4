"""``ipaflow validate``: every check that ``render`` makes before rendering, plus reading and decoding every
input, without loading a model (torch is imported only where a spec leaves a checked parameter to its
pipeline's default: ``tasks.call_defaults``). One problem per line: ``row id, column, reason``;
the reasons are the ones ``render`` records for the same rows.

It streams like a run: the census (duplicate ids, colliding outputs), then the rows batch by batch (vectorised
checks first, the exact ones where those cannot vouch), printing problems in manifest order as they are found.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ipaflow.core.problems import FailedRow, RowFailed
from ipaflow.core.storage import Storage
from ipaflow.specs.census import take_census
from ipaflow.specs.manifest import open_manifest
from ipaflow.specs.options import RenderOptions
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.stream import resolve_stream
from ipaflow.tasks.call_defaults import denoising_failures
from ipaflow.tasks.inputs import InputFetcher
from ipaflow.tasks.metadata import passthrough_names, renamed_columns

WINDOW = 64


def iter_validation(manifest: str, options: RenderOptions = RenderOptions(), check_inputs: bool = True,
                    counted: Callable[[int], None] | None = None,
                    warn: Callable[[str], None] | None = None) -> Iterator[FailedRow]:
    """The failed rows, in manifest order, as the manifest streams; ``counted`` is told the number of rows,
    ``warn`` what the metadata will keep differently from the manifest (a passthrough column renamed)."""
    storage = Storage(options=options.storage_options_dict())
    registry = SpecRegistry(options.specs, storage=storage)
    opened = open_manifest(manifest, storage=storage)
    for line in renamed_columns(passthrough_names(opened.columns)):
        if warn is not None:
            warn(line)
    census = take_census(opened, registry)
    for resolved in resolve_stream(opened, registry, census, build=check_inputs):
        failed = list(resolved.failed)
        if check_inputs and resolved.jobs:
            failed.extend(_input_problems(storage, registry, resolved.jobs, options.models))
            failed.sort(key=lambda row: row.index)
        yield from failed
    if counted is not None:
        counted(census.rows)


def _input_problems(storage: Storage, registry: SpecRegistry, jobs, models_dir: str | None) -> list[FailedRow]:
    """The rows that fail once their inputs are read and decoded, or with their pipeline's defaults."""
    specs = {job.spec: registry.get(job.spec) for job in jobs}
    broken = denoising_failures(jobs, specs, models_dir)
    failed = [FailedRow(row=job.id, problems=(broken[job.index],), index=job.index, spec=job.spec)
              for job in jobs if job.index in broken]
    jobs = [job for job in jobs if job.index not in broken]
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
    return failed


def validate_manifest(manifest: str, options: RenderOptions = RenderOptions(),
                      check_inputs: bool = True) -> tuple[list[FailedRow], int]:
    """The failed rows, in manifest order, and the number of rows checked (all failures in a list: small
    manifests and tests; the command line streams with ``iter_validation``)."""
    rows: list[int] = []
    failed = list(iter_validation(manifest, options, check_inputs, rows.append))
    return failed, rows[0]
