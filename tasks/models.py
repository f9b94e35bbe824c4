"""Where a model id in a spec is loaded from.

A hub id ``org/name`` resolves to ``$IPAFLOW_MODELS/org/name`` (or ``--models DIR``) when that folder exists,
otherwise it goes to diffusers unchanged (Hugging Face cache, or a download where the hub is reachable).
So one spec runs on the tiny zoo here and on the real weights on a GPU box.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ipaflow.specs.options import default_models_folder

# Held while diffusers / transformers load their lazily imported parts (a pipeline build, reading a pipeline's
# call defaults): two threads doing that at once can find a half-imported module ("cannot import name
# 'AutoModel' from 'transformers'"), as the command line's preload and the planner would.
LIBRARY_IMPORTS = threading.RLock()
# Repos that moved on the hub: the old id still names the same weights.
MOVED = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def models_root(models_dir: str | os.PathLike | None = None) -> Path | None:
    """The models folder: ``models_dir`` (a run's ``RenderOptions.models``), else ``$IPAFLOW_MODELS``."""
    root = models_dir or default_models_folder()
    return Path(root).expanduser() if root else None


def resolve_model(model_id: str, models_dir: str | os.PathLike | None = None) -> str:
    """The path or hub id to hand to ``from_pretrained`` for ``model_id``."""
    root = models_root(models_dir)
    if root is not None:
        for candidate in (model_id, MOVED.get(model_id)):
            if candidate and not Path(candidate).is_absolute() and ".." not in Path(candidate).parts:
                local = root / candidate
                if local.is_dir():
                    return str(local)
    return MOVED.get(model_id, model_id) if not Path(model_id).is_dir() else model_id


def pick_device() -> torch.device:
    """The accelerator when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The spec's dtype, except on a CPU where half precision is slow or unsupported: float32 there."""
    if device.type == "cpu":
        return torch.float32
    return getattr(torch, name)
