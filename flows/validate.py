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
from ipaflow.flows.open_run import OpenedRun, judge_rows, open_run
from ipaflow.specs.options import RenderOptions
from ipaflow.tasks.inputs import InputFetcher
from ipaflow.tasks.metadata_schema import renamed_columns

WINDOW = 64


def iter_validation(manifest: str, options: RenderOptions = RenderOptions(), check_inputs: bool = True,
                    counted: Callable[[int], None] | None = None,
                    warn: Callable[[str], None] | None = None) -> Iterator[FailedRow]:
    """The failed rows, in manifest order, as the manifest streams; ``counted`` is told the number of rows,
    ``warn`` what the metadata will keep differently from the manifest (a passthrough column renamed)."""
    run = open_run(manifest, options)
    for line in renamed_columns(run.passthrough):
        if warn is not None:
            warn(line)
    for judged in judge_rows(run):
        failed = [rejected.failed for rejected in judged.rejected]
        jobs = [job for job, _ in judged.to_render]
        if check_inputs and jobs:
            failed.extend(_input_problems(run, jobs))
            failed.sort(key=lambda row: row.index)
        yield from failed
    if counted is not None:
        counted(run.census.rows)


def _input_problems(run: OpenedRun, jobs: list) -> list[FailedRow]:
    """The rows that fail once their inputs are read and decoded."""
    failed: list[FailedRow] = []
    specs = {job.spec: run.specs[job.spec] for job in jobs}
    storage = run.storage
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
