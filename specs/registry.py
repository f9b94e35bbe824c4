"""Finding specs: the bundled ones shipped in ``specs/bundled`` plus any ``--specs`` folders (local or fsspec).

A spec is data, never code: ``yaml.safe_load`` constructs plain mappings, lists and scalars only (a
``!!python/...`` tag is an error), and the strict pydantic models reject unknown keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml
from pydantic import ValidationError

from ipaflow.core.storage import Storage
from ipaflow.specs.spec import Spec

BUNDLED_DIR = Path(__file__).parent / "bundled"
MAX_SPEC_BYTES = 1 << 20


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the file and the field."""


def format_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def parse_spec(text: str, source: str) -> Spec:
    """Parse one spec document (safe YAML, strict schema)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec is a YAML mapping")
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{source}: {format_validation_error(exc)}") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, e.g. 'could not determine a constructor for the tag ... at line 3, column 7'."""
    problem = getattr(exc, "problem", None) or exc.__class__.__name__
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _read_folder(uri: str, storage: Storage) -> list[tuple[str, str]]:
    redact = storage.redact
    fs, root = storage.fs(uri)
    if not fs.isdir(root):
        raise SpecError(f"{redact(uri)}: spec folder not found")
    found = []
    for path in sorted(fs.find(root)):
        if not path.endswith((".yaml", ".yml")):
            continue
        if fs.size(path) > MAX_SPEC_BYTES:
            raise SpecError(f"{redact(path)}: spec file larger than {MAX_SPEC_BYTES} bytes")
        try:
            found.append((redact(path), fs.cat_file(path).decode("utf-8")))
        except UnicodeDecodeError:
            raise SpecError(f"{redact(path)}: not UTF-8 text") from None
    return found


class SpecRegistry:
    """Every known spec by name. User folders may add specs but not silently replace bundled ones."""

    def __init__(self, folders: Iterable[str] = (), storage: Storage | None = None):
        self._specs: dict[str, Spec] = {}
        self._sources: dict[str, str] = {}
        self._add_folder(str(BUNDLED_DIR), Storage())
        for folder in folders:
            self._add_folder(str(folder), storage or Storage())

    def _add_folder(self, uri: str, storage: Storage) -> None:
        for path, text in _read_folder(uri, storage):
            spec = parse_spec(text, path)
            if spec.name in self._specs:
                raise SpecError(f"{path}: spec name {spec.name!r} is already defined by {self._sources[spec.name]}")
            self._specs[spec.name] = spec
            self._sources[spec.name] = path

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def get(self, name: str) -> Spec:
        try:
            return self._specs[name]
        except KeyError:
            raise SpecError(f"unknown spec {name!r}; known: {', '.join(self.names())}") from None

    def source(self, name: str) -> str:
        self.get(name)
        return self._sources[name]
