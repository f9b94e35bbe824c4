"""The render options, defined once.

``RenderOptions`` is the single definition of how a render runs. Everything else derives from it: the
``render`` and ``serve`` command-line flags (``ipaflow.flows.cli`` builds them from these fields, with their
bounds and help), the render flow's ``options`` parameter (so the Prefect UI's run form and a deployment's
parameter schema are this model), and the shard workers' settings (``ipaflow.tasks.worker.RunSettings``
carries the model). tests/test_options.py fails when one of them lacks a field.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

DEFAULT_BATCH_SIZE = 8  # rows per pipeline call: 2-4x the throughput of single rows on a CPU and on an H200
STORAGE_OPTIONS_ENV = "IPAFLOW_STORAGE_OPTIONS"  # JSON, used when --storage-options is not given
MODELS_ENV = "IPAFLOW_MODELS"  # the models folder, used when --models is not given


def default_models_folder() -> str | None:
    """``$IPAFLOW_MODELS`` as an absolute path, or None: the one place ipaflow reads it."""
    folder = os.environ.get(MODELS_ENV)
    return str(Path(folder).expanduser().resolve()) if folder else None


def _cli(metavar: str | None = None, secret: bool = False) -> dict[str, Any]:
    """What the command line needs beyond type, bounds and help: the flag's metavar; ``secret`` fields are
    kept out of a deployment's stored parameters (see ipaflow.flows.serve)."""
    extra: dict[str, Any] = {}
    if metavar:
        extra["metavar"] = metavar
    if secret:
        extra["secret"] = True
    return extra


class RenderOptions(BaseModel):
    """How a manifest is rendered (everything but the manifest and the output URI). Each field's description is
    its documentation and the ``--help`` of its flag (``flows.cli_parser``); a run makes what the environment
    supplies explicit once (``resolved``), and reads every value from here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    specs: list[str] = Field(default_factory=list, json_schema_extra=_cli("DIR"),
                             description="extra spec folder, local or fsspec URI (repeatable)")
    models: str | None = Field(default=None, json_schema_extra=_cli("DIR"),
                               description="folder of models in hub layout (default $IPAFLOW_MODELS)")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=1024, json_schema_extra=_cli("N"),
                            description=f"rows per pipeline call (default {DEFAULT_BATCH_SIZE}); a batch that runs "
                                        "out of GPU memory is split")
    shard_size: int | None = Field(default=None, ge=1, le=1_000_000, json_schema_extra=_cli("N"),
                                   description="rows per task (default: automatic, ~128 tasks for big manifests)")
    storage_options: SecretStr | None = Field(
        default=None, json_schema_extra=_cli("JSON", secret=True),
        description=f"fsspec keyword arguments as a JSON object, flat or per protocol (default ${STORAGE_OPTIONS_ENV})")
    overwrite: bool = Field(default=False, description="render every row, even those already done")
    max_failures: int | None = Field(default=None, ge=1, json_schema_extra=_cli("N"),
                                     description="stop submitting work once N rows failed")
    limit: int | None = Field(default=None, ge=1, json_schema_extra=_cli("N"),
                              description="only the first N manifest rows")
    dask_address: str | None = Field(default=None, min_length=1, json_schema_extra=_cli("ADDR"),
                                     description="an existing Dask scheduler, e.g. tcp://host:8786")
    workers: int | None = Field(default=None, ge=1, le=256, json_schema_extra=_cli("N"),
                                description="start a local Dask cluster of N GPU workers")
    compile: Literal["auto", "on", "off"] | None = Field(
        default=None, json_schema_extra=_cli("auto|on|off"),
        description="torch.compile the denoiser: auto (on a GPU, for the shapes with enough rows to pay the "
                    "compile back), on, off (default: each spec's `compile`, auto unless it says otherwise)")
    layout: Literal["files", "sharded", "webdataset", "parquet"] | None = Field(
        default=None, json_schema_extra=_cli("LAYOUT"),
        description="output layout: files | sharded | webdataset | parquet (default: each spec's output.layout, "
                    "else files)")

    @field_validator("storage_options")
    @classmethod
    def _json_object(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_storage_options(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _one_cluster(self) -> RenderOptions:
        if self.dask_address and self.workers:
            raise ValueError("give dask_address or workers, not both")
        return self

    def resolved(self) -> RenderOptions:
        """These options with what the environment supplies made explicit, once per run, so that every part of
        the run (workers in other processes included) reads the same values from the options alone:
        ``models`` (else ``$IPAFLOW_MODELS``) as an absolute path, ``storage_options`` (else
        ``$IPAFLOW_STORAGE_OPTIONS``, validated here).

        Returns:
            A copy; these options when nothing changes.
        """
        models = str(Path(self.models).expanduser().resolve()) if self.models else default_models_folder()
        storage = self.storage_options
        if storage is None and (text := os.environ.get(STORAGE_OPTIONS_ENV)):
            parse_storage_options(text)
            storage = SecretStr(text)
        if (models, storage) == (self.models, self.storage_options):
            return self
        return self.model_copy(update={"models": models, "storage_options": storage})

    def storage_options_dict(self) -> dict:
        """The fsspec options: ``storage_options``, else ``$IPAFLOW_STORAGE_OPTIONS``, else none (a fresh dict;
        the JSON is parsed once per distinct text)."""
        if self.storage_options is not None:
            text = self.storage_options.get_secret_value()
        else:
            text = os.environ.get(STORAGE_OPTIONS_ENV) or "{}"
        return copy.deepcopy(_parsed_storage_options(text))

    @classmethod
    def secret_fields(cls) -> list[str]:
        return [name for name, info in cls.model_fields.items() if (info.json_schema_extra or {}).get("secret")]


@functools.lru_cache(maxsize=16)
def _parsed_storage_options(text: str) -> dict:
    return parse_storage_options(text)


def parse_storage_options(text: str) -> dict:
    """A JSON object of fsspec keyword arguments; the error never repeats the text (it may hold secrets)."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"storage options must be a JSON object (not valid JSON at character {exc.pos})") from None
    if not isinstance(options, dict):
        raise ValueError("storage options must be a JSON object")
    return options
