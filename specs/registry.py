"""Finding specs: the bundled ones shipped in ``specs/bundled`` plus any ``--specs`` folders (local or fsspec).

A spec is data, never code: YAML is loaded with ``yaml.SafeLoader`` (plain mappings, lists and scalars only;
a ``!!python/...`` tag is an error), and the strict pydantic models reject unknown keys. A spec is also
bounded, so that no file can make ipaflow spend memory or time out of proportion to its size: at most
MAX_SPEC_BYTES, read as a regular file; at most MAX_SPEC_NODES values and MAX_SPEC_DEPTH levels of nesting,
aliases counted at their full expanded size (a 700-byte alias bomb expands to billions of values), recursive
aliases refused; and a key given twice in one mapping is an error, not a silent "last one wins".
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml
from pydantic import ValidationError

from ipaflow.core.errors import UserError
from ipaflow.core.input_reads import InputRefused
from ipaflow.core.storage import Storage, describe_error
from ipaflow.specs.spec import Spec

BUNDLED_DIR = Path(__file__).parent / "bundled"
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 10_000  # mappings, lists and scalars, aliases at their expanded size (a bundled spec has ~60)
MAX_SPEC_DEPTH = 16  # levels of nesting (a per-block adapter scale is 6 deep)


class SpecError(UserError, ValueError):
    """A spec file or folder that cannot be used; the message names the file and the field. Nothing ran: exit 2."""


def format_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents nested deeper than MAX_SPEC_DEPTH (while composing, before Python's
    own recursion limit is reached) and mappings that repeat a key."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_SPEC_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_SPEC_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" may be overridden, by design
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"found duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded(root: yaml.Node) -> tuple[int, int]:
    """(values, depth) of a composed document with every alias expanded, counted without expanding anything:
    each node is measured once (iteratively: alias chains may be deeper than Python's recursion limit)."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        if finished:
            size[id(node)] = 1 + sum(size[id(child)] for child in children)
            height[id(node)] = 1 + max((height[id(child)] for child in children), default=0)
            on_path.discard(id(node))
            continue
        if id(node) in size:
            continue
        if id(node) in on_path:
            raise yaml.composer.ComposerError(None, None, "found a recursive alias (a value that contains itself)",
                                              node.start_mark)
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in size)
    return size[id(root)], height[id(root)]


def load_bounded(text: str) -> object:
    """``yaml.safe_load``, within MAX_SPEC_NODES / MAX_SPEC_DEPTH and without repeated keys; raises
    yaml.YAMLError (with a mark where there is one) for anything else."""
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        values, depth = _expanded(root)
        if values > MAX_SPEC_NODES or depth > MAX_SPEC_DEPTH:
            raise yaml.YAMLError(f"too large: {values} values nested {depth} deep once its aliases are expanded; a "
                                 f"spec may hold {MAX_SPEC_NODES} values, {MAX_SPEC_DEPTH} deep")
        return loader.construct_document(root)
    finally:
        loader.dispose()


def parse_spec(text: str, source: str) -> Spec:
    """Parse one spec document (bounded safe YAML, strict schema)."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: spec file larger than {MAX_SPEC_BYTES} bytes")
    try:
        data = load_bounded(text)
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
    problem = getattr(exc, "problem", None) or str(exc) or exc.__class__.__name__
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _read_folder(uri: str, storage: Storage) -> list[tuple[str, str]]:
    redact = storage.redact
    fs, root = storage.fs(uri)
    if not fs.isdir(root):
        raise SpecError(f"{redact(uri)}: spec folder not found")
    found = []
    remote = "://" in uri
    for path in sorted(fs.find(root)):
        if not path.endswith((".yaml", ".yml")):
            continue
        try:  # bounded like an input: a regular file (never a FIFO), at most MAX_SPEC_BYTES
            text = storage.read_input(fs.unstrip_protocol(path) if remote else path, MAX_SPEC_BYTES)
            found.append((redact(path), bytes(text).decode("utf-8")))
        except UnicodeDecodeError:
            raise SpecError(f"{redact(path)}: not UTF-8 text") from None
        except InputRefused as exc:
            raise SpecError(f"{redact(path)}: {exc}") from None
        except OSError as exc:
            raise SpecError(f"{redact(path)}: cannot read it ({redact(describe_error(exc))})") from None
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
