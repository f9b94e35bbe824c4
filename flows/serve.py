"""Scheduled dataset generation: the render flow served as a Prefect deployment on a cron schedule.

    ipaflow serve --manifest s3://bucket/nightly.parquet --out 's3://bucket/renders/{date}' --cron '0 2 * * *'

Parameters are a pydantic model, validated by the Prefect API when a run is created, so a bad parameter is
rejected before any worker starts. ``{date}`` (YYYY-MM-DD) and ``{datetime}`` (YYYYMMDDTHHMMSS) in ``out``
are filled from the run's scheduled time. Each run renders through the task runner its parameters name: the
serving process itself (default), a local Dask cluster (``workers``) or an existing one (``dask_address``).
The same flow deploys to a work pool with ``prefect deploy`` (see prefect.yaml).
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.render import render_manifest
from flows.runners import make_task_runner
from tasks.shards import DEFAULT_BATCH_SIZE


class ScheduledRender(BaseModel):
    """The parameters of a scheduled run: the deployment's parameter schema, which the API enforces."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(min_length=1, description="manifest URI")
    out: str = Field(min_length=1, description="output URI; {date} and {datetime} are filled in")
    specs: list[str] = Field(default_factory=list, description="extra spec folders")
    models: str | None = Field(default=None, description="models folder on the workers")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=256)
    shard_size: int | None = Field(default=None, ge=1)
    overwrite: bool = False
    max_failures: int | None = Field(default=None, ge=1)
    limit: int | None = Field(default=None, ge=1)
    dask_address: str | None = Field(default=None, description="existing Dask scheduler, e.g. tcp://host:8786")
    workers: int | None = Field(default=None, ge=1, description="or: a local Dask cluster of N GPU workers")

    @model_validator(mode="after")
    def _one_cluster(self) -> "ScheduledRender":
        if self.dask_address and self.workers:
            raise ValueError("give dask_address or workers, not both")
        return self


def fill_template(template: str, when: datetime) -> str:
    """Only the two known placeholders are replaced (no str.format on user text)."""
    return template.replace("{date}", when.strftime("%Y-%m-%d")).replace("{datetime}", when.strftime("%Y%m%dT%H%M%S"))


@flow(name="ipaflow-scheduled-render", log_prints=False, validate_parameters=True)
def scheduled_render(job: ScheduledRender) -> dict:
    """One scheduled run: the output folder named after the scheduled time, then the render flow."""
    from prefect.runtime import flow_run

    when = flow_run.scheduled_start_time or datetime.now(timezone.utc)
    runner, in_flight = make_task_runner(job.dask_address, job.workers)
    return render_manifest.with_options(task_runner=runner)(
        manifest=job.manifest,
        out=fill_template(job.out, when),
        specs=job.specs,
        models=job.models,
        batch_size=job.batch_size,
        shard_size=job.shard_size,
        overwrite=job.overwrite,
        max_failures=job.max_failures,
        limit=job.limit,
        max_in_flight=in_flight,
    )


def make_deployment(args):
    """The deployment ``ipaflow serve`` serves; its parameters are validated here and again by the API."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    job = ScheduledRender(manifest=args.manifest, out=args.out, specs=args.specs, models=args.models,
                          batch_size=args.batch_size, shard_size=args.shard_size, max_failures=args.max_failures,
                          dask_address=args.dask_address, workers=args.workers)
    return scheduled_render.to_deployment(
        name=args.name,
        schedule=Cron(args.cron, timezone=args.timezone),
        parameters={"job": job.model_dump(mode="json")},
        tags=["ipaflow"],
        description="ipaflow scheduled dataset generation",
        entrypoint_type=EntrypointType.MODULE_PATH,  # runs import the installed package, whatever the cwd
    )


def serve_from_args(args) -> int:
    from prefect import serve

    serve(make_deployment(args))
    return 0
