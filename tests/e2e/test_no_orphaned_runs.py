"""No run left Running: a render ended by SIGTERM (as by a scheduler or `kill`) leaves its flow run and every
task run of it Cancelled, with a message saying how far it got, and the progress artifact says the same; a
render killed without a word (SIGKILL) is marked Crashed by the next run into its --out. Read back from a real
Prefect API (the session's test harness server). Ctrl-C: tests/e2e/test_clean_stop.py."""

from __future__ import annotations

import os
import signal
import threading
import time

from util import slow_manifest, start_until_first_image


def _render_until_the_first_image(tmp_path, inputs_dir, name: str):
    """``ipaflow render`` of 40 slow rows in a session of its own, against the test's Prefect API, returned once
    its first image is written: (manifest, out, process)."""
    from prefect.settings import PREFECT_API_URL

    manifest = slow_manifest(tmp_path / f"{name}.parquet", inputs_dir)
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "IPAFLOW_LIVE_UPDATES": "1"}
    render = start_until_first_image(["render", str(manifest), "--out", str(out), "--batch-size", "2"], env, out)
    return manifest, out, render


def _run_when_deployed(name: str, ran: list, timeout: float = 240) -> None:
    """Once the deployment ``name`` exists, one run of it (appended to ``ran``)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                deployment = client.read_deployment_by_name(name)
            except Exception:  # noqa: BLE001 - not created yet
                time.sleep(0.5)
                continue
            ran.append(client.create_flow_run_from_deployment(deployment.id))
            return


def _flow_run(client, manifest_name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(
        all_=[f"manifest:{manifest_name}"])))
    return run


def _task_runs(client, run):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert tasks, "no shard task run"
    assert all(task.state.is_final() for task in tasks), [(t.name, t.state.type) for t in tasks]
    return tasks


def test_sigterm_leaves_the_flow_run_and_its_task_runs_cancelled(tmp_path, models_env, inputs_dir, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    manifest, out, render = _render_until_the_first_image(tmp_path, inputs_dir, "orphan-check")
    os.killpg(render.pid, signal.SIGTERM)
    terminated = time.monotonic()
    _, stderr = render.communicate(timeout=60)
    assert render.returncode == 143, stderr
    assert time.monotonic() - terminated < 10

    with get_client(sync_client=True) as client:
        run = _flow_run(client, "orphan-check")
        assert run.state.type.value == "CANCELLED", (run.state, stderr)
        assert run.state.message.startswith("terminated after "), run.state.message
        assert "/40 rows: " in run.state.message and " ok, " in run.state.message
        _task_runs(client, run)  # every shard's task run final: Completed, or Cancelled if it was in flight
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run.id])))
        progress = [a for a in artifacts if a.type == "progress"]
        assert progress and progress[-1].description.startswith("terminated after "), progress


def test_a_run_killed_without_a_word_is_marked_crashed_by_the_next(tmp_path, models_env, inputs_dir, prefect_api):
    from prefect.client.orchestration import get_client

    from ipaflow.flows.render import render_manifest

    manifest, out, render = _render_until_the_first_image(tmp_path, inputs_dir, "killed-run")
    os.killpg(render.pid, signal.SIGKILL)
    render.communicate(timeout=60)
    with get_client(sync_client=True) as client:
        killed = _flow_run(client, "killed-run")
        assert killed.state.type.value == "RUNNING"  # as a kill -9 leaves it

    render_manifest(str(manifest), out=str(out), options={"limit": 1})  # takes over the dead run's lease
    with get_client(sync_client=True) as client:
        killed = client.read_flow_run(killed.id)
        assert killed.state.type.value == "CRASHED", killed.state
        assert "died without a word" in killed.state.message
        assert {task.state.type.value for task in _task_runs(client, killed)} <= {"COMPLETED", "CRASHED"}


def test_ctrl_c_on_serve_leaves_its_run_cancelled(tmp_path, models_env, inputs_dir, prefect_api):
    """`ipaflow serve` in a session of its own; a run of its deployment triggered and rendering; Ctrl-C to the
    whole process group, as a terminal sends it: serve says what it does, exits within seconds, and neither the
    run nor its task runs stay Running."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    manifest = slow_manifest(tmp_path / "served-check.parquet", inputs_dir)
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "IPAFLOW_LIVE_UPDATES": "1"}
    started = threading.Thread(target=_run_when_deployed, args=("ipaflow-render/orphan-serve", ran := []), daemon=True)
    started.start()
    serve = start_until_first_image(["serve", "--manifest", str(manifest), "--out", str(out), "--cron", "0 3 1 1 *",
                                     "--name", "orphan-serve", "--batch-size", "2"], env, out)
    [run] = ran

    os.killpg(serve.pid, signal.SIGINT)
    interrupted = time.monotonic()
    _, stderr = serve.communicate(timeout=60)
    assert time.monotonic() - interrupted < 15, stderr
    assert "stopping: the schedule of orphan-serve is paused" in stderr and "stopped" in stderr, stderr
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run.id)
        assert run.state.type.value == "CANCELLED", (run.state, stderr)
        assert run.state.message.startswith("interrupted (ipaflow serve stopped)"), run.state.message
        assert "/40 rows (" in run.state.message, run.state.message  # the run's last progress line
        _task_runs(client, run)
    assert f"run {run.name} cancelled: interrupted" in stderr, stderr
