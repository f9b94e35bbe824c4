"""The code's shape: one `ipaflow` namespace, and layers that import only downwards
(core <- specs <- tasks <- flows; docs/design.md, "Packages and layers")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["core", "specs", "tasks", "flows"]  # each may import the ones before it
EXTRA_FORBIDDEN = {"tasks": {"prefect"}}  # only tasks/prefect_tasks.py and tasks/zoo may; see ALLOWED
ALLOWED = {"tasks/prefect_tasks.py": {"prefect"}}


def _imports(path: Path) -> set[str]:
    """Every module an ipaflow source file imports (absolute names), anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _sources(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downwards(layer):
    above = LAYERS[LAYERS.index(layer) + 1:]
    for path in _sources(layer):
        relative = str(path.relative_to(ROOT))
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] in LAYERS:
                pytest.fail(f"{relative} imports {name}: ipaflow modules are imported as ipaflow.*")
            if parts[0] == "ipaflow" and len(parts) > 1:
                assert parts[1] not in above, f"{relative} imports {name}, a layer above {layer}"
            forbidden = EXTRA_FORBIDDEN.get(layer, set()) - ALLOWED.get(relative, set())
            assert parts[0] not in forbidden, f"{relative} imports {name}"


def test_every_package_folder_is_installed_under_ipaflow():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {str(p.parent.relative_to(ROOT)) for layer in LAYERS for p in (ROOT / layer).rglob("__init__.py")}
    expected = {"ipaflow." + folder.replace("/", ".") for folder in folders}
    assert set(config["packages"]) == expected
    assert config["package-dir"] == {f"ipaflow.{layer}": layer for layer in LAYERS}


def test_the_python_api_works_beside_a_users_own_tasks_and_flows(tmp_path):
    """A user's project with its own tasks.py and flows/ package (common in Prefect and Celery projects)."""
    (tmp_path / "tasks.py").write_text("raise RuntimeError('the user tasks.py was imported')\n")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("raise RuntimeError('the user flows/ was imported')\n")
    (tmp_path / "specs.py").write_text("raise RuntimeError('the user specs.py was imported')\n")
    script = (
        "from ipaflow.flows.render import render_manifest\n"
        "from ipaflow.specs.options import RenderOptions\n"
        "import ipaflow.tasks.worker, ipaflow.specs.rows\n"
        "assert render_manifest.name == 'ipaflow-render'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_test_files_have_unique_names():
    """pytest imports test files by their base name (no __init__.py in tests/): two files of one name in
    tests/unit and tests/e2e stop the whole suite at collection."""
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({name for name in names if names.count(name) > 1}) == []
