"""Small shared helpers of the zoo builder: deterministic seeds and weights, stable JSON, hashes."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Bump when the bytes the zoo builder writes change on purpose (invalidates existing zoos).
ZOO_VERSION = "1"


def seed_for(name: str) -> int:
    """A stable seed per model, derived from its name (e.g. "emilianJR/epiCRealism/unet")."""
    return zlib.crc32(name.encode("utf-8"))


def write_json(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    """JSON the way the hub repos store it, byte-stable (sorted keys, 2-space indent, final newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def write_torch_bin(path: Path, obj: Any) -> None:
    """`torch.save` through a buffer, so that the archive name inside the zip does not depend on the path
    (torch names the record folder after the file) and the bytes are identical on every build."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def normalize_permissions(root: Path) -> None:
    """Ordinary file / folder modes under `root` (safetensors writes 0600 files, mkdtemp 0700 folders),
    so a zoo in a shared cache is readable by other users as the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int, *, std: float | None = None, bias_std: float = 0.02) -> nn.Module:
    """Re-initialise every parameter of `model` from one seeded generator, independent of the torch
    version's default initialisers and of module construction order.

    Norm layers get weight 1 and bias 0. Other weights get a normal init: `std` when given (the full-size
    mode uses 0.02), otherwise 1/sqrt(fan_in), which keeps activations near unit scale through the tiny
    networks, so every part (zero-initialised ControlNet convs included) has a visible effect.
    """
    generator = torch.Generator().manual_seed(seed)
    norm_params = set()
    for module in model.modules():
        if isinstance(module, _NORMS):
            if getattr(module, "weight", None) is not None:
                module.weight.fill_(1.0)
                norm_params.add(id(module.weight))
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
                norm_params.add(id(module.bias))
    for _name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if id(param) in norm_params:
            continue
        if param.ndim >= 2:
            scale = std if std is not None else 1.0 / math.sqrt(param[0].numel())
        else:
            scale = bias_std
        if param.dtype == torch.float32:
            param.normal_(0.0, scale, generator=generator)
        else:  # sample in float32 so the values do not depend on half-precision RNG paths
            param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, scale, generator=generator))
    return model


def randn(generator: torch.Generator, *shape: int, std: float | None = None) -> torch.Tensor:
    """A float32 normal tensor; default std 1/sqrt(fan_in) for matrices, 0.02 for vectors."""
    if std is None:
        std = 1.0 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.02
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
