"""mkdocs hook: the command line's reference in docs/cli.md, generated at build time from the code.

Two markers in cli.md are replaced:

- ``<!-- cli:commands -->``: every ``ipaflow`` command, from the parser the command line itself uses
  (``ipaflow.flows.cli_parser.command_parser``): its help, its usage line and its own arguments with their defaults;
- ``<!-- cli:render-options -->``: every field of ``ipaflow.specs.options.RenderOptions``, the one definition of
  the render flags, with the flag ``ipaflow.flows.cli_parser.add_render_options`` makes of it, its type and bounds, its
  default and its help.

The hand-written rest of cli.md may name flags (``--batch-size``): each must be a flag of some ``ipaflow``
command, else the build fails. So neither the tables nor the prose can drift from the code.
"""

from __future__ import annotations

import argparse
import os
import re
import typing
from contextlib import contextmanager
from pathlib import Path

from mkdocs.exceptions import PluginError

PAGE = "cli.md"
COMMANDS = "<!-- cli:commands -->"
OPTIONS = "<!-- cli:render-options -->"
USAGE_COLUMNS = "100"  # argparse wraps usage lines at $COLUMNS


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    from ipaflow.flows.cli_parser import command_parser

    for marker in (COMMANDS, OPTIONS):
        if markdown.count(marker) != 1:
            raise PluginError(f"{PAGE} must hold the marker {marker} once")
    parser = command_parser()
    _check_flags(markdown, parser)
    markdown = markdown.replace(COMMANDS, _commands(parser))
    return markdown.replace(OPTIONS, _render_options())


# -- helpers -----------------------------------------------------------------------------------------------------

def _plain(text: object) -> str:
    """One line, the builder's home folder written ``~`` (argparse defaults expand it)."""
    return str(text).replace(str(Path.home()), "~").replace("\n", " ")


def _cell(text: object) -> str:
    """Text for a table cell: pipes escaped (a code span needs none: Python-Markdown's tables leave them be)."""
    return _plain(text).replace("|", "\\|")


def _code(text: object) -> str:
    return f"`{_plain(text)}`"


@contextmanager
def _columns(width: str):
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _subcommands(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(``ipaflow zoo build``, help, parser) for every command that runs, depth first, in the parser's order."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                nested = _subcommands(sub, f"{prefix} {name}")
                found.extend(nested or [(f"{prefix} {name}", helps.get(name) or "", sub)])
    return found


def _render_option_names() -> dict[str, str]:
    """dest -> flag of every render option, as the command line makes them."""
    from ipaflow.flows.cli_parser import add_render_options

    probe = argparse.ArgumentParser()
    add_render_options(probe)
    return {action.dest: action.option_strings[0] for action in probe._actions if action.option_strings
            and action.dest != "help"}


def _is_render_option(action: argparse.Action) -> bool:
    """Whether ``add_render_options`` made this flag (a command's own flag may share a field's name: demo's
    ``--models`` has help of its own)."""
    from ipaflow.specs.options import RenderOptions

    field = RenderOptions.model_fields.get(action.dest)
    return field is not None and action.help == field.description


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return _code((action.metavar or action.dest).upper())
    flag = " / ".join(action.option_strings)
    if action.nargs == 0:
        return _code(flag)
    metavar = action.metavar or action.dest.upper()
    return _code(f"{flag} {metavar}")


def _default(action: argparse.Action) -> str:
    if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
        return ""
    return _code(action.default)


# -- the commands ------------------------------------------------------------------------------------------------

def _commands(parser: argparse.ArgumentParser) -> str:
    render_flags = _render_option_names()
    commands = _subcommands(parser, parser.prog)
    lines = ["| command | does |", "| --- | --- |"]
    for name, help_text, _ in commands:
        anchor = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        lines.append(f"| [{_code(name)}](#{anchor}) | {_cell(help_text)} |")
    for name, help_text, sub in commands:
        with _columns(USAGE_COLUMNS):
            usage = sub.format_usage().strip().replace(str(Path.home()), "~")
        lines += ["", f"### {name}", "", f"{help_text[:1].upper()}{help_text[1:]}.", "", "```", usage, "```", ""]
        own = [a for a in sub._actions if not isinstance(a, argparse._HelpAction) and not _is_render_option(a)]
        shared = [render_flags[a.dest] for a in sub._actions if _is_render_option(a)]
        rows = []
        for action in own:
            formatter = sub._get_formatter()
            help_text = formatter._expand_help(action) if action.help else ""
            required = " (required)" if action.required and action.option_strings else ""
            rows.append(f"| {_argument(action)}{required} | {_default(action)} | {_cell(help_text)} |")
        if shared:
            which = ("every render option" if len(shared) == len(render_flags)
                     else "the render option" + ("s " if len(shared) > 1 else " ") + ", ".join(map(_code, shared)))
            rows.append(f"| render options | | {which} ([below](#render-options)) |")
        if rows:
            lines += ["| argument | default | description |", "| --- | --- | --- |", *rows]
    return "\n".join(lines)


# -- the render options ------------------------------------------------------------------------------------------

_PLAIN = {int: "integer", str: "string", bool: "true / false", float: "number"}


def _type_text(annotation) -> tuple[str, bool]:
    """A field's type in words (``integer``, ``list of strings``, ``one of `auto`, `on`, `off```) and whether
    it may be None."""
    from pydantic import SecretStr

    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        kinds = [_type_text(arg)[0] for arg in args if arg is not type(None)]
        return " or ".join(kinds), type(None) in args
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{value}`" for value in args), False
    if origin is list:
        return f"list of {_type_text(args[0])[0]}s", False
    if annotation is SecretStr:
        return "JSON object (secret)", False
    if annotation in _PLAIN:
        return _PLAIN[annotation], False
    raise PluginError(f"{PAGE}: no words for the type {annotation!r}; teach docs/hooks/cli_reference.py")


def _bounds(info) -> str:
    said = []
    for item in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                said.append(f"{sign} {getattr(item, attr)}")
        if getattr(item, "min_length", None):
            said.append(f"at least {item.min_length} character" + ("s" if item.min_length > 1 else ""))
    return ", ".join(said)


def _render_options() -> str:
    from ipaflow.specs.options import RenderOptions

    flags = _render_option_names()
    lines = ["| option | flag | type | default | description |", "| --- | --- | --- | --- | --- |"]
    for name, info in RenderOptions.model_fields.items():
        if name not in flags:
            raise PluginError(f"{PAGE}: RenderOptions.{name} has no command-line flag")
        extra = info.json_schema_extra or {}
        metavar = "" if info.annotation is bool else f" {extra.get('metavar') or name.upper()}"
        kind, optional = _type_text(info.annotation)
        bounds = _bounds(info)
        kind += f" ({bounds})" if bounds else ""
        kind += ", or none" if optional else ""
        if info.annotation == list[str]:
            kind += " (the flag is repeatable)"
        default = info.get_default(call_default_factory=True)
        description = info.description or ""
        if extra.get("secret"):
            description += "; secret: masked in the Prefect API and never stored in a deployment"
        lines.append(f"| {_code(name)} | {_code(flags[name] + metavar)} | {_cell(kind)} | {_code(repr(default))} "
                     f"| {_cell(description)} |")
    return "\n".join(lines)


# -- flags named in the hand-written text ------------------------------------------------------------------------

def _check_flags(markdown: str, parser: argparse.ArgumentParser) -> None:
    known = {"--help", "--version"}
    for _, _, sub in _subcommands(parser, parser.prog):
        known.update(flag for action in sub._actions for flag in action.option_strings)
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", markdown))
    unknown = sorted(named - known)
    if unknown:
        raise PluginError(f"{PAGE} names flags no ipaflow command has: {', '.join(unknown)}")
