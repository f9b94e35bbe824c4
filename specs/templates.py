"""Templated prompts: ``{column}`` placeholders filled from a row's own columns.

Plain substitution by a parser of its own (never ``str.format``: no attribute access, no indexing, no format
specs): ``{name}`` is the text of the row's cell ``name``, ``{{`` and ``}}`` are literal braces. A placeholder
naming an absent column or a null cell, or a brace that opens no placeholder, fails the row naming the prompt
column and the placeholder.
"""

from __future__ import annotations

import re
from typing import Any

from ipaflow.core.problems import RowFailed

PLACEHOLDER = re.compile(r"[A-Za-z_][A-Za-z0-9_.=-]{0,127}")
TEMPLATED = ("prompt", "negative_prompt")


def is_template(text: Any) -> bool:
    return isinstance(text, str) and ("{" in text or "}" in text)


def fill(column: str, template: str, row: dict) -> str:
    """``template`` with each ``{name}`` replaced by the text of ``row[name]``; raises RowFailed at ``column``."""
    out: list[str] = []
    i, n = 0, len(template)
    while i < n:
        char = template[i]
        if char in "{}" and template.startswith(char * 2, i):
            out.append(char)
            i += 2
            continue
        if char == "}":
            raise RowFailed.at(column, f"a lone '}}' at position {i}; write '}}}}' for a literal brace")
        if char != "{":
            out.append(char)
            i += 1
            continue
        end = template.find("}", i + 1)
        name = template[i + 1:end] if end > 0 else ""
        if end < 0 or not PLACEHOLDER.fullmatch(name):
            raise RowFailed.at(column, f"placeholder at position {i} is not a column name in braces; "
                                       "write '{{' for a literal brace")
        value = row.get(name)
        if value is None or (isinstance(value, float) and value != value):
            what = "is not a column of the manifest" if name not in row else "is empty in this row"
            raise RowFailed.at(column, f"placeholder {{{name}}}: column {name!r} {what}")
        out.append(value if isinstance(value, str) else _text(value))
        i = end + 1
    return "".join(out)


def _text(value: Any) -> str:
    """A non-text cell as it reads: integral floats without ``.0`` (``3``, not ``3.0``), lists joined by ``, ``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(item) for item in value)
    return str(value)
