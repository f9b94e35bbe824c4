"""The render options are defined once (RenderOptions): the `render` and `serve` flags, the flow's parameters,
a deployment's stored parameters and the worker settings all carry exactly its fields."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import SecretStr

from ipaflow.flows.cli_parser import command_parser, options_from_args
from ipaflow.specs.options import RenderOptions

FIELDS = set(RenderOptions.model_fields)
# A value of each field's kind, as a flag would give it, and the value the options then hold.
SAMPLES = {
    "specs": (["--specs", "a", "--specs", "b"], ["a", "b"]),
    "models": (["--models", "/m"], "/m"),
    "batch_size": (["--batch-size", "3"], 3),
    "shard_size": (["--shard-size", "5"], 5),
    "storage_options": (["--storage-options", '{"anon": true}'], SecretStr('{"anon": true}')),
    "overwrite": (["--overwrite"], True),
    "max_failures": (["--max-failures", "7"], 7),
    "limit": (["--limit", "9"], 9),
    "dask_address": (["--dask-address", "tcp://127.0.0.1:8786"], "tcp://127.0.0.1:8786"),
    "workers": (["--workers", "2"], 2),
    "compile": (["--compile", "off"], "off"),
    "layout": (["--layout", "webdataset"], "webdataset"),
}


def _subparser(command: str) -> argparse.ArgumentParser:
    commands = next(a for a in command_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


def _dests(command: str) -> set[str]:
    return {action.dest for action in _subparser(command)._actions if action.dest != "help"}


def test_every_option_has_a_sample_here():
    assert set(SAMPLES) == FIELDS  # a new option needs a line above, so the tests below cover it


def test_render_and_serve_flags_are_the_options():
    assert _dests("render") - {"manifest", "out", "dry_run"} == FIELDS
    assert _dests("serve") - {"manifest", "out", "cron", "timezone", "name"} == FIELDS


@pytest.mark.parametrize("command", ["render", "serve"])
@pytest.mark.parametrize("field", sorted(FIELDS))
def test_each_flag_sets_its_option(command, field):
    flags, expected = SAMPLES[field]
    head = ["render", "m.parquet", "--out", "o"] if command == "render" else ["serve", "--manifest", "m", "--out", "o"]
    args = command_parser().parse_args(head + flags)
    options = options_from_args(args.command_parser, args)
    value = getattr(options, field)
    if isinstance(expected, SecretStr):
        assert value.get_secret_value() == expected.get_secret_value()
    else:
        assert value == expected
    others = {name for name in FIELDS if name != field and getattr(options, name) != getattr(RenderOptions(), name)}
    assert not others  # no flag sets another option


def test_the_flow_takes_the_options():
    from ipaflow.flows.render import render_manifest

    schema = render_manifest.parameters.model_dump()
    assert set(schema["properties"]) == {"manifest", "out", "options"}
    assert set(schema["definitions"]["RenderOptions"]["properties"]) == FIELDS


def test_a_deployment_stores_every_option_but_the_secret_ones():
    from ipaflow.flows.serve import deployment_parameters

    options = RenderOptions(storage_options=SecretStr('{"key": "k", "secret": "s3cr3t"}'), batch_size=3)
    stored = deployment_parameters("m.parquet", "out/{date}", options)
    assert set(stored["options"]) == FIELDS - {"storage_options"} == FIELDS - set(RenderOptions.secret_fields())
    assert "s3cr3t" not in repr(stored) and stored["options"]["batch_size"] == 3


def test_the_worker_settings_carry_the_options():
    from ipaflow.tasks.worker import RunSettings

    assert RunSettings.model_fields["options"].annotation is RenderOptions


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size: input should be greater than or equal to 1, got '0'"),
    (["--batch-size", "-3"], "--batch-size: input should be greater than or equal to 1"),
    (["--max-failures", "0"], "--max-failures: input should be greater than or equal to 1"),
    (["--shard-size", "x"], "--shard-size: input should be a valid integer"),
    (["--storage-options", "[1]"], "--storage-options: storage options must be a JSON object"),
    (["--workers", "2", "--dask-address", "tcp://h:1"], "give dask_address or workers, not both"),
    (["--compile", "yes"], "--compile: input should be 'auto', 'on' or 'off', got 'yes'"),
    (["--layout", "zip"], "--layout: input should be 'files', 'sharded', 'webdataset' or 'parquet'"),
])
def test_bad_values_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as caught:
        args = command_parser().parse_args(["render", "m.parquet", "--out", "o", *flags])
        options_from_args(args.command_parser, args)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_storage_options_errors_never_echo_the_text(capsys):
    with pytest.raises(SystemExit):
        command_parser().parse_args(["render", "m.parquet", "--out", "o", "--storage-options", '{"secret": "s3cr3t"'])
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "s3cr3t" not in err


def test_a_run_resolves_what_the_environment_supplies_once(tmp_path, monkeypatch):
    """The models folder and storage options the environment gives are made explicit in the options, so that
    every part of a run (workers in other processes too) reads them from there."""
    monkeypatch.setenv("IPAFLOW_MODELS", str(tmp_path / "zoo"))
    monkeypatch.setenv("IPAFLOW_STORAGE_OPTIONS", '{"anon": true}')
    resolved = RenderOptions(batch_size=2).resolved()
    assert resolved.models == str((tmp_path / "zoo").resolve()) and resolved.batch_size == 2
    assert resolved.storage_options.get_secret_value() == '{"anon": true}'
    assert resolved.resolved() is resolved  # nothing left to resolve
    given = RenderOptions(models="zoo", storage_options='{"anon": false}').resolved()
    assert given.models == str(Path("zoo").resolve()) and given.storage_options_dict() == {"anon": False}
    given.storage_options_dict()["anon"] = True  # a fresh dict each time
    assert given.storage_options_dict() == {"anon": False}
