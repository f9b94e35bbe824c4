"""Names and paths an operator reads days later: a local manifest and --out recorded absolute in a
deployment's parameters (URIs as given), and the --out a scheduled run writes to resolved for serve's log."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from types import SimpleNamespace


def test_a_deployment_records_local_paths_absolute_and_uris_as_given(tmp_path, monkeypatch):
    from ipaflow.flows.serve import deployment_parameters
    from ipaflow.specs.options import RenderOptions

    monkeypatch.chdir(tmp_path)
    local = deployment_parameters("nightly.parquet", "renders/{date}", RenderOptions())
    assert (local["manifest"], local["out"]) == (str(tmp_path / "nightly.parquet"), str(tmp_path / "renders/{date}"))
    remote = deployment_parameters("s3://bucket/nightly.parquet", "s3://bucket/renders/{date}", RenderOptions())
    assert (remote["manifest"], remote["out"]) == ("s3://bucket/nightly.parquet", "s3://bucket/renders/{date}")


def test_serve_logs_the_out_a_run_writes_to():
    from ipaflow.flows.serve import resolved_out

    run = SimpleNamespace(parameters={"out": "renders/{date}"}, start_time=None,
                          expected_start_time=datetime(2026, 12, 4, 2, 0, tzinfo=timezone.utc))
    assert resolved_out(run) == os.path.abspath("renders/2026-12-04")
