"""h94/IP-Adapter: adapter weights in the original (tencent) key format, and the two image encoders.

Files: `.bin` = `torch.save({"image_proj": {...}, "ip_adapter": {...}})`, `.safetensors` = the same tensors
under flat keys `image_proj.*` / `ip_adapter.*`; float16 like the real files (diffusers casts them to the
unet's dtype). `ip_adapter.{1,3,5,...}.to_k_ip.weight / to_v_ip.weight` is one pair per cross-attention
processor in `unet.attn_processors` order, shape `[hidden, cross_attention_dim]`. Projections:

- plain (`ip-adapter_*`): `proj` Linear(image_embeds -> 4 * cross) + LayerNorm(cross), 4 tokens;
- plus (`ip-adapter-plus*`): the Resampler, exactly 4 layers with head dim 64 (what the loader assumes),
  16 queries, fed with the encoder's penultimate hidden states;
- full-face (`ip-adapter-full-face_sd15`): MLP `proj.0` [h, h], `proj.2` [cross, h], `proj.3` LayerNorm,
  h = the encoder's hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import sd, sdxl
from .common import randn, seed_for, write_torch_bin
from .image_encoders import BIG_G, VIT_H, write_image_encoder

REPO = "h94/IP-Adapter"
RESAMPLER_DEPTH = 4  # the diffusers loader assumes 4 layers
RESAMPLER_HEAD_DIM = 64  # ... and a head dim of 64 (heads = to_q rows // 64)
RESAMPLER_QUERIES = 16
RESAMPLER_FF_MULT = 4


def cross_attention_hidden_sizes(unet_config: dict) -> list[int]:
    """Hidden size of every cross-attention processor, in `unet.attn_processors` order, computed like
    diffusers' `_convert_ip_adapter_attn_to_diffusers` (on the meta device: no weights are made)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    channels = list(unet_config["block_out_channels"])
    sizes = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            sizes.append(channels[-1])
        elif name.startswith("up_blocks"):
            sizes.append(list(reversed(channels))[int(name[len("up_blocks.")])])
        else:
            sizes.append(channels[int(name[len("down_blocks.")])])
    return sizes


Sampler = Callable[..., torch.Tensor]


def make_sampler(seed: int, std: float | None = None) -> Sampler:
    """`sample(*shape, std=None)`: seeded float32 normals; default std 1/sqrt(fan_in) for matrices and 0.02
    for vectors, or the fixed `std` given here (full-size mode)."""
    generator = torch.Generator().manual_seed(seed)

    def sample(*shape: int, std: float | None = std) -> torch.Tensor:
        return randn(generator, *shape, std=std)

    return sample


def _layer_norm(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(dim), torch.zeros(dim)


def _ip_layers(rand: Sampler, hidden_sizes: list[int], cross: int) -> dict[str, torch.Tensor]:
    layers = {}
    for index, hidden in enumerate(hidden_sizes):
        key_id = 2 * index + 1
        layers[f"{key_id}.to_k_ip.weight"] = rand(hidden, cross)
        layers[f"{key_id}.to_v_ip.weight"] = rand(hidden, cross)
    return layers


def plain_projection(rand: Sampler, image_embed_dim: int, cross: int) -> dict[str, torch.Tensor]:
    weight, bias = _layer_norm(cross)
    return {
        "proj.weight": rand(4 * cross, image_embed_dim),
        "proj.bias": rand(4 * cross),
        "norm.weight": weight,
        "norm.bias": bias,
    }


def full_face_projection(rand: Sampler, encoder_hidden: int, cross: int) -> dict[str, torch.Tensor]:
    weight, bias = _layer_norm(cross)
    return {
        "proj.0.weight": rand(encoder_hidden, encoder_hidden),
        "proj.0.bias": rand(encoder_hidden),
        "proj.2.weight": rand(cross, encoder_hidden),
        "proj.2.bias": rand(cross),
        "proj.3.weight": weight,
        "proj.3.bias": bias,
    }


def resampler_projection(rand: Sampler, encoder_hidden: int, cross: int, dim: int, heads: int) -> dict[str, torch.Tensor]:
    """The tencent `Resampler(dim, depth=4, dim_head=64, heads, num_queries=16, embedding_dim, output_dim)`."""
    inner = heads * RESAMPLER_HEAD_DIM
    state = {
        "latents": rand(1, RESAMPLER_QUERIES, dim, std=dim**-0.5),
        "proj_in.weight": rand(dim, encoder_hidden),
        "proj_in.bias": rand(dim),
        "proj_out.weight": rand(cross, dim),
        "proj_out.bias": rand(cross),
    }
    state["norm_out.weight"], state["norm_out.bias"] = _layer_norm(cross)
    for layer in range(RESAMPLER_DEPTH):
        p = f"layers.{layer}"
        for norm in ("norm1", "norm2"):
            state[f"{p}.0.{norm}.weight"], state[f"{p}.0.{norm}.bias"] = _layer_norm(dim)
        state[f"{p}.0.to_q.weight"] = rand(inner, dim)
        state[f"{p}.0.to_kv.weight"] = rand(2 * inner, dim)
        state[f"{p}.0.to_out.weight"] = rand(dim, inner)
        state[f"{p}.1.0.weight"], state[f"{p}.1.0.bias"] = _layer_norm(dim)
        state[f"{p}.1.1.weight"] = rand(dim * RESAMPLER_FF_MULT, dim)
        state[f"{p}.1.3.weight"] = rand(dim, dim * RESAMPLER_FF_MULT)
    return state


def adapter_state_dict(
    name: str,
    kind: str,
    *,
    unet_config: dict,
    encoder: dict,
    resampler_dim: int = 0,
    resampler_heads: int = 1,
    std: float | None = None,
    dtype: torch.dtype = torch.float16,
) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} for an adapter of `kind` plain / plus / full-face, for the
    unet of `unet_config` and the image encoder of config `encoder`."""
    rand = make_sampler(seed_for(f"{REPO}/{name}"), std)
    cross = unet_config["cross_attention_dim"]
    if kind == "plain":
        image_proj = plain_projection(rand, encoder["projection_dim"], cross)
    elif kind == "plus":
        image_proj = resampler_projection(rand, encoder["hidden_size"], cross, resampler_dim, resampler_heads)
    elif kind == "full-face":
        image_proj = full_face_projection(rand, encoder["hidden_size"], cross)
    else:
        raise ValueError(f"unknown adapter kind {kind!r}")
    ip_layers = _ip_layers(rand, cross_attention_hidden_sizes(unet_config), cross)
    cast = lambda d: {k: v.to(dtype).contiguous() for k, v in d.items()}  # noqa: E731
    return {"image_proj": cast(image_proj), "ip_adapter": cast(ip_layers)}


def write_adapter(folder: Path, stem: str, state: dict[str, dict[str, torch.Tensor]], *, bin: bool = True) -> None:
    """`<stem>.safetensors` (flat prefixed keys) and, with `bin`, `<stem>.bin` (nested, torch.save)."""
    folder.mkdir(parents=True, exist_ok=True)
    if bin:
        write_torch_bin(folder / f"{stem}.bin", state)
    flat = {f"{group}.{key}": value for group, tensors in state.items() for key, value in tensors.items()}
    save_file(flat, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})


# (subfolder, file stem, kind, unet config, image encoder, resampler dim, resampler heads)
ADAPTERS = (
    ("models", "ip-adapter_sd15", "plain", sd.UNET, VIT_H, 0, 1),
    ("models", "ip-adapter-plus_sd15", "plus", sd.UNET, VIT_H, 32, 1),  # real: dim 768, 12 heads
    ("models", "ip-adapter-plus-face_sd15", "plus", sd.UNET, VIT_H, 32, 1),
    ("models", "ip-adapter-full-face_sd15", "full-face", sd.UNET, VIT_H, 0, 1),
    ("sdxl_models", "ip-adapter_sdxl", "plain", sdxl.UNET, BIG_G, 0, 1),
    ("sdxl_models", "ip-adapter_sdxl_vit-h", "plain", sdxl.UNET, VIT_H, 0, 1),
    ("sdxl_models", "ip-adapter-plus_sdxl_vit-h", "plus", sdxl.UNET, VIT_H, 64, 2),  # real: dim 1280, 20 heads
    ("sdxl_models", "ip-adapter-plus-face_sdxl_vit-h", "plus", sdxl.UNET, VIT_H, 64, 2),
)


def write_ip_adapter_repo(repo_dir: Path) -> None:
    write_image_encoder(repo_dir / "models" / "image_encoder", VIT_H, f"{REPO}/models/image_encoder")
    write_image_encoder(repo_dir / "sdxl_models" / "image_encoder", BIG_G, f"{REPO}/sdxl_models/image_encoder")
    for subfolder, stem, kind, unet_config, encoder, dim, heads in ADAPTERS:
        state = adapter_state_dict(
            f"{subfolder}/{stem}", kind, unet_config=unet_config, encoder=encoder,
            resampler_dim=dim, resampler_heads=heads,
        )
        write_adapter(repo_dir / subfolder, stem, state)
