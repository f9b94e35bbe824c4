"""mkdocs hook: lets mkdocstrings (griffe) find the ``ipaflow`` package in the source tree.

ipaflow's folders install under other names (``core/`` as ``ipaflow.core``, ... by ``[tool.setuptools.package-dir]``
in pyproject.toml), and ``ipaflow`` itself is a namespace with no folder of its own, so griffe's static finder
cannot find ``ipaflow.flows.render`` among the repository's files, nor through setuptools' editable finder (whose
mapping it reads as ``<parent>/<name>``). At build time this hook lays the package out as it installs: a temporary
folder holding ``ipaflow/<name>``, a symbolic link to each mapped folder, read from pyproject.toml itself, and
puts that folder first in the python handler's ``paths``. griffe then reads the source statically; nothing of
ipaflow is imported for the API reference.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

_staged: Path | None = None  # one layout per mkdocs process (``mkdocs serve`` rebuilds reuse it)


def _package_dirs(root: Path) -> dict[str, Path]:
    """``{"ipaflow.core": <root>/core, ...}`` from pyproject.toml's ``[tool.setuptools.package-dir]``."""
    with open(root / "pyproject.toml", "rb") as file:
        mapping = tomllib.load(file).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    dirs = {name: (root / folder).resolve() for name, folder in mapping.items()}
    for name, folder in dirs.items():
        if not (folder / "__init__.py").is_file():
            raise PluginError(f"pyproject.toml maps {name} to {folder}, which is not a package")
    if not dirs:
        raise PluginError("pyproject.toml has no [tool.setuptools.package-dir] to lay the package out from")
    return dirs


def _stage(root: Path) -> Path:
    global _staged
    if _staged is None:
        staged = Path(tempfile.mkdtemp(prefix="ipaflow-docs-src-"))
        atexit.register(shutil.rmtree, staged, ignore_errors=True)
        for name, folder in _package_dirs(root).items():
            link = staged.joinpath(*name.split("."))
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(folder, target_is_directory=True)
        _staged = staged
    return _staged


@event_priority(50)  # before mkdocstrings' own on_config, which builds its handlers from this config
def on_config(config, **kwargs):
    root = Path(config.config_file_path).resolve().parent
    plugin = config.plugins.get("mkdocstrings")
    if plugin is None:
        raise PluginError("the mkdocstrings plugin is not configured")
    python = plugin.config.handlers.setdefault("python", {})
    paths = python.setdefault("paths", [])
    staged = str(_stage(root))
    if staged not in paths:
        paths.insert(0, staged)
    return config


def on_shutdown(**kwargs):
    global _staged
    if _staged is not None:
        shutil.rmtree(_staged, ignore_errors=True)
        _staged = None
