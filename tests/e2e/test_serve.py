"""`ipaflow serve`: the render flow as a deployment with a cron schedule and validated parameters; a run
triggered on it executes the way `serve` executes it (a subprocess of the runner); the prefect.yaml example."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from util import output_names, write_manifest

ROOT = Path(__file__).resolve().parents[2]
CRON = "30 2 * * *"


def _deployment(*flags: str):
    """The deployment `ipaflow serve <flags>` serves, built the way the command builds it."""
    from ipaflow.flows.cli_parser import command_parser, options_from_args
    from ipaflow.flows.serve import make_deployment

    parser = command_parser()
    args = parser.parse_args(["serve", *flags])
    options = options_from_args(args.command_parser, args)
    args.flags = flags
    return make_deployment(args.manifest, args.out, options, args.name, args.cron, args.timezone), args


@pytest.fixture(scope="module")
def served(tmp_path_factory, inputs_dir, models_env, prefect_api):
    """The arguments of an `ipaflow serve` command and the id of the deployment it creates."""
    folder = tmp_path_factory.mktemp("serve")
    rows = [{"id": f"row-{i}", "spec": "sdxl-text2img", "prompt": f"picture {i}",
             "ip_image": str(inputs_dir / "diner.png"), "num_inference_steps": 1} for i in range(2)]
    rows.append({**rows[0], "id": "bad-width", "width": 100})  # fails its check: the run ends with failures
    manifest = write_manifest(folder / "nightly.parquet", rows)
    deployment, args = _deployment("--manifest", str(manifest), "--out", str(folder / "runs" / "{date}"),
                                   "--cron", CRON, "--timezone", "Europe/Berlin", "--name", "nightly-test",
                                   "--batch-size", "2")
    return args, deployment.apply(), folder


def test_deployment_has_the_cron_schedule_and_a_triggered_run_completes(served, caplog):
    from prefect.client.orchestration import get_client
    from prefect.runner import Runner

    from ipaflow.flows.serve import RunWatcher

    args, deployment_id, folder = served
    watcher = RunWatcher("ipaflow-render", "nightly-test")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        assert deployment.name == "nightly-test" and deployment.enforce_parameter_schema
        assert deployment.entrypoint == "ipaflow.flows.render.render_manifest"
        assert deployment.parameters["options"]["batch_size"] == 2
        [schedule] = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (CRON, "Europe/Berlin", True)
        run = client.create_flow_run_from_deployment(deployment_id)  # the deployment's parameters

    runner = Runner(name="ipaflow-test", pause_on_shutdown=False)  # what `ipaflow serve` starts
    assert runner.add_deployment(_deployment(*args.flags)[0]) == deployment_id
    asyncio.run(asyncio.wait_for(runner.start(run_once=True), timeout=300))  # runs what is due, then returns

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run.id)
        # what `serve` logs of it, read from the API as the serve command reads it
        with caplog.at_level(logging.INFO, logger="ipaflow.serve"):
            watcher.poll(client)
            watcher.poll(client)  # once each
    assert run.state.is_completed(), run.state
    assert (run.state.name, run.state.message) == ("Completed with failures", "2 ok, 1 failed, 0 skipped")
    day = run.expected_start_time.strftime("%Y-%m-%d")
    name = f"nightly-test-{run.expected_start_time:%Y-%m-%d-%H%M}"  # one name per scheduled run
    assert run.name == name and "manifest:nightly" in run.tags
    assert output_names(folder / "runs" / day / "images") == ["row-0.png", "row-1.png"]
    assert [r.getMessage().split(" (")[0].split(":")[0] for r in caplog.records] == [
        f"run {name} started", f"run {name} ended Completed with failures"]
    assert caplog.records[0].getMessage().endswith(f", out {folder / 'runs' / day})")  # --out resolved
    assert caplog.records[1].getMessage().startswith(
        f"run {name} ended Completed with failures: 2 ok, 1 failed, 0 skipped after ")

    _assert_the_run_events(run, deployment_id, folder / "runs" / day)


def _assert_the_run_events(run, deployment_id, out: Path) -> None:
    """The run's events, read back from the API: ipaflow.run.finished and (a row failed) ipaflow.run.failed-rows,
    about the flow run, related to the deployment and the --out; the shard's task run ends with its counts."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    wanted = ["ipaflow.run.finished", "ipaflow.run.failed-rows"]
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:  # events reach the API through Prefect's event queue, a moment after the run ends
            events = client.read_events(EventFilter(event=EventNameFilter(name=wanted), resource=EventResourceFilter(
                id=[f"prefect.flow-run.{run.id}"])), limit=50).events
            if len(events) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert sorted(event.event for event in events) == sorted(wanted), events
    for event in events:
        assert {k: event.payload[k] for k in ("state", "rows", "rendered", "skipped", "updated", "failed")} == {
            "state": "Completed with failures", "rows": 3, "rendered": 2, "skipped": 0, "updated": 0, "failed": 1}
        related = {r.role: r.id for r in event.related}
        assert related["deployment"] == f"prefect.deployment.{deployment_id}", related
        assert related["out"] == f"ipaflow.out.{out}", related
    assert [(t.state.name, t.state.message) for t in tasks] == [("Completed", "2 ok, 0 failed")]


def test_invalid_parameters_are_rejected(served, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    args, deployment_id, _ = served
    for flags in (["--batch-size", "0"], ["--workers", "2", "--dask-address", "tcp://127.0.0.1:8786"]):
        with pytest.raises(SystemExit) as caught:  # a usage error before anything reaches the API
            _deployment("--manifest", "m.parquet", "--out", "out", *flags)
        assert caught.value.code == 2

    good = {"manifest": args.manifest, "out": str(tmp_path / "never"), "options": {"batch_size": 2}}
    rejected = [({**good, "options": {"batch_size": 0}}, "field 'options.batch_size'"),
                ({**good, "options": {"colour": "red"}}, "'colour' was unexpected"),
                ({**good, "manifest": ""}, "field 'manifest'"),
                ({**good, "manifest": ["a.parquet"]}, "is not of type 'string'")]
    with get_client(sync_client=True) as client:
        for bad, reason in rejected:
            with pytest.raises(PrefectHTTPStatusError, match=reason):  # by the API, from the pydantic schema
                client.create_flow_run_from_deployment(deployment_id, parameters=bad)
        created = client.create_flow_run_from_deployment(deployment_id, parameters=good)
        client.delete_flow_run(created.id)  # the one valid run was accepted: nothing left to execute


def test_prefect_yaml_example_deploys_the_scheduled_flow():
    import yaml
    from prefect.client.schemas.schedules import CronSchedule

    from ipaflow.specs.options import RenderOptions

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [deployment] = config["deployments"]
    path, function = deployment["entrypoint"].split(":")
    assert (ROOT / path).exists() and function == "render_manifest"
    parameters = deployment["parameters"]
    assert set(parameters) == {"manifest", "out", "options"} and "{date}" in parameters["out"]
    RenderOptions.model_validate(parameters["options"])
    for schedule in deployment["schedules"]:
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert deployment["work_pool"]["name"] and deployment["concurrency_limit"] == 1
