"""The command line's own messages: usage errors and unusable manifests are one line with exit 2, before
anything starts; help everywhere; `specs show` prints the whole spec; validate names a duplicate id once."""

from __future__ import annotations

import argparse

import pytest
import yaml

from ipaflow.flows import cli, console
from ipaflow.flows.cli import main
from ipaflow.flows.cli_parser import command_parser


@pytest.fixture(autouse=True)
def environment_restored(monkeypatch):
    """main() sets Prefect's quiet defaults in os.environ for the command's process; not for later tests."""
    for name in ("DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",
                 "PREFECT_LOGGING_EXTRA_LOGGERS", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)  # noted by monkeypatch: restored (to absent or as it was) after the test


@pytest.mark.parametrize("argv", [
    ["render", "m.parquet", "--out", "o", "--batch-size", "0"],
    ["render", "m.parquet", "--out", "o", "--batch-size", "-3"],
    ["render", "m.parquet", "--out", "o", "--max-failures", "0"],
    ["render", "m.parquet", "--out", "o", "--workers", "2", "--dask-address", "tcp://h:1"],
    ["render", "m.parquet"],
    ["serve", "--manifest", "m.parquet", "--out", "o", "--shard-size", "x"],
    ["validate"],
    ["no-such-command"],
])
def test_usage_errors_are_one_line_with_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert ": error: " in line and line.endswith("--help)") and captured.out == ""


@pytest.fixture
def no_server(monkeypatch):
    """Fails the test if the command gets as far as starting Prefect's API server."""
    def refuse(cls):
        raise AssertionError("the command started Prefect's API server")

    monkeypatch.setattr(cli.TemporaryAPIServer, "start_unless_configured", classmethod(refuse))


@pytest.mark.parametrize("argv, message", [
    (["render", "{tmp}/nope.parquet", "--out", "{tmp}/out"], "ipaflow: {tmp}/nope.parquet: manifest not found"),
    (["render", "{tmp}/m.txt", "--out", "{tmp}/out"], "unknown manifest format; use .parquet, .csv or .jsonl"),
    (["render", "{tmp}/m.csv", "--out", "{tmp}/out", "--specs", "{tmp}/no-specs"],
     "ipaflow: {tmp}/no-specs: spec folder not found"),
    (["validate", "{tmp}/nope.parquet"], "ipaflow: {tmp}/nope.parquet: manifest not found"),
])
def test_an_unusable_manifest_or_spec_folder_stops_before_anything_starts(argv, message, tmp_path, capsys,
                                                                          no_server):
    (tmp_path / "m.csv").write_text("id,spec\na,sdxl-text2img\n")
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert message.format(tmp=tmp_path) in line and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_bare_command_prints_help_and_version(capsys):
    assert main([]) == 0
    assert "usage: ipaflow" in capsys.readouterr().out
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out.startswith("ipaflow ")


def _parsers(parser: argparse.ArgumentParser, path: str = "ipaflow"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if choice.help}
            assert helped == set(action.choices), (path, set(action.choices) - helped)
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_command_and_argument_has_help():
    for path, parser in _parsers(command_parser()):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help and action.help != argparse.SUPPRESS, (path, action.option_strings or action.dest)


def test_specs_show_prints_the_whole_spec(capsys):
    from ipaflow.specs.registry import SpecRegistry, parse_spec

    registry = SpecRegistry()
    for name in ("sdxl-text2img", "animatediff-video"):
        assert main(["specs", "show", name]) == 0
        shown = capsys.readouterr().out
        data = yaml.safe_load(shown)
        spec = registry.get(name)
        assert data["output"]["format"] == spec.output_format and {"quality", "fps"} <= set(data["output"])
        assert {"memory", "defaults", "dtype", "loras"} <= set(data)
        again = parse_spec(shown, f"{name}.yaml")  # what it prints is a spec, the same one
        assert again.model_dump(exclude={"output"}) == spec.model_dump(exclude={"output"})
        assert again.output_format == spec.output_format


def test_validate_names_a_duplicate_id_once_with_both_rows(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,spec,ip_image\ndup,sdxl-text2img,a.png\nok,sdxl-text2img,a.png\n"
                        "dup,sdxl-text2img,b.png\ndup,sdxl-text2img,c.png\n")
    assert main(["validate", str(manifest), "--no-inputs"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["dup, id, duplicate id (manifest rows 0, 2, 3)"]
    assert "4 rows checked: 1 ok, 3 with problems" in captured.err
    from ipaflow.specs.rows import duplicate_problem

    assert duplicate_problem([0, 2]).shared  # said once because of this field, whatever its wording


@pytest.mark.parametrize("message, kept", [
    ("Finished in state Failed('Task run encountered an exception LeaseLost: lost the lease on o to run b')", False),
    ("Finished in state Failed('Task run encountered an exception StorageUnreachable: s3://b/r unreachable')", False),
    ("Finished in state Failed('Task run encountered an exception RuntimeError: boom')", True),
    ("Finished in state Completed('2 ok, 0 failed')", True),
])
def test_the_console_keeps_prefects_task_end_unless_the_cli_says_it_in_its_own_line(message, kept):
    import logging

    record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, message, None, None)
    assert console.OneLineFailures().filter(record) is kept
