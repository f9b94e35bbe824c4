"""The tiny model zoo: small, random, deterministic models in the layout of the hub repos the IP-Adapter
guide uses, so the guide's code runs offline through the real diffusers / transformers loading code.

    build_zoo(root, force=False) -> root            # writes root/org/name/... (~33 MB, a few seconds)
    link_into_hf_cache(zoo_root, hub_cache)         # bare hub ids load with HF_HUB_OFFLINE=1
    build_full_size_sd15(root, dtype=float16)       # real SD1.5 + IP-Adapter shapes, random (GPU benchmarks)
    build_full_size_sdxl(root, dtype=float16)       # real SDXL + ViT-H IP-Adapters, random (GPU benchmarks)
    ZOO_REPOS, ZOO_ALIASES

`ipaflow zoo build DIR [--hf-cache DIR] [--force] [--full-size-sd15]` does the same from a shell.
"""

from .build import MARKER, ZOO_ALIASES, ZOO_REPOS, build_zoo, read_marker
from .common import ZOO_VERSION
from .full_size import build_full_size_sd15, build_full_size_sdxl, full_size_configs, full_size_sdxl_configs
from .hf_cache import link_into_hf_cache

__all__ = [
    "MARKER",
    "ZOO_ALIASES",
    "ZOO_REPOS",
    "ZOO_VERSION",
    "build_full_size_sd15",
    "build_full_size_sdxl",
    "build_zoo",
    "full_size_configs",
    "full_size_sdxl_configs",
    "link_into_hf_cache",
    "read_marker",
]
