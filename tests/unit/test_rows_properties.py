"""Property-based: random manifest rows never crash row resolution; every row resolves or fails with
reasons that name a column, on one line each."""

from __future__ import annotations

import json

from hypothesis import given, settings
from property_rows import REGISTRY, rows

from ipaflow.specs.manifest import KNOWN_COLUMNS
from ipaflow.specs.rows import resolve_rows, row_label


@settings(max_examples=300, deadline=None)
@given(rows())
def test_resolving_random_rows_never_crashes(manifest):
    jobs, failed = resolve_rows(manifest, REGISTRY, "/base")
    assert sorted([job.index for job in jobs] + [row.index for row in failed]) == list(range(len(manifest)))
    for row in failed:
        assert row.problems and row.row == row_label(manifest[row.index], row.index)
        for problem in row.problems:
            assert problem.column in KNOWN_COLUMNS and problem.reason
        for line in row.lines():
            assert "\n" not in line
            line.encode("utf-8")  # printable
    for job in jobs:
        json.dumps(job.params, allow_nan=False)
        assert job.id == str(manifest[job.index]["id"])

