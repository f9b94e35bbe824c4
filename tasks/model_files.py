"""Why a spec's model files cannot load, in words: a weights file that is missing, truncated or not in the format
its name says, named by its path (``ModelFileError``).

diffusers and transformers say ``Unable to load weights from checkpoint file ...`` for a truncated file and for
a text file alike, safetensors says ``HeaderTooLarge`` or ``incomplete metadata`` without naming the file, and a
missing weights file is told as the ``.bin`` twin it looked for last. ``explain`` turns such an error into one
line: the file named in the error is checked, else every weights file the spec names and those of its local
model folders are (a few bytes each: a safetensors file's header length and header, a PyTorch file's zip
directory), and the first one that cannot load is named with what is wrong with it; else a folder diffusers
found without its weights file.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ipaflow.specs.spec import Spec
from ipaflow.tasks.models import resolve_model

WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER = 100 << 20  # safetensors refuses larger headers (HeaderTooLarge)
_CHECKPOINT = re.compile(r"Unable to load weights from checkpoint file for '([^']+)'")
_NO_FILE = re.compile(r"no file named (\S+) found in directory (.+?)\.?$", re.MULTILINE)
_SCANNED_FILES = 512  # weights files checked per spec at most (a real SDXL folder holds ~20)


class ModelFileError(Exception):
    """A spec's model file cannot load; the message names the file and says why (missing, truncated, not a
    safetensors file, ...)."""


def weights_problem(path: Path) -> str | None:
    """What is wrong with one weights file, or None when its structure is whole (its header and its size agree)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if path.suffix == ".safetensors":
        return _safetensors_problem(path, size)
    if path.suffix in (".bin", ".pt", ".pth") and zipfile.is_zipfile(path) is False and size:
        with open(path, "rb") as handle:
            start = handle.read(4)
        if start == b"PK\x03\x04":  # a zip archive that lost its end (the directory is at the end)
            return f"truncated ({size} bytes: its zip directory is missing)"
        if start[:1] != b"\x80":  # neither a zip archive (torch.save) nor a legacy pickle
            return "not a PyTorch checkpoint"
    return None


def _safetensors_problem(path: Path, size: int) -> str | None:
    if size < 8:
        return f"truncated ({size} bytes)"
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length == 0 or length > MAX_HEADER:
            return "not a safetensors file (it does not start with a header length)"
        if 8 + length > size:
            return f"truncated ({size} bytes; its header alone is {8 + length})"
        try:
            header = json.loads(handle.read(length))
            ends = [int(item["data_offsets"][1]) for name, item in header.items() if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "not a safetensors file (its header is not a safetensors header)"
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        return f"truncated ({size} of {needed} bytes)"
    if needed < size:
        return f"damaged ({size - needed} bytes past its last tensor)"
    return None


def _spec_files(spec: Spec, models_dir: str | None) -> Iterator[Path]:
    """Every local weights file the spec loads: its named weight files, and those in its model folders."""
    folders: list[Path] = []

    def folder(model: str, subfolder: str | None = None) -> Path | None:
        resolved = Path(resolve_model(model, models_dir))
        return (resolved / subfolder if subfolder else resolved) if resolved.is_dir() else None

    for ref in (spec.image_encoder, spec.controlnet, spec.motion_adapter):
        if ref is not None and (found := folder(ref.model, ref.subfolder)) is not None:
            folders.append(found)
    for named in [*spec.ip_adapters, *spec.loras]:
        found = folder(named.model, named.subfolder)
        if found is not None and named.weight_name:
            yield found / named.weight_name
        elif found is not None:
            folders.append(found)
    if (found := folder(spec.model)) is not None:
        folders.append(found)
    for root in folders:
        for directory, _, names in os.walk(root):
            for name in sorted(names):
                if name.endswith(WEIGHTS):
                    yield Path(directory) / name


def explain(spec: Spec, models_dir: str | None, exc: BaseException) -> ModelFileError | None:
    """``exc`` (raised while building ``spec``'s pipeline) as a ``ModelFileError`` naming the model file at fault,
    or None when no model file is (a wrong spec, a hub id that is not there, ...)."""
    text = str(exc)
    if found := _CHECKPOINT.search(text):
        path = Path(found.group(1))
        return ModelFileError(f"{path}: {weights_problem(path) or 'cannot be loaded'}")
    for number, path in enumerate(_spec_files(spec, models_dir)):
        if number >= _SCANNED_FILES:
            break
        if (problem := weights_problem(path)) is not None:
            return ModelFileError(f"{path}: {problem}")
    if found := _NO_FILE.search(text):  # a folder without its weights (diffusers names the last twin it tried)
        name, directory = found.group(1), found.group(2).strip()
        stem = name.rsplit(".", 1)[0]
        what = f"{stem}.safetensors (or {name})" if name.endswith(".bin") else name
        return ModelFileError(f"{directory}/{what}: missing")
    return None
