"""``ipaflow records OUT --where '...'``: a small filter language over the records, parsed by a tokenizer of its
own and applied with ``pyarrow.compute`` to each streamed table (never ``eval``, never ``pandas.query``).

A filter is comparisons ``<column> <op> <literal>`` joined by ``and`` / ``or`` (``and`` binds first), with optional
parentheses. ``op`` is one of ``< <= > >= == !=``; a literal is a number, a quoted string (``'...'`` or ``"..."``,
a backslash escapes the next character) or ``null`` (only with ``==`` and ``!=``: ``ip_similarity == null`` finds
the rows without a score). A column is a record field or a passthrough column (letters, digits, ``_``, ``.``,
``-``; any other name in backquotes). A record whose value is null matches no comparison but ``== null``. A
string literal compared with a timestamp column (``finished_at``) is read as an ISO time (UTC unless it
says otherwise).

Everything wrong with a filter (its syntax, an unknown column, a literal the column's type cannot hold, a list
column) is one ``FilterError`` line, exit status 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from ipaflow.core.errors import UserError

OPERATORS = {"<": pc.less, "<=": pc.less_equal, ">": pc.greater, ">=": pc.greater_equal, "==": pc.equal,
             "!=": pc.not_equal}
MAX_FILTER = 4096  # characters
MAX_DEPTH = 32  # nested parentheses (the parser recurses per level)
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<op><=|>=|==|!=|<|>)
  | (?P<paren>[()])
  | (?P<quoted>`[^`]+`)
  | (?P<word>[A-Za-z_][A-Za-z0-9_.\-]*)
""", re.VERBOSE)


class FilterError(UserError):
    """A ``--where`` filter that cannot be applied: one line, exit status 2."""


@dataclass(frozen=True)
class Token:
    kind: str  # number | string | op | paren | column | and | or | null | end
    text: str
    at: int  # position in the filter (from 1)


@dataclass(frozen=True)
class Comparison:
    column: str
    op: str
    value: object  # int | float | str | None


@dataclass(frozen=True)
class Either:
    kind: str  # "and" | "or"
    parts: tuple


def tokenize(text: str) -> list[Token]:
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise FilterError(f"--where: unexpected {text[position]!r} at character {position + 1}")
        kind, value = match.lastgroup, match.group()
        if kind == "word":
            kind = value.lower() if value.lower() in ("and", "or", "null") else "column"
        elif kind == "quoted":
            kind, value = "column", value[1:-1]
        if kind != "space":
            tokens.append(Token(kind, value, position + 1))
        position = match.end()
    tokens.append(Token("end", "", len(text) + 1))
    return tokens


def _literal(token: Token) -> object:
    if token.kind == "null":
        return None
    if token.kind == "string":
        return re.sub(r"\\(.)", r"\1", token.text[1:-1])
    if token.kind == "number":
        number = float(token.text)
        return int(token.text) if re.fullmatch(r"[-+]?\d+", token.text) else number
    raise FilterError(f"--where: expected a number, a quoted string or null at character {token.at}, "
                      f"got {token.text or 'the end'!r}")


class _Parser:
    def __init__(self, tokens: list[Token]):
        self.tokens, self.position, self.depth = tokens, 0, 0

    def peek(self) -> Token:
        return self.tokens[self.position]

    def take(self) -> Token:
        token = self.tokens[self.position]
        self.position += 1
        return token

    def joined(self, kind: str, part) -> object:
        parts = [part()]
        while self.peek().kind == kind:
            self.take()
            parts.append(part())
        return parts[0] if len(parts) == 1 else Either(kind, tuple(parts))

    def either(self) -> object:
        return self.joined("or", lambda: self.joined("and", self.comparison))

    def comparison(self) -> object:
        token = self.take()
        if token.kind == "paren" and token.text == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise FilterError(f"--where: more than {MAX_DEPTH} nested parentheses at character {token.at}")
            inner = self.either()
            self.depth -= 1
            closing = self.take()
            if closing.text != ")":
                raise FilterError(f"--where: expected ')' at character {closing.at}, got {closing.text or 'the end'!r}")
            return inner
        if token.kind != "column":
            raise FilterError(f"--where: expected a column name at character {token.at}, got {token.text or 'the end'!r}")
        op = self.take()
        if op.kind != "op":
            raise FilterError(f"--where: expected one of {' '.join(OPERATORS)} after {token.text} at character "
                              f"{op.at}, got {op.text or 'the end'!r}")
        value = _literal(self.take())
        if value is None and op.text not in ("==", "!="):
            raise FilterError(f"--where: {token.text} {op.text} null: compare with null by == or != only")
        return Comparison(token.text, op.text, value)


def parse_filter(text: str) -> object:
    """The filter's tree (``Comparison`` and ``Either`` nodes); raises ``FilterError`` naming what is wrong."""
    if len(text) > MAX_FILTER:
        raise FilterError(f"--where: at most {MAX_FILTER} characters")
    if not text.strip():
        raise FilterError("--where: the filter is empty")
    parser = _Parser(tokenize(text))
    tree = parser.either()
    rest = parser.peek()
    if rest.kind != "end":
        raise FilterError(f"--where: unexpected {rest.text!r} at character {rest.at}; join comparisons with and / or")
    return tree


def _columns(tree) -> list[Comparison]:
    return [tree] if isinstance(tree, Comparison) else [c for part in tree.parts for c in _columns(part)]


def _scalar(comparison: Comparison, kind: pa.DataType) -> pa.Scalar:
    """The literal as a scalar of the column's type."""
    value, name = comparison.value, comparison.column
    numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind)
    if numeric and isinstance(value, (int, float)):
        return pa.scalar(value, type=pa.float64() if isinstance(value, float) else pa.int64())
    if (pa.types.is_string(kind) or pa.types.is_large_string(kind)) and isinstance(value, str):
        return pa.scalar(value)
    if pa.types.is_timestamp(kind) and isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise FilterError(f"--where: {name} holds times; {value!r} is not an ISO time") from None
        return pa.scalar(moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc), type=kind)
    shown = "a number" if numeric else "text" if pa.types.is_string(kind) else str(kind)
    raise FilterError(f"--where: {name} holds {shown}; {value!r} cannot be compared with it")


class RecordFilter:
    """A parsed ``--where`` filter, checked against the records' schema; ``apply`` keeps the matching rows of a
    table of that schema."""

    def __init__(self, text: str, schema: pa.Schema):
        self.tree = parse_filter(text)
        self.scalars: dict[Comparison, pa.Scalar | None] = {}
        for comparison in _columns(self.tree):
            if comparison.column not in schema.names:
                raise FilterError(f"--where: no column {comparison.column!r} in these records "
                                  f"(columns: {', '.join(schema.names)})")
            kind = schema.field(comparison.column).type
            if pa.types.is_nested(kind):
                raise FilterError(f"--where: {comparison.column} holds lists; filter on a column of single values "
                                  "(ip_similarity, not ip_similarities)")
            self.scalars[comparison] = None if comparison.value is None else _scalar(comparison, kind)

    def _mask(self, tree, table: pa.Table) -> pa.Array:
        if isinstance(tree, Either):
            combine = pc.and_kleene if tree.kind == "and" else pc.or_kleene
            masks = [self._mask(part, table) for part in tree.parts]
            mask = masks[0]
            for other in masks[1:]:
                mask = combine(mask, other)
            return mask
        column = table.column(tree.column)
        if tree.value is None:
            return pc.is_null(column) if tree.op == "==" else pc.is_valid(column)
        return OPERATORS[tree.op](column, self.scalars[tree])

    def apply(self, table: pa.Table) -> pa.Table:
        """The rows of ``table`` the filter matches (a null comparison matches nothing)."""
        return table.filter(pc.fill_null(self._mask(self.tree, table), False))
