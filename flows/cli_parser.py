"""The ``ipaflow`` command line's parser: its commands, and the render options as flags derived from
``RenderOptions`` (each field's type, bounds, default and help)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any

from ipaflow.specs.options import RenderOptions, parse_storage_options

DEFAULT_ZOO = Path("~/.cache/ipaflow/zoo").expanduser()


# -- render options as flags, derived from RenderOptions -------------------------------------------------------

def _field_parser(name: str):
    """argparse ``type=`` for one RenderOptions field: the field's own type and bounds, so that a bad value
    is a one-line usage error (exit 2) before anything starts."""
    from pydantic import TypeAdapter, ValidationError

    info = RenderOptions.model_fields[name]
    adapter = TypeAdapter(Annotated[info.annotation, info])

    def parse(text: str) -> Any:
        if name == "storage_options":
            try:
                parse_storage_options(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        try:
            return adapter.validate_python(text)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{exc.errors()[0]['msg'].lower()}, got {text!r}") from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def add_render_options(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """A flag per RenderOptions field (``--batch-size`` for ``batch_size``), with its help, bounds and default;
    ``only`` picks a subset (``validate`` takes the spec folders and storage options)."""
    for name, info in RenderOptions.model_fields.items():
        if only is not None and name not in only:
            continue
        extra = info.json_schema_extra or {}
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": info.description}
        if info.annotation is bool:
            kwargs["action"] = "store_true"
        elif info.annotation == list[str]:
            kwargs.update(action="append", metavar=extra.get("metavar"))
        else:
            kwargs.update(type=_field_parser(name), metavar=extra.get("metavar"))
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def options_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RenderOptions:
    """The RenderOptions the flags given make (unset flags keep the model's defaults)."""
    from pydantic import ValidationError

    given = {name: getattr(args, name) for name in RenderOptions.model_fields if hasattr(args, name)}
    try:
        return RenderOptions(**given)
    except ValidationError as exc:
        parser.error("; ".join(item["msg"].removeprefix("Value error, ") for item in exc.errors()))


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the usage of `render` alone is six): exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command_parser() -> argparse.ArgumentParser:
    """The ``ipaflow`` command line's parser: every command and its flags."""
    from importlib.metadata import version

    parser = _Parser(prog="ipaflow", description="Batch renders with diffusers IP-Adapter pipelines.")
    parser.add_argument("--version", action="version", version=f"ipaflow {version('ipaflow')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help="render a demo manifest covering every bundled spec")
    demo.add_argument("--out", default="ipaflow-demo", help="output folder (default ./ipaflow-demo)")
    demo.add_argument("--models", help=f"model folder (default $IPAFLOW_MODELS or the tiny zoo in {DEFAULT_ZOO})")

    render = commands.add_parser("render", help="render a manifest")
    render.add_argument("manifest", help="manifest URI or path (.parquet, .csv, .jsonl)")
    render.add_argument("--out", required=True, help="output URI or path; {date} and {datetime} are filled in")
    render.set_defaults(command_parser=render)
    add_render_options(render)
    render.add_argument("--dry-run", action="store_true", help="render a sample and estimate the whole run")

    validate = commands.add_parser("validate", help="check every row without rendering")
    validate.add_argument("manifest", help="manifest URI or path (.parquet, .csv, .jsonl)")
    validate.set_defaults(command_parser=validate)
    add_render_options(validate, only=("specs", "storage_options"))
    validate.add_argument("--no-inputs", action="store_true", help="skip reading and decoding the inputs")

    records = commands.add_parser("records", help="the current records of an output folder, one per id")
    records.add_argument("out", help="the output folder or URI (what --out was)")
    records.add_argument("--output", metavar="PATH", help="write .parquet, .csv or .jsonl there (default: JSON Lines "
                                                          "on stdout)")
    records.add_argument("--where", metavar="FILTER", help="only the records FILTER matches: comparisons <column> "
                         "<op> <literal> (op: < <= > >= == !=; a number, 'text' or null) joined by and / or, "
                         "e.g. 'ip_similarity < 0.2'")
    records.set_defaults(command_parser=records)
    add_render_options(records, only=("storage_options",))

    verify = commands.add_parser("verify", help="check that an output folder's records and outputs agree")
    verify.add_argument("out", help="the output folder or URI (what --out was)")
    verify.add_argument("--deep", action="store_true", help="also decode every output and compare its key")
    verify.add_argument("--repair", action="store_true", help="set aside unreadable metadata, rebuild its records, "
                                                              "remove orphans, mark records missing outputs failed")
    verify.set_defaults(command_parser=verify)
    add_render_options(verify, only=("storage_options",))

    zoo = commands.add_parser("zoo", help="the tiny model zoo").add_subparsers(dest="zoo_command", required=True,
                                                                              metavar="COMMAND")
    build = zoo.add_parser("build", help="write the tiny zoo in hub layout")
    build.add_argument("dir", nargs="?", default=str(DEFAULT_ZOO), help=f"where (default {DEFAULT_ZOO})")
    build.add_argument("--force", action="store_true", help="rebuild even if a complete zoo is there")
    build.add_argument("--hf-cache", metavar="DIR",
                       help="also register the zoo in this HF hub cache, so bare hub ids load offline")
    build.add_argument("--full-size-sd15", action="store_true",
                       help="write a shape-true SD1.5 + IP-Adapter (random weights, float16) instead")

    specs = commands.add_parser("specs", help="bundled and user specs").add_subparsers(
        dest="specs_command", required=True, metavar="COMMAND")
    listing = specs.add_parser("list", help="every known spec: name, task, base model, description")
    listing.set_defaults(command_parser=listing)
    add_render_options(listing, only=("specs",))
    show = specs.add_parser("show", help="one spec, whole, as YAML")
    show.add_argument("name", help="the spec's name")
    show.set_defaults(command_parser=show)
    add_render_options(show, only=("specs",))

    serve = commands.add_parser("serve", help="serve the render flow as a deployment on a cron schedule")
    serve.add_argument("--manifest", required=True, help="manifest URI")
    serve.add_argument("--out", required=True, help="output URI; {date} and {datetime} are filled in per run")
    serve.set_defaults(command_parser=serve)
    add_render_options(serve)
    serve.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: every day at 02:00)")
    serve.add_argument("--timezone", default="UTC", help="time zone of the cron schedule (default UTC)")
    serve.add_argument("--name", default="nightly", help="deployment name (default nightly)")
    return parser
