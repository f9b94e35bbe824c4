"""Fail fast on a spec that cannot load: the worker remembers, per run, a pipeline that failed to build, so the
run's other shards of that spec fail at once with the same reason; a transient storage error is raised instead,
so that the task is retried."""

from __future__ import annotations

import pytest

from ipaflow.core.problems import Problem
from ipaflow.core.storage import TransientStorageError
from ipaflow.specs.registry import SpecRegistry
from ipaflow.tasks import worker
from ipaflow.tasks.shards import ShardPlan


class _Pipelines:
    def __init__(self, error: Exception):
        self.error, self.calls = error, 0

    def get(self, spec, models):
        self.calls += 1
        raise self.error


def _shard() -> ShardPlan:
    return ShardPlan(name="render-x-0", spec=SpecRegistry().get("sdxl-text2img"), jobs=[], row_keys={})


def test_a_build_failure_is_remembered_for_the_run(monkeypatch):
    pipelines = _Pipelines(OSError("Unable to load weights from checkpoint file"))
    monkeypatch.setattr(worker, "PIPELINES", pipelines)
    settings = worker.RunSettings(run_id="run-a", out="/tmp/none")
    first = worker._build(_shard(), settings, str)
    again = worker._build(_shard(), settings, str)
    assert isinstance(first, Problem) and first == again and pipelines.calls == 1
    assert first.column == "pipeline" and "Unable to load weights" in first.reason
    other_run = worker._build(_shard(), worker.RunSettings(run_id="run-b", out="/tmp/none"), str)
    assert other_run == first and pipelines.calls == 2  # a new run tries again (the user may have fixed it)


@pytest.mark.parametrize("error", [TransientStorageError("read s3://m/unet: still failing after 6 tries"),
                                   ConnectionResetError(104, "Connection reset by peer")])
def test_a_transient_storage_error_is_retried_not_remembered(monkeypatch, error):
    pipelines = _Pipelines(error)
    monkeypatch.setattr(worker, "PIPELINES", pipelines)
    settings = worker.RunSettings(run_id="run-c", out="/tmp/none")
    for _ in range(2):
        with pytest.raises(type(error)):
            worker._build(_shard(), settings, str)
    assert pipelines.calls == 2
