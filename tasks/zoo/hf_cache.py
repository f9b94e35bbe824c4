"""Register the zoo in a Hugging Face hub cache, so bare hub ids load offline.

Layout written (as huggingface_hub lays out downloads): `hub_cache/models--org--name/refs/main` holds a
40-hex revision, `hub_cache/models--org--name/snapshots/<revision>/<file>` are symlinks to the zoo's files
(copies where symlinks are not possible). With `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE=hub_cache`,
`from_pretrained("org/name")`, `load_ip_adapter("h94/IP-Adapter", ...)`, ... resolve there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .build import ZOO_ALIASES, ZOO_REPOS, read_marker
from .common import ZOO_VERSION


def repo_cache_folder(hub_cache: Path, repo_id: str) -> Path:
    return hub_cache / ("models--" + repo_id.replace("/", "--"))


def zoo_revision(repo_id: str, files: dict[str, str]) -> str:
    """A commit-hash-like revision (40 hex digits) derived from the repo's file hashes."""
    digest = hashlib.sha1(f"ipaflow-zoo {ZOO_VERSION} {repo_id}\n".encode())
    for rel in sorted(files):
        digest.update(f"{rel} {files[rel]}\n".encode())
    return digest.hexdigest()


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    if link.is_symlink() or link.exists():
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(target, link)
    except OSError:
        shutil.copy2(target, link)


def link_into_hf_cache(zoo_root: Path | str, hub_cache: Path | str) -> None:
    """Register every zoo repo (and the alias runwayml/stable-diffusion-v1-5) in `hub_cache`. Idempotent."""
    zoo_root = Path(zoo_root).expanduser().absolute()
    hub_cache = Path(hub_cache).expanduser().absolute()
    marker = read_marker(zoo_root)
    if marker is None:
        raise FileNotFoundError(f"no complete ipaflow zoo at {zoo_root}; run build_zoo first")
    hashes = {rel: info["sha256"] for rel, info in marker["files"].items()}
    for repo_id in (*ZOO_REPOS, *ZOO_ALIASES):
        source = ZOO_ALIASES.get(repo_id, repo_id)
        prefix = source + "/"
        files = {rel[len(prefix):]: sha for rel, sha in hashes.items() if rel.startswith(prefix)}
        revision = zoo_revision(repo_id, files)
        folder = repo_cache_folder(hub_cache, repo_id)
        snapshot = folder / "snapshots" / revision
        for rel in sorted(files):
            _link(zoo_root / source / rel, snapshot / rel)
        ref = folder / "refs" / "main"
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.exists() or ref.read_text() != revision:
            ref.write_text(revision)  # no trailing newline, like huggingface_hub
