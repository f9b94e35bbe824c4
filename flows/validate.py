"""``ipaflow validate``: every check that ``render`` makes before rendering, plus reading and decoding every
input, without loading a model (nothing here imports torch). One problem per line: ``row id, column, reason``;
the reasons are the ones ``render`` records for the same rows."""

from __future__ import annotations

from specs.jobs import Problem, resolve_manifest
from specs.manifest import open_manifest
from specs.registry import SpecRegistry
from tasks.inputs import InputError, InputFetcher
from tasks.storage import Storage

WINDOW = 64


def validate_manifest(manifest: str, spec_dirs: list[str] | None = None, storage_options: dict | None = None,
                      check_inputs: bool = True) -> tuple[list[Problem], int]:
    """The problems of every row, in manifest order, and the number of rows checked."""
    storage = Storage(options=storage_options or {})  # first: it registers the secrets that messages redact
    registry = SpecRegistry(spec_dirs or [], storage_options=storage_options)
    opened = open_manifest(manifest, storage_options=storage_options)
    jobs, bad = resolve_manifest(opened, registry)
    found = [problem for _, problems in bad for problem in problems]
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
                    except InputError as exc:
                        found.append(Problem(job.id, exc.column, exc.reason, job.index))
        finally:
            fetcher.close()
    found.sort(key=lambda problem: problem.index)  # stable: a row's own problems keep their order
    return found, opened.num_rows
