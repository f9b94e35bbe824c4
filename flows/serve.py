"""Scheduled dataset generation: the render flow served as a Prefect deployment on a cron schedule.

    ipaflow serve --manifest s3://bucket/nightly.parquet --out 's3://bucket/renders/{date}' --cron '0 2 * * *'

The deployment is the render flow itself (``ipaflow.flows.render.render_manifest``), so its parameters are
the flow's: ``manifest``, ``out`` and ``options`` (``RenderOptions``). The Prefect API validates them against
the flow's parameter schema when a run is created, so a bad parameter is rejected before any worker starts.
``{date}`` and ``{datetime}`` in ``out`` are filled from each run's scheduled time. Secret options
(``storage_options``) are never stored in the deployment: ``serve`` hands them to the runs it starts through
``$IPAFLOW_STORAGE_OPTIONS`` in its own environment. The same flow deploys to a work pool with
``prefect deploy`` (see prefect.yaml).

Each run is the render flow itself, so its name (``<deployment>-<scheduled time>``), tags (``manifest:<name>``),
artifacts and final state ("Completed with failures", ...) are those of any render. ``serve`` logs each run
of its deployment at INFO as it starts and as it ends (``RunWatcher``), so its terminal or service log tells
what ran when and how it ended.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone

from ipaflow.flows.render import absolute_uri, fill_template, render_manifest
from ipaflow.specs.options import STORAGE_OPTIONS_ENV, RenderOptions

log = logging.getLogger("ipaflow.serve")
WATCH_EVERY_S = 5.0


def deployment_parameters(manifest: str, out: str, options: RenderOptions) -> dict:
    """The deployment's stored parameters: everything but the secret options (see the module docstring); a
    local manifest and --out made absolute (a run does not start in serve's folder)."""
    return {"manifest": absolute_uri(manifest), "out": absolute_uri(out),
            "options": options.model_dump(mode="json", exclude=set(RenderOptions.secret_fields()))}


def make_deployment(manifest: str, out: str, options: RenderOptions, name: str, cron: str, timezone: str):
    """The deployment ``ipaflow serve`` serves."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    return render_manifest.to_deployment(
        name=name,
        schedule=Cron(cron, timezone=timezone),
        parameters=deployment_parameters(manifest, out, options),
        tags=["ipaflow"],
        description="ipaflow scheduled dataset generation",
        entrypoint_type=EntrypointType.MODULE_PATH,  # runs import the installed package, whatever the cwd
    )


def serve_deployment(deployment, options: RenderOptions) -> None:
    """Serve until interrupted (Ctrl-C pauses the schedule). Runs start as subprocesses of this one and
    inherit its environment, which carries the secret storage options."""
    from prefect import serve

    if options.storage_options is not None:
        os.environ[STORAGE_OPTIONS_ENV] = options.storage_options.get_secret_value()
    _log_to_stderr()
    watcher = RunWatcher(render_manifest.name, deployment.name)
    threading.Thread(target=watcher.watch, name="ipaflow-serve-watch", daemon=True).start()
    log.info("serving %s/%s; each run is logged here as it starts and ends", render_manifest.name, deployment.name)
    try:
        serve(deployment)  # returns on Ctrl-C or SIGTERM, its schedule paused and its runs' processes ended
    finally:
        log.info("stopping: the schedule of %s is paused; ending the runs in flight", deployment.name)
        watcher.close_open_runs()
        log.info("stopped")


def _log_to_stderr() -> None:
    """``ipaflow.serve`` lines at INFO on stderr, whatever Prefect's console level (the command line keeps
    Prefect's own console at WARNING)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # not to Prefect's API handler: these lines belong to no flow run


def resolved_out(run) -> str:
    """The --out a run of the deployment writes to: its template filled from the run's scheduled time, as the
    run fills it (``render._holding_output_lease``)."""
    when = run.expected_start_time or run.start_time or datetime.now(timezone.utc)
    return absolute_uri(fill_template(str(run.parameters.get("out", "")), when))


class RunWatcher:
    """Reads the deployment's runs from the Prefect API and logs each one once as it starts and once as it
    ends: its name, and at the end its final state's name and message ("Completed with failures: 28 ok, 5
    failed, 0 skipped"). Only runs that start after the watcher was made; one query per ``every`` seconds. A
    start is logged one poll after it is seen (or with the end), once the flow has given the run its name
    (``<deployment>-<scheduled time>``; it starts with a random one)."""

    def __init__(self, flow_name: str, deployment_name: str, since: datetime | None = None,
                 every: float = WATCH_EVERY_S):
        self.flow_name, self.deployment_name, self.every = flow_name, deployment_name, every
        self.since = self.began = since or datetime.now(timezone.utc)
        self.seen: set = set()
        self.started: set = set()
        self.ended: set = set()

    def poll(self, client, quiet: bool = False) -> None:
        """One look at the deployment's runs; each start and end logged once (``quiet``: only noted)."""
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterName,
            FlowFilter,
            FlowFilterName,
            FlowRunFilter,
            FlowRunFilterStartTime,
        )
        from prefect.client.schemas.sorting import FlowRunSort

        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[self.flow_name])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[self.deployment_name])),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=self.since, is_null_=False)),
            sort=FlowRunSort.START_TIME_ASC, limit=200)
        for run in runs:
            state = run.state
            if state is None or not (state.is_running() or state.is_final()) or run.start_time is None:
                continue  # scheduled or pending: not started yet
            ended = state.is_final()
            if run.id not in self.started and (run.id in self.seen or ended):
                self.started.add(run.id)
                if not quiet:
                    log.info("run %s started (manifest %s, out %s)", run.name, run.parameters.get("manifest"),
                             resolved_out(run))
            self.seen.add(run.id)
            if ended and run.id not in self.ended:
                self.ended.add(run.id)
                seconds = f" after {run.total_run_time.total_seconds():.0f}s" if run.total_run_time else ""
                level = logging.INFO if state.is_completed() else logging.WARNING
                log.log(logging.DEBUG if quiet else level, "run %s ended %s%s%s", run.name, state.name,
                        f": {state.message}" if state.message else "", seconds)
        if runs:  # the next poll starts at the oldest run still going (a long-lived serve passes 200 runs)
            going = [run.start_time for run in runs if run.id not in self.ended and run.start_time is not None]
            self.since = min(going) if going else max(run.start_time for run in runs if run.start_time is not None)

    def close_open_runs(self) -> None:
        """``serve`` is stopping: each run of its deployment that it saw start and that did not end on its own
        (still Running, or Crashed by the interrupt its process got) is marked Cancelled with its task runs,
        saying how far it got; its progress artifact says the same."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate
        from prefect.states import Cancelled

        from ipaflow.flows.monitoring import close_flow_run, last_progress

        ended_before = set(self.ended)
        self.since = self.began
        try:
            with get_client(sync_client=True) as client:
                self.poll(client, quiet=True)
                for run_id in sorted(self.seen - ended_before, key=str):
                    run = client.read_flow_run(run_id)
                    if run.state is not None and run.state.is_final() and not run.state.is_crashed():
                        continue
                    artifact, progress = last_progress(client, run_id)
                    message = ("interrupted (ipaflow serve stopped); its last progress: " + progress if progress
                               else "interrupted (ipaflow serve stopped) at its start")
                    if artifact is not None:
                        client.update_artifact(artifact.id, ArtifactUpdate(description=message))
                    close_flow_run(client, run_id, lambda message=message: Cancelled(message=message))
                    log.warning("run %s cancelled: %s", run.name, message)
        except Exception as exc:  # noqa: BLE001 - the API may be gone with the serve
            log.warning("could not mark the runs in flight cancelled in the Prefect API: %s", exc)

    def watch(self) -> None:
        from prefect.client.orchestration import get_client

        while True:
            try:
                with get_client(sync_client=True) as client:
                    while True:
                        self.poll(client)
                        time.sleep(self.every)
            except Exception as exc:  # noqa: BLE001 - the API may be down a while; serving goes on
                log.warning("cannot read this deployment's runs from the Prefect API: %s", exc)
                time.sleep(self.every * 6)
