"""What is wrong with a row, in one shape from the first check to the last report.

- ``Problem``: one thing wrong, as ``column: reason``. The column is a manifest column (``ip_image``,
  ``width``, ...) or, for what fails after the checks, the stage that failed (``pipeline``, ``render``,
  ``write``, ``worker``).
- ``RowFailed``: the exception that carries a row's problems, raised by every check and caught once per row.
- ``FailedRow``: a failed row as reports show it (validate's lines, the record's ``error``, the artifacts).
- ``describe_exception``: the one-line reason for an exception that no check foresaw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

MAX_REASON_CHARS = 500


def one_line(text: str) -> str:
    """Whitespace (newlines included) folded to single spaces."""
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a row."""

    column: str
    reason: str
    shared: bool = False  # the very problem of several rows (a duplicate id): a report may say it once

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", one_line(self.reason)[:MAX_REASON_CHARS])

    def __str__(self) -> str:
        return f"{self.column}: {self.reason}"


class RowFailed(ValueError):
    """A row that cannot render, with every problem found."""

    def __init__(self, problems: Problem | Iterable[Problem]):
        self.problems: tuple[Problem, ...] = (problems,) if isinstance(problems, Problem) else tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    @classmethod
    def at(cls, column: str, reason: str) -> RowFailed:
        return cls(Problem(column, reason))

    @property
    def column(self) -> str:
        return self.problems[0].column

    @property
    def reason(self) -> str:
        return self.problems[0].reason


@dataclass(frozen=True)
class FailedRow:
    """A failed row as reported: ``row`` is its id, or ``#<index>`` when the id itself is unusable."""

    row: str
    problems: tuple[Problem, ...]
    index: int | None = None  # 0-based manifest row, when known
    spec: str | None = None  # the row's spec name, when it names a known one

    @property
    def error(self) -> str:
        """What the metadata record's ``error`` holds: every problem, ``column: reason; ...``."""
        return "; ".join(str(p) for p in self.problems)

    def lines(self) -> list[str]:
        """validate's lines: ``row id, column, reason``, one per problem."""
        return [f"{self.row}, {p.column}, {p.reason}" for p in self.problems]


def describe_exception(stage: str, exc: BaseException, redact: Callable[[str], str] = str) -> Problem:
    """An unforeseen exception as a problem of ``stage``: its type and first line, credentials removed."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return Problem(stage, redact(reason))
