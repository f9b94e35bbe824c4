"""`build_zoo`: write the whole tiny zoo atomically (temp dir, marker last, rename) and idempotently."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import extras, ip_adapter, sd, sdxl
from .common import ZOO_VERSION, normalize_permissions, sha256_file, write_json

MARKER = ".ipaflow-zoo.json"

ZOO_REPOS: tuple[str, ...] = (
    sdxl.SDXL_BASE,
    sdxl.SDXL_INPAINT,
    *sd.SD15_REPOS,
    ip_adapter.REPO,
    extras.MOTION_ADAPTER,
    extras.CONTROLNET_DEPTH,
    extras.LCM_LORA,
)

#: Hub ids that name a zoo repo under another id (registered in the HF cache only; no second copy on disk).
ZOO_ALIASES: dict[str, str] = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


@contextlib.contextmanager
def quiet_progress_bars():
    """Silence transformers' "Writing model shards" bars while the zoo is written (restored after)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def write_repos(root: Path) -> None:
    """Write every zoo repo under `root` (no marker)."""
    with quiet_progress_bars():
        _write_repos(root)


def _write_repos(root: Path) -> None:
    sdxl.write_sdxl_repo(root / sdxl.SDXL_BASE, sdxl.SDXL_BASE)
    sdxl.write_sdxl_repo(root / sdxl.SDXL_INPAINT, sdxl.SDXL_INPAINT, inpainting=True)
    for repo_id in sd.SD15_REPOS:
        sd.write_sd15_repo(root / repo_id, repo_id)
    ip_adapter.write_ip_adapter_repo(root / ip_adapter.REPO)
    extras.write_motion_adapter(root / extras.MOTION_ADAPTER)
    extras.write_controlnet(root / extras.CONTROLNET_DEPTH)
    extras.write_lcm_lora(root / extras.LCM_LORA)


def _zoo_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MARKER)


def write_marker(root: Path) -> dict:
    files = {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size} for rel in _zoo_files(root)}
    marker = {"zoo_version": ZOO_VERSION, "repos": list(ZOO_REPOS), "aliases": ZOO_ALIASES, "files": files}
    write_json(root / MARKER, marker)
    return marker


def read_marker(root: Path | str) -> dict | None:
    """The marker of a complete zoo of this version (every listed file present with its size), else None."""
    root = Path(root)
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if marker.get("zoo_version") != ZOO_VERSION or list(marker.get("repos", ())) != list(ZOO_REPOS):
        return None
    for rel, info in marker.get("files", {}).items():
        try:
            if (root / rel).stat().st_size != info["size"]:
                return None
        except OSError:
            return None
    return marker


def _replaceable(root: Path) -> bool:
    """Only a zoo (current, stale or foreign-version) or an empty folder is ever replaced."""
    if not root.exists():
        return True
    if not root.is_dir():
        return False
    allowed = {MARKER} | {repo.split("/")[0] for repo in ZOO_REPOS}
    return all(entry.name in allowed for entry in root.iterdir())


def build_zoo(root: Path | str, *, force: bool = False) -> Path:
    """Write the tiny zoo under `root` in hub layout (`root/org/name/...`) and return `root`.

    Idempotent: if `root` already holds a complete zoo of this version, return at once unless `force`.
    The zoo is written into a temp folder next to `root`, the marker `.ipaflow-zoo.json` (version, repos,
    sha256 + size of every file) last, then renamed into place: a killed build never leaves a folder that
    looks complete. Deterministic: same bytes on every build (same library versions).
    """
    root = Path(root).expanduser().absolute()
    if not force and read_marker(root) is not None:
        return root
    if not _replaceable(root):
        raise FileExistsError(f"{root} exists and does not look like an ipaflow zoo; refusing to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        write_repos(tmp)
        write_marker(tmp)
        normalize_permissions(tmp)
        old = None
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.rename(root, old / "zoo")
        try:
            os.rename(tmp, root)
        except OSError:
            # Another builder won the race: its zoo is as good as ours.
            if read_marker(root) is None:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
