"""mkdocs hook: the module index of docs/reference.md, generated at build time from the modules' docstrings.

The marker ``<!-- modules -->`` in reference.md becomes one table per package (``ipaflow.core``, ... in the
order of ``[tool.setuptools.package-dir]``): every module, with the first sentence of its docstring, read with
``ast`` (nothing is imported). A module added, moved or removed shows here at the next build; a module without a
docstring fails the build.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from package_paths import _package_dirs  # the sibling hook: pyproject.toml's package-dir, read once

PAGE = "reference.md"
MARKER = "<!-- modules -->"


def _first_sentence(docstring: str) -> str:
    paragraph = " ".join(docstring.split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s+[A-Z`(]|$)", paragraph)
    sentence = match.group(1) if match else paragraph
    return sentence.replace("``", "`").replace("|", "\\|")


def _index(root: Path) -> str:
    lines = []
    for package, folder in _package_dirs(root).items():
        lines += [f"### `{package}`", "", "| module | what it holds |", "| --- | --- |"]
        for path in sorted(folder.rglob("*.py"), key=lambda p: (len(p.relative_to(folder).parts), p.as_posix())):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            if not docstring:
                raise PluginError(f"{PAGE}: {path} has no module docstring to index")
            where = path.relative_to(root).as_posix()
            lines.append(f"| `{name}` (`{where}`) | {_first_sentence(docstring)} |")
        lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if markdown.count(MARKER) != 1:
        raise PluginError(f"{PAGE} must hold the marker {MARKER} once")
    return markdown.replace(MARKER, _index(Path(config.config_file_path).resolve().parent))
