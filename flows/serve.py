"""Scheduled dataset generation: the render flow served as a Prefect deployment on a cron schedule.

    ipaflow serve --manifest s3://bucket/nightly.parquet --out 's3://bucket/renders/{date}' --cron '0 2 * * *'

The deployment is the render flow itself (``ipaflow.flows.render.render_manifest``), so its parameters are
the flow's: ``manifest``, ``out`` and ``options`` (``RenderOptions``). The Prefect API validates them against
the flow's parameter schema when a run is created, so a bad parameter is rejected before any worker starts.
``{date}`` and ``{datetime}`` in ``out`` are filled from each run's scheduled time. Secret options
(``storage_options``) are never stored in the deployment: ``serve`` hands them to the runs it starts through
``$IPAFLOW_STORAGE_OPTIONS`` in its own environment. The same flow deploys to a work pool with
``prefect deploy`` (see prefect.yaml).
"""

from __future__ import annotations

import os

from ipaflow.flows.render import render_manifest
from ipaflow.specs.options import STORAGE_OPTIONS_ENV, RenderOptions


def deployment_parameters(manifest: str, out: str, options: RenderOptions) -> dict:
    """The deployment's stored parameters: everything but the secret options (see the module docstring)."""
    return {"manifest": manifest, "out": out,
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
    serve(deployment)
